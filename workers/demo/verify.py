"""Reading the demo's topics back: decrypted == source, and no plaintext where it must not be.

Every encrypted value must be an envelope of the configured format (v1: it starts with its
header; v2: it names a `dek_id` whose header is in the keys topic), carry `envpipe.v`, and
contain no plaintext. The overhead is measured, not assumed: the mean envelope size minus the
mean plaintext size, with the header, nonce, length varint and tag broken down.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from pipeline import envelope_v2
from pipeline.avro import read_long
from pipeline.envelope import NONCE_SIZE, decode_header
from pipeline.errors import DecryptionError
from workers import topics
from workers.contract import version_header
from workers.demo.samples import PLAINTEXT_MARKER, Record, Topics

__all__ = ["Verification", "verify"]

_TAG_SIZE = 16


@dataclass
class Verification:
    """What reading the topics back found."""

    expected: int
    format: str = "v1"
    source: int = 0
    encrypted: int = 0
    decrypted: int = 0
    dlq: int = 0
    missing: int = 0
    unexpected: int = 0
    plaintext_in_encrypted: int = 0
    not_envelopes: int = 0
    without_version_header: int = 0
    headers_missing: int = 0
    in_process_mismatches: int = 0
    dek_ids: set[bytes] = field(default_factory=set)
    prefixes_seen: set[bytes] = field(default_factory=set, repr=False)
    #: bytes before the nonce (v1: the header; v2: version byte + dek_id)
    prefix_bytes: int = 0
    #: total bytes of the ciphertext length varints, over `sealed` values
    length_bytes: int = 0
    #: non-null values in the encrypted topic, their bytes, and the source values' bytes
    sealed: int = 0
    sealed_bytes: int = 0
    plain_bytes: int = 0
    keys_topic_headers: int = 0

    @property
    def overhead(self) -> float | None:
        """Mean envelope bytes added per sealed record."""
        return (self.sealed_bytes - self.plain_bytes) / self.sealed if self.sealed else None

    def breakdown(self) -> str:
        """The overhead's parts, as measured."""
        varint = self.length_bytes / self.sealed if self.sealed else 0.0
        prefix = "header" if self.format == "v1" else "version + dek_id"
        return (
            f"{prefix} {self.prefix_bytes} B + nonce {NONCE_SIZE} B + length {varint:.2f} B "
            f"(mean varint) + GCM tag {_TAG_SIZE} B"
        )

    @property
    def passed(self) -> bool:
        counts_agree = self.expected == self.source == self.encrypted == self.decrypted
        return counts_agree and not any(count for _, count in self._problems())

    def _problems(self) -> list[tuple[str, int]]:
        return [
            ("dead-lettered", self.dlq),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("plaintext in encrypted", self.plaintext_in_encrypted),
            ("not envelopes", self.not_envelopes),
            ("without envpipe.v header", self.without_version_header),
            ("headers missing from the keys topic", self.headers_missing),
            ("in-process mismatches", self.in_process_mismatches),
        ]

    def describe(self) -> str:
        if self.passed:
            return (
                f"PASSED: all {self.decrypted:,} records identical (key, value, headers); "
                "no plaintext in the encrypted topic"
            )
        counts = [("source", self.source), ("encrypted", self.encrypted)]
        counts.append(("decrypted", self.decrypted))
        found = [f"{label} {value:,}" for label, value in counts + self._problems() if value]
        return f"FAILED: expected {self.expected:,}; " + ", ".join(found)


async def verify(
    bootstrap_servers: str, names: Topics, expected: int, format_name: str = "v1"
) -> Verification:
    """Read every topic back: decrypted == source as multisets, no plaintext leaked."""
    result = Verification(expected=expected, format=format_name)
    source: Counter[Record] = Counter()
    plaintexts: set[bytes] = set()
    async for batch in _read(bootstrap_servers, names.source):
        for record in batch:
            source[_identity(record)] += 1
            if record.value is not None:
                plaintexts.add(record.value)
                result.plain_bytes += len(record.value)
    result.source = sum(source.values())
    async for batch in _read(bootstrap_servers, names.encrypted):
        _check_encrypted(batch, plaintexts, result)
    if format_name == "v2":
        published = {r.key async for batch in _read(bootstrap_servers, names.keys) for r in batch}
        result.keys_topic_headers = len(published)
        result.headers_missing = len(result.dek_ids - published)
    decrypted: Counter[Record] = Counter()
    async for batch in _read(bootstrap_servers, names.decrypted):
        decrypted.update(_identity(record) for record in batch)
    result.decrypted = sum(decrypted.values())
    async for batch in _read(bootstrap_servers, names.dlq):
        result.dlq += len(batch)
    result.missing = sum((source - decrypted).values())
    result.unexpected = sum((decrypted - source).values())
    return result


def _read(bootstrap_servers: str, topic: str) -> AsyncGenerator[list[Any], None]:
    """A whole topic, batch by batch, without a consumer group."""
    return topics.scan(bootstrap_servers, topic, client_id="envpipe-demo-verify")


def _identity(record: Any) -> Record:
    """What must survive the round trip byte for byte: key, value and headers in order."""
    return record.key, record.value, tuple(record.headers)


def _check_encrypted(batch: list[Any], plaintexts: set[bytes], result: Verification) -> None:
    """Every non-null value must be an envelope of the format and contain no plaintext."""
    expected_header = version_header(result.format)
    for record in batch:
        result.encrypted += 1
        if expected_header not in record.headers:
            result.without_version_header += 1
        value = record.value
        if value is None:
            continue
        if value in plaintexts or PLAINTEXT_MARKER in value:
            result.plaintext_in_encrypted += 1
        result.sealed += 1
        result.sealed_bytes += len(value)
        try:
            prefix = _prefix(value, result)
        except DecryptionError:
            result.not_envelopes += 1
            continue
        _, after = read_long(value, len(prefix) + NONCE_SIZE)
        result.length_bytes += after - len(prefix) - NONCE_SIZE


def _prefix(value: bytes, result: Verification) -> bytes:
    """The part shared by every record under the value's DEK; notes new DEKs."""
    for seen in result.prefixes_seen:
        if value.startswith(seen):
            return seen
    if result.format == "v2":
        dek_id, _, _ = envelope_v2.decode_record(value)
        prefix = value[: envelope_v2.PREFIX_SIZE]
    else:
        header, length = decode_header(value)
        dek_id, prefix = header.dek_id, value[:length]
    result.prefixes_seen.add(prefix)
    result.prefix_bytes = len(prefix)
    result.dek_ids.add(dek_id)
    return prefix
