"""Seal and open timed in process: `Encryptor.seal`, then `Decryptor.open`, one call at a time.

It runs as a process of its own (`python -m benchmarks.inprocess`), configured only by its
environment exactly as the workers are, so the caller's environment is never changed: the
demo passes dev.env's variables to it, and the benchmarks their own. The figures are per
call, the first call of each including the service round trips for the DEK. In v2 the
headers go to an in-memory keys topic (`pipeline.keys_topic.InMemoryHeaders`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config import load_settings
from pipeline.decryptor import Decryptor
from pipeline.encryptor import Encryptor
from pipeline.histogram import Histogram
from pipeline.keys_topic import InMemoryHeaders
from pipeline.kms import CountingKms, open_kms
from workers.demo.samples import sample_records
from workers.runtime import configure_logging
from workers.runtime import run as run_async
from workers.supervisor import Child

__all__ = ["InProcess", "measure"]

STREAM = "demo.in-process"


@dataclass
class InProcess:
    """Per-call seal and open times in microseconds (p50, p99), and what else was seen."""

    records: int
    seal_us: dict[str, float] = field(default_factory=dict)
    open_us: dict[str, float] = field(default_factory=dict)
    mismatches: int = 0
    kms_calls: dict[str, int] = field(default_factory=dict)
    error: str = ""


async def _time(records: int) -> InProcess:
    settings = load_settings()
    kms = CountingKms(await open_kms(settings))
    headers = InMemoryHeaders()
    seal_us, open_us = Histogram(), Histogram()
    mismatches = 0
    try:
        encryptor = await Encryptor.from_settings(kms, settings, stream=STREAM, header_sink=headers)
        decryptor = await Decryptor.from_settings(kms, settings, header_source=headers)
        samples = [(value, key) for key, value, _ in sample_records(records) if value is not None]
        sealed = []
        for value, key in samples:
            started = time.perf_counter_ns()
            sealed.append(await encryptor.seal(value, key))
            seal_us.add((time.perf_counter_ns() - started) / 1_000)
        for (value, key), envelope in zip(samples, sealed, strict=True):
            started = time.perf_counter_ns()
            opened = await decryptor.open(envelope, key)
            open_us.add((time.perf_counter_ns() - started) / 1_000)
            mismatches += opened != value
        await encryptor.close()
        await decryptor.close()
    finally:
        await kms.close()
    return InProcess(
        records=len(samples),
        seal_us=_summary(seal_us),
        open_us=_summary(open_us),
        mismatches=mismatches,
        kms_calls=dict(kms.calls),
    )


def _summary(histogram: Histogram) -> dict[str, float]:
    return {"p50": histogram.percentile(50), "p99": histogram.percentile(99)}


def measure(
    environ: Mapping[str, str], records: int, folder: Path, timeout: float = 300
) -> InProcess:
    """Run the timing in a child process with `environ`; its figures, or `error` set."""
    out, log = folder / "in-process.json", folder / "in-process.log"
    out.unlink(missing_ok=True)
    child = Child.spawn(
        [
            sys.executable,
            "-m",
            "benchmarks.inprocess",
            "--records",
            str(records),
            "--out",
            str(out),
        ],
        name="the in-process timing",
        log=log,
        env=environ,
    )
    code = child.wait_sync(timeout)
    if code is None:
        child.stop_sync()
    if code != 0 or not out.is_file():
        return InProcess(records=0, error=f"exit {code}; {child.tail()}")
    return InProcess(**json.loads(out.read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=5_000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    result = run_async(_time(args.records))
    args.out.write_text(json.dumps(asdict(result)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
