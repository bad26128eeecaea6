"""`envpipe inspect`: what the envelopes on a topic claim, and whether a reader would trust them.

It parses each header and runs the reader's own checks (allowlists, then the signature,
verified locally with public keys fetched once) but never unwraps a DEK or opens a payload.
Inspecting a topic therefore costs no unwrap and shows no plaintext, so it is safe to point
at any topic. It reads without a consumer group and commits nothing. A v2 record is shown
joined with its header from the keys topic (`<topic>.keys`, or ENVPIPE_KEYS_TOPIC).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline import envelope_v2
from pipeline.config import Settings
from pipeline.decryptor import Decryptor
from pipeline.envelope import Header, decode_header, split_body
from pipeline.errors import DecryptionError, EnvpipeError, Reason
from pipeline.keys_topic import KeysTopicReader
from pipeline.kms import CountingKms, open_kms
from pipeline.types import HeaderSource, Kms, Operation
from workers import runtime, topics
from workers.jobs import keys_topic_of
from workers.kafka_access import KafkaAccess

__all__ = ["TOMBSTONE", "VERIFIED", "Finding", "examine", "inspect_topic", "run"]

#: The verdict of a record a reader would go on to unwrap and open.
VERIFIED = "verified"
#: The verdict of a record with a null value (it stays null through the pipeline).
TOMBSTONE = "tombstone"

_KEY_WIDTH = 48
_INDENT = " " * 16  # under the VERDICT column
_COLUMNS = f"{'PART':>4}  {'OFFSET':>8}  {'VERDICT':<15}  {'SIZE':>8}  KEY"


@dataclass(frozen=True, slots=True)
class Finding:
    """One record as inspect reports it: where it is, its key, its header and the verdict.

    `verdict` is VERIFIED, TOMBSTONE or the reason code a reader would reject it with.
    `header` is None when the value is null, does not parse, or (v2) has no header yet.
    `format` is "v1", "v2" or "" (not an envelope).
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value_size: int | None
    kafka_headers: tuple[str, ...]
    verdict: str
    header: Header | None
    format: str = ""


async def examine(
    decryptor: Decryptor, value: bytes | None, headers: HeaderSource | None = None
) -> tuple[str, Header | None, str]:
    """(verdict, parsed header, format) of one record value, with no unwrap and no decryption.

    A v2 record's header is looked up in `headers` (the keys topic); none there is
    `header_missing`.
    """
    if value is None:
        return TOMBSTONE, None, ""
    v2 = value[:1] == bytes((envelope_v2.FIRST_BYTE,))
    try:
        if v2:
            header, length = _v2_header(value, headers), 0
        else:
            header, length = decode_header(value)
    except DecryptionError as exc:
        return exc.reason.value, None, ""
    reason = await decryptor.check_header(header)
    if reason is None and not v2:
        try:
            split_body(value, length)  # the header may be sound and the body not
        except DecryptionError as exc:
            reason = exc.reason
    return (VERIFIED if reason is None else reason.value), header, "v2" if v2 else "v1"


def _v2_header(value: bytes, headers: HeaderSource | None) -> Header:
    dek_id, _, _ = envelope_v2.decode_record(value)
    found = headers.get(dek_id) if headers is not None else None
    if found is None:
        raise DecryptionError(Reason.HEADER_MISSING)
    return envelope_v2.decode_keys_header(found, dek_id)


async def inspect_topic(
    settings: Settings,
    kms: Kms,
    *,
    topic: str,
    limit: int,
    emit: Callable[[Finding], None],
) -> Counter[str]:
    """Report up to `limit` records of `topic` through `emit`; returns the verdict counts."""
    verdicts: Counter[str] = Counter()
    kafka = KafkaAccess.from_settings(settings)
    decryptor = await Decryptor.from_settings(kms, settings)
    keys: KeysTopicReader | None = None  # loaded at the first v2 record
    records = topics.scan(kafka, topic, client_id="envpipe-inspect", limit=limit)
    async with contextlib.aclosing(records):  # stops the consumer even if `emit` fails
        async for batch in records:
            for record in batch:
                if keys is None and (record.value or b"")[:1] == bytes((envelope_v2.FIRST_BYTE,)):
                    keys = await KeysTopicReader.open(
                        keys_topic_of(topic, settings.keys_topic),
                        follow=False,
                        **kafka.client_kwargs(),
                    )
                verdict, header, form = await examine(decryptor, record.value, keys)
                verdicts[verdict] += 1
                emit(
                    Finding(
                        topic=record.topic,
                        partition=record.partition,
                        offset=record.offset,
                        timestamp_ms=record.timestamp,
                        key=record.key,
                        value_size=None if record.value is None else len(record.value),
                        kafka_headers=tuple(name for name, _ in record.headers),
                        verdict=verdict,
                        header=header,
                        format=form,
                    )
                )
    if keys is not None:
        await keys.close()
    return verdicts


