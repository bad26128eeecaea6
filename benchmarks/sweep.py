"""`envpipe bench --sweep`: the encrypt worker over a grid of batch size and concurrency.

Concurrency is processes: a worker is one Python process on one event loop, so more
throughput on a machine means more worker processes in the same consumer group (Kafka
spreads the partitions over them), exactly as in production. Batch size is
ENVPIPE_BATCH_MAX_RECORDS, the records a worker fetches, seals and hands to the producer at
once. Each configuration runs the same way:

1. start the worker processes, send one warm-up record per partition (timestamped an hour
   ahead, so they never count as slow), and wait until every partition is assigned;
2. produce the records as fast as the harness can (about twice what one worker drains) and
   take the output's growth between 10% and 90% of them as the throughput;
3. read each worker's stats file for its latency, CPU time and KMS calls.

Configurations are interleaved over rounds (rotating order) and the medians reported, since
this machine is shared and noisy. The output is a table on stdout, the best setting for this
machine, and `sweep.json` in the output directory.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.load import OutputWatch, Pair, open_producer, produce
from benchmarks.measure import Progress, machine_info, median
from benchmarks.services import Child, child_environ, dev_services
from workers import dev
from workers.contract import ASSIGNED_LOG
from workers.runtime import run as run_async
from workers.topics import create_topics

_PARTITIONS = 6  # enough for two or three processes to share
_VALUE_SIZE = 1024
_WARMUP_SHIFT_MS = 3_600_000
_ASSIGN_TIMEOUT = 60.0
_IDLE_SECONDS = "1.5"


@dataclass(frozen=True)
class SweepPlan:
    """The grid and how much work each point gets."""

    batch_sizes: tuple[int, ...] = (100, 500, 2000)
    processes: tuple[int, ...] = (1, 2)
    records: int = 60_000
    rounds: int = 2


PLANS = {
    "full": SweepPlan(),
    "quick": SweepPlan(records=30_000, rounds=1),
    "smoke": SweepPlan(batch_sizes=(50, 200), processes=(1,), records=600, rounds=1),
}


@dataclass
class Point:
    """One run of one configuration."""

    batch_max_records: int
    processes: int
    records_per_s: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    cpu_us_per_record: float | None = None
    kms_calls: int = 0
    error: str | None = None


def main(*, out: Path, mode: str = "full") -> int:
    """Run the grid, print the table and the best setting, write `out/sweep.json`."""
    plan = PLANS[mode]
    progress = Progress()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "sweep-logs"
    logs.mkdir(exist_ok=True)
    grid = list(itertools.product(plan.batch_sizes, plan.processes))
    progress(f"sweep ({mode}): {len(grid)} configurations x {plan.rounds} rounds")
    with dev_services() as env:
        points = run_async(_sweep(env, plan, grid, logs, progress))
    summary = _summarize(grid, points)
    best = _best(summary)
    document = {
        "machine": machine_info(),
        "mode": mode,
        "plan": asdict(plan),
        "configurations": summary,
        "best": best,
        "runs": [asdict(point) for point in points],
    }
    (out / "sweep.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(render(summary, best))
    progress(f"wrote {out / 'sweep.json'}")
    return 0 if best is not None else 1


async def _sweep(
    env: dev.DevEnv,
    plan: SweepPlan,
    grid: list[tuple[int, int]],
    logs: Path,
    progress: Progress,
) -> list[Point]:
    rng = random.Random(3)
    pairs: list[Pair] = [
        (f"key-{index:04d}".encode(), rng.randbytes(_VALUE_SIZE)) for index in range(1000)
    ]
    harness = _Harness(env, await open_producer(env.bootstrap_servers), pairs, plan.records, logs)
    points: list[Point] = []
    try:
        for round_index in range(plan.rounds):
            shift = round_index % len(grid)
            for batch, processes in grid[shift:] + grid[:shift]:
                point = await harness.run(batch, processes, tag=f"{len(points) + 1:03d}")
                points.append(point)
                progress(f"round {round_index + 1}/{plan.rounds} {_line(point)}")
    finally:
        await harness.producer.stop()
    return points


@dataclass
class _Harness:
    """What every configuration's run shares: services, the producer, the input, the logs."""

    env: dev.DevEnv
    producer: Any
    pairs: Sequence[Pair]
    records: int
    logs: Path

    async def run(self, batch: int, processes: int, *, tag: str) -> Point:
        """One configuration: start the group, warm it up, burst the records, read the stats."""
        point = Point(batch, processes)
        tag = f"{tag}-b{batch}-p{processes}"
        bootstrap, records = self.env.bootstrap_servers, self.records
        source, dest = f"sweep-{tag}-in", f"sweep-{tag}-out"
        await create_topics(bootstrap, [source, dest], _PARTITIONS)
        shift = _WARMUP_SHIFT_MS
        warmup = _PARTITIONS  # one per partition, round-robin
        await produce(
            self.producer, source, self.pairs, warmup, partitions=warmup, timestamp_shift_ms=shift
        )
        environ = child_environ(self.env, {"ENVPIPE_BATCH_MAX_RECORDS": str(batch)})
        args = ["encrypt", "--source", source, "--dest", dest, "--group", f"sweep-{tag}"]
        args += ["--stop-when-idle", _IDLE_SECONDS]
        children = []
        for index in range(processes):
            stats = self.logs / f"{tag}-{index}.json"
            child_env = {**environ, "ENVPIPE_STATS_FILE": str(stats)}
            log = self.logs / f"{tag}-{index}.log"
            children.append((Child("workers.cli", args, child_env, log), stats))
        watch = OutputWatch(bootstrap, dest, _PARTITIONS)
        try:
            await watch.start()
            if not await _all_assigned([child for child, _ in children], source):
                point.error = "the group never assigned every partition"
                return point
            watch.sample_in_background()
            await produce(self.producer, source, self.pairs, records, partitions=_PARTITIONS)
            for child, _ in children:
                await child.wait(within=60 + records / 1000)
            point.records_per_s = watch.rate_between(records // 10, records * 9 // 10)
        finally:
            await watch.stop()
            for child, _ in children:
                await child.stop()
        _read_stats(point, [stats for _, stats in children], records)
        return point


async def _all_assigned(children: Sequence[Child], source: str) -> bool:
    """Whether every process logged an assignment, together covering every partition."""
    deadline = time.monotonic() + _ASSIGN_TIMEOUT
    while time.monotonic() < deadline:
        latest = [_last_assignment(child.log, source) for child in children]
        covered = set().union(*latest)
        if all(latest) and len(covered) == _PARTITIONS and sum(map(len, latest)) == _PARTITIONS:
            return True
        if any(child.exited() for child in children):
            return False
        await asyncio.sleep(0.2)
    return False


def _last_assignment(log: Path, source: str) -> set[str]:
    """The partitions of `source` in the worker's latest "partitions assigned" log line."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return set()
    for line in reversed(lines):
        if ASSIGNED_LOG in line:
            named = line.split(ASSIGNED_LOG, 1)[1].split(",")
            return {name.strip() for name in named if name.strip().startswith(source + "/")}
    return set()


def _read_stats(point: Point, files: Sequence[Path], records: int) -> None:
    """Latency (the slowest process's), CPU per record (all processes) and KMS calls."""
    stats = []
    for path in files:
        try:
            stats.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            point.error = f"no stats file {path.name}: {exc}"
            return
    written = sum(int(s.get("records_out", 0)) for s in stats)
    if written < records + _PARTITIONS:
        point.error = f"wrote {written} of {records + _PARTITIONS} records"
        return
    for name in ("p50", "p99"):
        values = [s["latency_ms"][name] for s in stats if s["latency_ms"].get(name) is not None]
        if values:
            point.latency_ms[name] = round(max(values), 1)
    cpu = sum(float(s.get("cpu_seconds", 0.0)) for s in stats)
    point.cpu_us_per_record = round(cpu / written * 1e6, 2)
    point.kms_calls = sum(sum(s.get("kms_calls", {}).values()) for s in stats)
    if point.records_per_s is None:
        # A run too short for the 50 ms output watch (smoke mode): the workers' own figures,
        # first fetch to last acknowledgement, added up.
        point.records_per_s = sum(float(s.get("records_per_s") or 0.0) for s in stats) or None
    if point.records_per_s is None:
        point.error = "no rate measured"


def _summarize(grid: list[tuple[int, int]], points: list[Point]) -> list[dict[str, Any]]:
    """Per configuration: medians over the rounds that succeeded."""
    rows = []
    for batch, processes in grid:
        mine = [p for p in points if (p.batch_max_records, p.processes) == (batch, processes)]
        good = [p for p in mine if p.error is None and p.records_per_s]
        row: dict[str, Any] = {"batch_max_records": batch, "processes": processes}
        if not good:
            row["error"] = "; ".join(sorted({p.error or "no rate" for p in mine}))
        else:
            row["records_per_s"] = round(median([p.records_per_s or 0.0 for p in good]), 1)
            for name in ("p50", "p99"):
                values = [p.latency_ms[name] for p in good if name in p.latency_ms]
                row[f"latency_{name}_ms"] = round(median(values), 1) if values else None
            cpu = [p.cpu_us_per_record for p in good if p.cpu_us_per_record is not None]
            row["cpu_us_per_record"] = round(median(cpu), 2) if cpu else None
            row["rounds"] = len(good)
        rows.append(row)
    return rows


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest throughput; within 5% of it, the fewest processes, then lowest p99."""
    measured = [row for row in rows if "records_per_s" in row]
    if not measured:
        return None
    top = max(row["records_per_s"] for row in measured)
    close = [row for row in measured if row["records_per_s"] >= 0.95 * top]
    return min(close, key=lambda row: (row["processes"], row.get("latency_p99_ms") or 0.0))


def render(rows: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    """The table a human reads, and the recommendation."""
    lines = [
        "",
        "batch_max_records  processes  records/s  burst p50 ms  burst p99 ms  CPU µs/record",
    ]
    for row in rows:
        head = f"{row['batch_max_records']:>17}  {row['processes']:>9}"
        if "error" in row:
            lines.append(f"{head}  FAILED: {row['error']}")
            continue
        p50, p99 = row.get("latency_p50_ms"), row.get("latency_p99_ms")
        lines.append(
            f"{head}  {row['records_per_s']:>9,.0f}  {_ms(p50):>12}  {_ms(p99):>12}"
            f"  {row.get('cpu_us_per_record') or 0:>13.1f}"
        )
    if best is None:
        lines.append("no configuration completed; see the logs in sweep-logs/")
    else:
        lines.append(
            f"\nbest for this machine ({os.cpu_count()} CPUs): "
            f"ENVPIPE_BATCH_MAX_RECORDS={best['batch_max_records']} with "
            f"{best['processes']} worker process(es) per machine in one consumer group "
            f"({best['records_per_s']:,.0f} records/s)"
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def _line(point: Point) -> str:
    head = f"batch {point.batch_max_records:>5} x {point.processes} process(es)"
    if point.error is not None:
        return f"{head}: FAILED: {point.error}"
    rate = point.records_per_s or 0.0
    return f"{head}: {rate:,.0f} records/s, p99 {_ms(point.latency_ms.get('p99'))} ms"
