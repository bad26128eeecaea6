"""Where a worker's CPU goes per record: one drain under py-spy, the top frames summed up.

`python -m benchmarks.profile_worker IMPL [--records N] [--out DIR]` starts the embedded
broker and moto, produces N records of 1 KiB (sealed ones for the decrypt workers), and drains
them with the worker `IMPL` (`passthrough`, `envpipe_encrypt`, `envpipe_encrypt_v2`,
`envpipe_decrypt`, ...) run under `py-spy record` (`pip install py-spy`), exactly as the
pipeline stage runs it (`benchmarks.worker_run`). It writes DIR/IMPL.raw (collapsed stacks:
speedscope and flamegraph.pl read them) and DIR/IMPL-top.json, and prints the top functions by
self time (the function itself) and by total time (itself and what it calls), in samples and
in µs per record. py-spy samples only the thread holding the GIL (`--gil`), so time spent
waiting in the event loop's poll is not counted; samples taken while importing are left out,
and so are, in the total table, the frames of the entry chain (in 90% of the stacks or more).
A drain, not a start, is what the figures are about, but the connecting and the group join
are in them. Profiling slows the worker a little: compare profiles with profiles.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.crypto_impls import STREAM
from benchmarks.envelopes import prepare_inputs, random_pairs
from benchmarks.load import open_producer
from benchmarks.measure import Progress
from benchmarks.services import dev_services
from benchmarks.worker_run import WORKERS, WorkerRunner
from workers.runtime import run as run_async

_RATE_HZ = 250
#: a stack through one of these frames is an import, not the record path
_IMPORTING = ("_find_and_load", "_call_with_frames_removed")
_LINE = re.compile(r":\d+\)$")
#: a function in this share of the stacks or more is the entry chain, left out of "total"
_CHAIN = 0.9


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.is_file() else shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return found


def _frame(raw: str) -> str:
    """`name (path/to/file.py:123)` -> `name (to/file.py)`: one entry per function."""
    name, _, where = raw.partition(" (")
    where = _LINE.sub(")", f"({where}")
    parts = where.strip("()").split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


def top_frames(raw: str, records: int, top: int) -> dict[str, Any]:
    """Self and total samples per function from collapsed stacks, over the non-import ones."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if any(frame.startswith(_IMPORTING) for frame in frames):
            continue
        count = int(count_text)
        samples += count
        named = [_frame(frame) for frame in frames]
        own[named[-1]] += count
        for name in set(named):
            total[name] += count

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {
                "function": name,
                "samples": count,
                "share": round(count / samples, 4) if samples else 0.0,
                "us_per_record": round(count / _RATE_HZ / records * 1e6, 3),
            }
            for name, count in counter.most_common(top)
        ]

    # The entry chain (runpy, click, the event loop's run) is in nearly every stack: noise.
    inner = Counter({name: count for name, count in total.items() if count < _CHAIN * samples})
    return {"samples": samples, "rate_hz": _RATE_HZ, "self": rows(own), "total": rows(inner)}


async def _profile(
    impl: str, records: int, out: Path, progress: Progress, *, native: bool = False
) -> dict[str, Any]:
    raw = out / f"{impl}.raw"
    prefix = [
        _py_spy(),
        "record",
        "--gil",
        *(["--native"] if native else []),
        "--format",
        "raw",
        "-r",
        str(_RATE_HZ),
        "-o",
        str(raw),
        "--",
    ]
    with dev_services() as env:
        inputs, _ = await prepare_inputs(env.as_environ(), random_pairs(), STREAM)
        producer = await open_producer(env.bootstrap_servers)
        try:
            runner = WorkerRunner(
                env, inputs, out, progress, producer=producer, idle_seconds=2.0, prefix="profile"
            )
            result = await runner.run(impl, "drain", records, label="profile", prefix=prefix)
        finally:
            await producer.stop()
    if result.error is not None:
        raise SystemExit(f"the drain failed: {result.error}")
    summary = top_frames(raw.read_text(encoding="utf-8"), records, top=25)
    summary.update(
        impl=impl,
        records=records,
        records_per_s=result.records_per_s,
        cpu_us_per_record=result.cpu_us_per_record,
    )
    return summary


def _print(summary: dict[str, Any], top: int) -> None:
    print(
        f"# {summary['impl']}: {summary['records']:,} records, "
        f"{summary['cpu_us_per_record']} µs CPU/record (stats file), "
        f"{summary['samples']} samples at {summary['rate_hz']} Hz"
    )
    for kind in ("self", "total"):
        print(f"\n## by {kind} time\n\n| µs/record | share | function |\n|---|---|---|")
        for row in summary[kind][:top]:
            print(f"| {row['us_per_record']:.2f} | {row['share']:.1%} | `{row['function']}` |")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, profile one drain, print and write the top frames."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("impl", choices=sorted(set(WORKERS) - {"faust_encrypt"}))
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("bench-results/profile"))
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--native", action="store_true", help="C frames too (py-spy --native)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = run_async(_profile(args.impl, args.records, args.out, Progress(), native=args.native))
    path = args.out / f"{args.impl}-top.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _print(summary, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
