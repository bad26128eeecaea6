"""One cryptography service's own latency, timed call by call in a process of its own.

`python -m benchmarks.provider_probe --calls N --out FILE` runs against the service its
environment names (`ENVPIPE_KMS_PROVIDER` and the provider's variables, as the workers read
them) and writes FILE: wrap (generate-and-wrap a DEK), unwrap and sign latency p50/p99/p999
over N calls each, one at a time; service calls per DEK, counted while an Encryptor seals
through a few DEKs at a small record limit; and the exact envelope overhead of a 1 KiB value
in v1 and v2 (v1 carries the provider's key ids and wrapped DEK). A process of its own,
because SoftHSM2 reads SOFTHSM2_CONF once per process: each token needs its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.envelopes import overhead_by_size
from benchmarks.kms_budget import measure_kms_budget
from benchmarks.measure import Progress, percentiles
from pipeline.config import load_settings
from pipeline.encryptor import Encryptor, stream_context
from pipeline.envelope import decode_header, signed_bytes
from pipeline.kms import CountingKms, open_kms
from pipeline.types import EncryptionContext
from workers.runtime import configure_logging
from workers.runtime import run as run_async

STREAM = "bench-providers"
_WARMUP_CALLS = 3


async def _timed(calls: int, call: Callable[[], Awaitable[Any]]) -> dict[str, float]:
    """p50/p99/p999 in ms of `calls` sequential awaits of `call`, after a short warm-up."""
    for _ in range(_WARMUP_CALLS):
        await call()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return {name: round(value, 3) for name, value in percentiles(samples).items()}


async def probe(calls: int, dek_records: int, deks: int) -> dict[str, Any]:
    """Every figure of one provider (see the module docstring)."""
    settings = load_settings()
    kms = CountingKms(await open_kms(settings))
    try:
        context = EncryptionContext.of(stream_context(STREAM))
        key_id = settings.kms_key_id
        sample = await kms.generate_data_key(key_id, context)
        encryptor = await Encryptor.from_settings(kms, settings, stream=STREAM)
        try:
            header, _ = decode_header(await encryptor.seal(b"x" * 1024))
        finally:
            await encryptor.close()
        message = signed_bytes(header)
        digest = hashlib.sha256(message).digest()
        figures: dict[str, Any] = {
            "provider": settings.kms_provider,
            "calls": calls,
            "wrap_ms": await _timed(calls, lambda: kms.generate_data_key(key_id, context)),
            "unwrap_ms": await _timed(
                calls, lambda: kms.unwrap(sample.key_id, sample.wrapped, context)
            ),
            "sign_ms": await _timed(
                calls, lambda: kms.sign(header.signing_key_id, message, digest)
            ),
        }
    finally:
        await kms.close()
    small = replace(settings, dek_max_records=dek_records)
    budget = await measure_kms_budget(small, dek_records * deks, Progress(quiet=True))
    figures["calls_per_dek"] = budget.per_dek
    figures["deks"] = budget.deks
    figures["calls_by_operation"] = dict(budget.calls - budget.startup)
    overhead = await overhead_by_size(os.environ, STREAM)
    figures["overhead_bytes_1024"] = {fmt: sizes["1024"] for fmt, sizes in overhead.items()}
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, probe the service, write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--dek-records", type=int, default=1000)
    parser.add_argument("--deks", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    figures = run_async(probe(args.calls, args.dek_records, args.deks))
    args.out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