def run(settings: Settings, *, topic: str, limit: int, as_json: bool) -> int:
    """The `inspect` command: 0 once the report is printed, whatever the verdicts; 2 on error."""
    runtime.configure_logging("WARNING")
    # aiokafka logs a failed connection before raising it; the one error line below says it.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return runtime.run(_main(settings, topic=topic, limit=limit, as_json=as_json))
    except EnvpipeError as exc:
        print(f"envpipe: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `envpipe inspect ... | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


async def _main(settings: Settings, *, topic: str, limit: int, as_json: bool) -> int:
    kms = CountingKms(await open_kms(settings))
    try:
        emit = _print_json if as_json else _TextReport()
        verdicts = await inspect_topic(settings, kms, topic=topic, limit=limit, emit=emit)
    finally:
        await kms.close()
    print(summary(verdicts, kms.calls), file=sys.stderr if as_json else sys.stdout)
    return 0


def summary(verdicts: Mapping[str, int], kms_calls: Mapping[str, int]) -> str:
    """One line: verdict counts and the service calls made (unwrap is always zero)."""
    total = sum(verdicts.values())
    if not total:
        counts = "no records"
    else:
        listed = ", ".join(f"{n} {verdict}" for verdict, n in sorted(verdicts.items()))
        counts = f"{total} record{'s' if total != 1 else ''}: {listed}"
    unwrap = Operation.UNWRAP.value
    calls = ", ".join(f"{op} {n}" for op, n in sorted(kms_calls.items()) if op != unwrap)
    return f"{counts}. KMS calls: {calls or 'none'}; {unwrap} {kms_calls.get(unwrap, 0)}."


def show_key(key: bytes | None) -> str:
    """A record key for humans: quoted text if printable UTF-8, else hex; long keys cut."""
    if key is None:
        return "(null)"
    text = _text(key)
    shown = orjson.dumps(text).decode() if text is not None and text.isprintable() else None
    shown = shown or "0x" + key.hex()
    return shown if len(shown) <= _KEY_WIDTH else shown[: _KEY_WIDTH - 1] + "…"


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _context(context: Mapping[str, str]) -> str:
    return ", ".join(f"{name}={value}" for name, value in sorted(context.items())) or "(empty)"


class _TextReport:
    """Prints findings as aligned rows; the column names come with the first row only."""

    def __init__(self) -> None:
        self._started = False

    def __call__(self, finding: Finding) -> None:
        if not self._started:
            print(_COLUMNS)
            self._started = True
        size = "-" if finding.value_size is None else f"{finding.value_size:,} B"
        print(
            f"{finding.partition:>4}  {finding.offset:>8}  {finding.verdict:<15}  {size:>8}  "
            f"{show_key(finding.key)}"
        )
        header = finding.header
        if header is not None:
            for label, shown in (
                ("kms key", header.kms_key_id),
                ("signing key", header.signing_key_id),
                ("dek id", header.dek_id.hex()),
                ("context", _context(header.encryption_context)),
                ("format", finding.format),
            ):
                print(f"{_INDENT}{label:<12}{shown}")


def as_dict(finding: Finding) -> dict[str, Any]:
    """The JSON form of a finding: `key` is the key as UTF-8 text (null if it is not text)."""
    header = finding.header
    return {
        "topic": finding.topic,
        "partition": finding.partition,
        "offset": finding.offset,
        "timestamp_ms": finding.timestamp_ms,
        "key": None if finding.key is None else _text(finding.key),
        "key_hex": None if finding.key is None else finding.key.hex(),
        "value_bytes": finding.value_size,
        "kafka_headers": list(finding.kafka_headers),
        "verdict": finding.verdict,
        "verified": finding.verdict == VERIFIED,
        "format": finding.format or None,
        "header": None
        if header is None
        else {
            "version": header.version,
            "alg": header.alg,
            "kms_key_id": header.kms_key_id,
            "signing_key_id": header.signing_key_id,
            "dek_id": header.dek_id.hex(),
            "encryption_context": dict(header.encryption_context),
            "wrapped_dek_bytes": len(header.wrapped_dek),
            "signature_bytes": len(header.signature),
        },
    }


def _print_json(finding: Finding) -> None:
    sys.stdout.buffer.write(orjson.dumps(as_dict(finding)) + b"\n")
