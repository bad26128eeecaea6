"""`envpipe inspect` on the embedded broker and moto: what it reports, and that it never decrypts.

One topic holds envelopes sealed by a real Encryptor next to the records a reader must turn
away (a foreign wrapping key, a header re-signed by nobody, plaintext, a tombstone). Every
verdict is checked against what a real Decryptor does with the same record.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from pipeline.config import Settings, load_settings
from pipeline.decryptor import Decryptor
from pipeline.encryptor import Encryptor
from pipeline.envelope import decode_header, encode_header
from pipeline.errors import DecryptionError
from pipeline.kms.aws import AwsKms
from pipeline.kms.counting import CountingKms
from workers import inspect, topics
from workers.dev import DevEnv

FOREIGN_KEY = "arn:aws:kms:eu-west-1:999999999999:key/00000000-0000-0000-0000-000000000000"
PLAINTEXT = b'{"order_id": "ord-1", "total_cents": 1250}'
STREAM = "orders"


@dataclass(frozen=True)
class Sealed:
    """The inspect topic and what each of its offsets (all in partition 0) should report."""

    topic: str
    values: list[bytes | None]
    keys: list[bytes | None]
    verdicts: list[str]
    dek_id: str


@pytest.fixture(scope="module")
def aws_environ(dev_env: DevEnv) -> Iterator[dict[str, str]]:
    """dev.env in os.environ for the module: AwsKms takes credentials only from there."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in dev_env.as_environ().items():
            patch.setenv(name, value)
        yield dev_env.as_environ()


@pytest.fixture(scope="module")
def settings(aws_environ: dict[str, str]) -> Settings:
    return load_settings(environ=aws_environ)


@pytest.fixture
async def kms(dev_env: DevEnv, aws_environ: dict[str, str]) -> AsyncIterator[CountingKms]:
    counting = CountingKms(await AwsKms.open(endpoint_url=dev_env.kms_endpoint, region=None))
    yield counting
    await counting.close()


def _reencode(envelope: bytes, **changes: Any) -> bytes:
    """The same envelope with header fields changed and the old signature kept."""
    header, length = decode_header(envelope)
    return encode_header(replace(header, **changes)) + envelope[length:]


