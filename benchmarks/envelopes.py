"""The stages' input records, and what envelopes cost in bytes, measured on real envelopes.

`prepare_inputs` builds the records a worker is fed: keyed 1 KiB values, plus the same sealed
by envpipe's `Encryptor` in v1 and in v2 (with the v2 headers, for a keys topic), through the
environment's own cryptography service, so a decrypt worker there can open them.
`json_values` are the demo's sample orders (`workers.demo.samples`) packed into values of at
most 1 KiB, for the codec stage: random values do not compress, so they would hide what
encryption does to compression. `overhead_by_size` seals values of 100 B, 1 KiB and 16 KiB in
both formats and subtracts; `json_compression` builds real Kafka record batches (aiokafka's
own builder) of the demo's JSON orders before and after sealing and compares their sizes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka.record.default_records import DefaultRecordBatchBuilder

from benchmarks.load import Pair
from benchmarks.worker_run import Inputs
from pipeline.config import MIB, load_settings
from pipeline.encryptor import Encryptor
from pipeline.errors import SealError
from pipeline.kms import CountingKms, open_kms
from workers.demo.samples import sample_records

VALUE_SIZE = 1024
OVERHEAD_SIZES = (100, 1024, 16384)
_DISTINCT_RECORDS = 1000
#: records per Kafka batch in `json_compression` (a worker's 2,000-record fetch over 3-4
#: partitions gives batches of this order)
_BATCH_RECORDS = 500
_JSON_RECORDS = 5000
#: aiokafka's codec numbers (`DefaultRecordBatchBuilder.CODEC_*`)
_CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


class _CollectedHeaders:
    """A v2 header sink that keeps every (dek_id, header) it is given, in order."""

    def __init__(self) -> None:
        self.items: list[tuple[bytes, bytes]] = []

    async def publish(self, dek_id: bytes, header: bytes) -> None:
        self.items.append((dek_id, header))


class _Sealers:
    """A v1 and a v2 Encryptor on one service client, from an environment's settings."""

    def __init__(self, environ: Mapping[str, str], stream: str) -> None:
        self._environ = environ
        self._stream = stream
        self.headers = _CollectedHeaders()
        self._kms: CountingKms | None = None
        self.v1: Encryptor | None = None
        self.v2: Encryptor | None = None

    async def __aenter__(self) -> tuple[Encryptor, Encryptor]:
        settings = load_settings(environ=self._environ)
        self._kms = CountingKms(await open_kms(settings, self._environ))
        self.v1 = await Encryptor.from_settings(self._kms, settings, stream=self._stream)
        self.v2 = Encryptor(
            self._kms,
            kms_key_id=self.v1.template.text,
            signing_key_id=self.v1.signing_key_id,
            stream=self._stream,
            format="v2",
            header_sink=self.headers,
        )
        return self.v1, self.v2

    async def __aexit__(self, *exc: object) -> None:
        for encryptor in (self.v1, self.v2):
            if encryptor is not None:
                await encryptor.close()
        if self._kms is not None:
            await self._kms.close()


def random_pairs(
    count: int = _DISTINCT_RECORDS, size: int = VALUE_SIZE, seed: int = 11
) -> list[Pair]:
    """Keyed values of `size` random (incompressible) bytes, the same every run."""
    rng = random.Random(seed)
    return [(f"key-{index:04d}".encode(), rng.randbytes(size)) for index in range(count)]


def json_values(count: int = _DISTINCT_RECORDS, limit: int = VALUE_SIZE) -> list[Pair]:
    """Keyed JSON arrays of the demo's sample orders, each at most `limit` bytes."""
    orders = [value for _, value, _ in sample_records(count * 8) if value is not None]
    pairs: list[Pair] = []
    packed: list[bytes] = []
    for order in orders:
        if packed and 2 + sum(map(len, packed)) + len(packed) + len(order) > limit:
            pairs.append((f"key-{len(pairs):04d}".encode(), b"[" + b",".join(packed) + b"]"))
            packed = []
            if len(pairs) == count:
                break
        packed.append(order)
    return pairs


async def _sealed(encryptor: Encryptor, pairs: Sequence[Pair]) -> list[Pair]:
    out = await encryptor.seal_many([(value, key) for key, value in pairs])
    sealed: list[Pair] = []
    for (key, _), envelope in zip(pairs, out, strict=True):
        if isinstance(envelope, SealError):
            raise envelope
        sealed.append((key, envelope))
    return sealed


async def prepare_inputs(
    environ: Mapping[str, str], plain: Sequence[Pair], stream: str
) -> tuple[Inputs, bytes]:
    """`plain`, and the same sealed in v1 and v2 under `environ`'s service; one v1 envelope."""
    sealers = _Sealers(environ, stream)
    async with sealers as (v1, v2):
        sealed, sealed_v2 = await _sealed(v1, plain), await _sealed(v2, plain)
    overhead = len(sealed[0][1]) - len(plain[0][1])
    inputs = Inputs(plain, sealed, sealed_v2, list(sealers.headers.items), overhead)
    return inputs, sealed[0][1]


async def overhead_by_size(environ: Mapping[str, str], stream: str) -> dict[str, dict[str, int]]:
    """Envelope bytes minus value bytes at each of `OVERHEAD_SIZES`, per format (exact)."""
    sizes: dict[str, dict[str, int]] = {"v1": {}, "v2": {}}
    async with _Sealers(environ, stream) as (v1, v2):
        for size in OVERHEAD_SIZES:
            value = bytes(size)
            sizes["v1"][str(size)] = len(await v1.seal(value, b"key")) - size
            sizes["v2"][str(size)] = len(await v2.seal(value, b"key")) - size
    return sizes


def batch_bytes(pairs: Sequence[Pair], codec: str) -> int:
    """The bytes of `pairs` as Kafka record batches of `_BATCH_RECORDS`, compressed by `codec`."""
    total = 0
    for start in range(0, len(pairs), _BATCH_RECORDS):
        builder = DefaultRecordBatchBuilder(
            magic=2,
            compression_type=_CODECS[codec],
            is_transactional=False,
            producer_id=-1,
            producer_epoch=-1,
            base_sequence=-1,
            batch_size=64 * MIB,
        )
        for offset, (key, value) in enumerate(pairs[start : start + _BATCH_RECORDS]):
            builder.append(offset, 0, key, value, [])
        total += len(builder.build())
    return total


async def json_compression(
    environ: Mapping[str, str], stream: str, codecs: Sequence[str] = ("zstd", "lz4")
) -> dict[str, Any]:
    """How much a topic of the demo's JSON orders compresses, plaintext vs v1 and v2 sealed.

    The ratio is uncompressed batch bytes over compressed batch bytes of the same records.
    """
    plain: list[Pair] = [
        (key, value) for key, value, _ in sample_records(_JSON_RECORDS) if value is not None
    ]
    async with _Sealers(environ, stream) as (v1, v2):
        forms = {"plaintext": plain, "v1": await _sealed(v1, plain), "v2": await _sealed(v2, plain)}
    raw = {name: batch_bytes(pairs, "none") for name, pairs in forms.items()}
    result: dict[str, Any] = {
        "records": len(plain),
        "records_per_batch": _BATCH_RECORDS,
        "mean_value_bytes": round(sum(len(value) for _, value in plain) / len(plain), 1),
        "uncompressed_bytes_per_record": {
            name: round(size / len(plain), 1) for name, size in raw.items()
        },
    }
    for codec in codecs:
        result[codec] = {
            name: round(raw[name] / batch_bytes(pairs, codec), 2) for name, pairs in forms.items()
        }
    return result