@pytest.fixture(scope="module")
async def sealed(dev_env: DevEnv, settings: Settings) -> Sealed:
    """Seal three records for real, add the ones a reader must refuse, produce in order."""
    kms = await AwsKms.open(endpoint_url=dev_env.kms_endpoint, region=None)
    encryptor = await Encryptor.from_settings(kms, settings, stream=STREAM)
    try:
        good = [await encryptor.seal(b"order %d" % n, key) for n, key in enumerate((b"k0", None))]
        good.append(await encryptor.seal(b"order 2", b"k2"))
    finally:
        await encryptor.close()
        await kms.close()
    records: list[tuple[bytes | None, bytes | None, str]] = [
        (good[0], b"k0", inspect.VERIFIED),
        (good[1], None, inspect.VERIFIED),
        (good[2], b"k2", inspect.VERIFIED),
        (_reencode(good[0], kms_key_id=FOREIGN_KEY), b"k0", "key_not_allowed"),
        (_reencode(good[0], encryption_context={"envpipe:stream": "x"}), b"k0", "bad_signature"),
        (good[0][:-1], b"k0", "malformed"),  # ciphertext cut short
        (PLAINTEXT, b"k9", "malformed"),
        (b"\x06" + good[0][1:], b"k0", "unknown_version"),  # version 3
        (b"\x04" + good[0][1:], b"k0", "malformed"),  # version 2, but not a v2 record
        (None, b"k0", inspect.TOMBSTONE),
    ]
    topic = f"inspect-{uuid.uuid4().hex[:8]}"
    await topics.create_topics(dev_env.bootstrap_servers, [topic], partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=dev_env.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for value, key, _ in records:
            await producer.send_and_wait(
                topic, value, key=key, partition=0, headers=[("envpipe.v", b"1")]
            )
    finally:
        await producer.stop()
    return Sealed(
        topic=topic,
        values=[value for value, _, _ in records],
        keys=[key for _, key, _ in records],
        verdicts=[verdict for _, _, verdict in records],
        dek_id=decode_header(good[0])[0].dek_id.hex(),
    )


def test_json_reports_every_header_field_and_verdict(
    sealed: Sealed, settings: Settings, dev_env: DevEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    code = inspect.run(settings, topic=sealed.topic, limit=100, as_json=True)

    out, err = capsys.readouterr()
    assert code == 0
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [(line["partition"], line["offset"]) for line in lines] == [
        (0, n) for n in range(len(sealed.values))
    ]
    assert [line["verdict"] for line in lines] == sealed.verdicts
    assert [line["key"] for line in lines] == [
        None if key is None else key.decode() for key in sealed.keys
    ]
    verified = lines[0]
    first, _ = decode_header(sealed.values[0] or b"")  # what the record really holds
    assert verified["verified"] is True
    assert verified["kafka_headers"] == ["envpipe.v"]
    assert verified["header"] == {
        "version": 1,
        "alg": "AES_256_GCM",
        "kms_key_id": dev_env.kms_key_canonical,
        "signing_key_id": dev_env.signing_key_canonical,
        "dek_id": sealed.dek_id,
        "encryption_context": {"envpipe:stream": STREAM},
        "wrapped_dek_bytes": len(first.wrapped_dek),
        "signature_bytes": len(first.signature),
    }
    assert verified["header"]["wrapped_dek_bytes"] > 0
    assert {line["header"]["dek_id"] for line in lines[:3]} == {sealed.dek_id}  # one DEK
    assert lines[3]["header"]["kms_key_id"] == FOREIGN_KEY
    assert lines[4]["header"]["encryption_context"] == {"envpipe:stream": "x"}
    assert lines[5]["header"]["dek_id"] == sealed.dek_id  # the header parses, the body not
    assert [line["header"] for line in lines[6:]] == [None] * 4
    assert [line["verified"] for line in lines[3:]] == [False] * 7
    assert [line["format"] for line in lines[:6]] == ["v1"] * 6
    assert lines[9]["value_bytes"] is None
    assert "10 records: 1 bad_signature, 1 key_not_allowed, 3 malformed, 1 tombstone, " in err
    assert "unwrap 0." in err
    assert dev_env.secret_access_key not in out + err


def test_text_report_is_aligned_and_shows_the_keys(
    sealed: Sealed, settings: Settings, dev_env: DevEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    code = inspect.run(settings, topic=sealed.topic, limit=100, as_json=False)

    out, _ = capsys.readouterr()
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["PART", "OFFSET", "VERDICT", "SIZE", "KEY"]
    rows = [line for line in lines[1:] if line[:4].strip().isdigit()]
    assert [row.split()[2] for row in rows] == sealed.verdicts
    assert [row.split()[-1] for row in rows[:2]] == ['"k0"', "(null)"]
    verdict_column = lines[0].index("VERDICT")
    assert {row.index(row.split()[2]) for row in rows} == {verdict_column}
    details = [line for line in lines if line.startswith(" " * verdict_column) and line.strip()]
    assert f"kms key     {dev_env.kms_key_canonical}" in details[0]
    assert f"signing key {dev_env.signing_key_canonical}" in details[1]
    assert f"dek id      {sealed.dek_id}" in details[2]
    assert "context     envpipe:stream=orders" in details[3]
    assert f"kms key     {FOREIGN_KEY}" in out
    assert "order" not in out.replace("envpipe:stream=orders", "")  # no plaintext shown
    assert lines[-1].startswith("10 records:")
    assert lines[-1].endswith("unwrap 0.")


async def test_verdicts_match_the_reader_and_cost_no_decrypt(
    sealed: Sealed, settings: Settings, kms: CountingKms
) -> None:
    found: list[inspect.Finding] = []

    verdicts = await inspect.inspect_topic(
        settings, kms, topic=sealed.topic, limit=100, emit=found.append
    )

    assert [finding.verdict for finding in found] == sealed.verdicts
    assert sum(verdicts.values()) == len(sealed.values)
    assert kms.calls["unwrap"] == 0
    assert set(kms.calls) <= {"resolve", "public_key"}

    # The same records through a real reader: "verified" means it opens, and a reason
    # code is the one the reader gives (a tombstone is never opened).
    reader = await Decryptor.from_settings(kms, settings)
    outcomes = []
    for finding, value in zip(found, sealed.values, strict=True):
        if value is None:
            outcomes.append(inspect.TOMBSTONE)
            continue
        try:
            await reader.open(value, finding.key)
        except DecryptionError as exc:
            outcomes.append(exc.reason.value)
        else:
            outcomes.append(inspect.VERIFIED)
    assert outcomes == sealed.verdicts
    assert kms.calls["unwrap"] == 1  # the reader unwrapped the one DEK; inspect none


def test_limit_stops_early(
    sealed: Sealed, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert inspect.run(settings, topic=sealed.topic, limit=2, as_json=True) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_missing_topic_is_a_clear_error(
    sealed: Sealed, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert inspect.run(settings, topic="no-such-topic", limit=5, as_json=False) == 2
    err = capsys.readouterr().err
    assert "topic 'no-such-topic' does not exist" in err
    assert sealed.topic in err  # the topics that do exist are listed


def test_unreachable_broker_is_a_clear_error(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere = replace(settings, bootstrap_servers="127.0.0.1:1")
    assert inspect.run(nowhere, topic="orders", limit=5, as_json=False) == 2
    assert "cannot reach the Kafka broker at 127.0.0.1:1" in capsys.readouterr().err


def test_command_line(sealed: Sealed, aws_environ: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "inspect", "--topic", sealed.topic, "--limit", "3"],
        env={"PATH": "/usr/bin:/bin", **aws_environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(f"  {inspect.VERIFIED}  ") == 3
    assert "3 records: 3 verified." in done.stdout
