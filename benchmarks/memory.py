"""Does the encrypt worker's memory stay flat when its KMS or its destination is slow? (issue 5)

`python -m benchmarks.memory [--quick] [--out DIR]` runs a real `envpipe encrypt` worker
(`python -m workers.cli encrypt`) in each scenario, on its own fresh embedded broker and
KMS, and samples the worker's resident memory (VmRSS) every 0.5 s:

* `baseline`: nothing slowed.
* `slow_kms`: every KMS request is held 500 ms (`benchmarks.rigs.kms_proxy.KmsFaultProxy` with
  `delay_seconds`), and a DEK serves only 2,000 records, so the worker needs the KMS often.
* `slow_destination`: the worker's Produce requests reach the broker at 2 MB/s
  (`benchmarks.rigs.kafka_proxy.KafkaProxy`), while fetching stays fast.
* `slow_destination_small_bound`: the same with ENVPIPE_MAX_INFLIGHT_BYTES at 1 MiB, below
  what the worker holds there by itself, so that its in-flight bound has to engage (the
  pause counts in the table show whether a bound engaged at all).

Load: a feeder in this process keeps at least `backlog_records` 1 KiB records waiting unread
in the source topic (3 partitions), topping it up every 0.2 s, so the worker always has far
more to read than its in-flight bound admits, however fast or slow it drains. Before the
feeder starts, one warm-up record goes through, and the worker's RSS then is its `idle`
figure: everything imported and connected, no records held.

Figures per scenario, over the window after the warm-up: RSS at its start, p50, max, end,
and its slope in MiB per minute, both least squares and Theil-Sen (the median of the slopes
between every pair of samples); records/s written in the window (from the
output topic's end offsets); the worker's own stats file (pauses by reason, KMS calls).
`ceiling_mib` is what the bound implies: idle RSS, plus `COPIES` times the largest
plaintext the in-flight bound admits (one fetched batch past the bound), plus the
consumer's prefetch (one fetch per partition, raw and decoded). The verdict is `flat` if
the Theil-Sen slope is at most `FLAT_SLOPE_MIB_PER_MIN` and max stays under the ceiling.
RSS moves in steps of a few MiB as the allocator takes memory; one such step in a 60 s
window reads as several MiB/min by least squares but not by Theil-Sen. A slope from a 20 s
(`--quick`) window is noisy either way. `--out DIR` gets memory.json (with every RSS sample
as [seconds from the window's start, negative before it; MiB]) and memory-logs/ (worker,
broker and KMS logs, the worker's stats files). This is a program
that prints figures; the test suite only checks the shape of its JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.measure import Progress, machine_info
from benchmarks.memory_sampling import PARTITIONS, SAMPLE_SECONDS, VALUE_SIZE
from benchmarks.memory_scenario import (
    COPIES,
    FLAT_SLOPE_MIB_PER_MIN,
    SCENARIOS,
    Plan,
    Scenario,
    run_scenario,
)
from pipeline.config import MIB
from workers.runtime import run as run_async

PLANS = {
    "full": Plan(seconds=60.0, warmup_seconds=10.0, backlog_records=200_000),
    "quick": Plan(seconds=20.0, warmup_seconds=5.0, backlog_records=100_000),
}
#: `--seconds N` (the smoke test): tiny durations and backlog; the figures mean nothing.
_SMOKE = Plan(seconds=3.0, warmup_seconds=1.0, backlog_records=20_000)


def table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The result table, one row per scenario, as Markdown."""
    head = (
        "| scenario | bound (records / MiB) | idle | start | p50 | max | ceiling "
        "| slope MiB/min (LS / TS) | records/s | min waiting | pauses (bp/kms) | verdict |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, entry in results.items():
        if "error" in entry:
            lines.append(f"| {name} | {entry['error']} |" + " |" * 10)
            continue
        rss, worker, settings = entry["rss_mib"], entry["worker"], entry["settings"]
        bound = (
            f"{settings['ENVPIPE_MAX_INFLIGHT_RECORDS']:,} / "
            f"{settings['ENVPIPE_MAX_INFLIGHT_BYTES'] / MIB:g}"
        )
        pauses = worker["pauses"]
        lines.append(
            f"| {name} | {bound} | {rss['idle']:.1f} | {rss['start']:.1f} | {rss['p50']:.1f} "
            f"| {rss['max']:.1f} | {entry['ceiling_mib']:.1f} "
            f"| {entry['slope_mib_per_min']:+.2f} / {entry['median_slope_mib_per_min']:+.2f} "
            f"| {entry['records_per_s']:,.0f} | {entry['lowest_backlog_records']:,} "
            f"| {pauses['backpressure']}/{pauses['kms']} "
            f"| {entry['verdict']} |"
        )
    return "\n".join(lines)


async def _run_all(
    plan: Plan, scenarios: Sequence[Scenario], logs: Path, progress: Progress
) -> dict[str, dict[str, Any]]:
    """Every scenario in turn; SIGTERM cancels the run like Ctrl-C, so cleanup still happens."""
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main is not None:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
    results: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        progress(f"{scenario.name}: {scenario.what}")
        try:
            results[scenario.name] = await run_scenario(scenario, plan, logs, progress)
        except Exception as exc:  # one scenario failing must not hide the others
            why = f"{type(exc).__name__}: {exc}"
            progress(f"{scenario.name}: FAILED: {why}")
            results[scenario.name] = {"error": why}
            continue
        entry = results[scenario.name]
        rss = entry["rss_mib"]
        progress(
            f"{scenario.name}: {entry['verdict']}: RSS {rss['start']:.1f} -> max {rss['max']:.1f}"
            f" MiB (ceiling {entry['ceiling_mib']:.1f}), slope {entry['slope_mib_per_min']:+.2f} "
            f"(Theil-Sen {entry['median_slope_mib_per_min']:+.2f}) MiB/min, "
            f"{entry['records_per_s']:,.0f} records/s"
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the scenarios, print the table, write memory.json."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="20 s per scenario, not 60 s")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[scenario.name for scenario in SCENARIOS],
        help="run only this scenario (repeatable); default: all",
    )
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)  # the smoke test
    args = parser.parse_args(argv)
    plan = PLANS["quick" if args.quick else "full"]
    if args.seconds is not None:
        plan = replace(_SMOKE, seconds=args.seconds)
    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    logs = args.out / "memory-logs"
    logs.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    machine = machine_info()
    try:
        results = run_async(_run_all(plan, scenarios, logs, progress))
    except (KeyboardInterrupt, asyncio.CancelledError):
        progress("interrupted; every process was stopped")
        return 130
    document = {
        "machine": machine,
        "quick": args.quick or args.seconds is not None,
        "plan": {
            "seconds": plan.seconds,
            "warmup_seconds": plan.warmup_seconds,
            "backlog_records": plan.backlog_records,
            "value_bytes": VALUE_SIZE,
            "partitions": PARTITIONS,
            "sample_seconds": SAMPLE_SECONDS,
            "flat_slope_mib_per_min": FLAT_SLOPE_MIB_PER_MIN,
        },
        "scenarios": results,
    }
    path = args.out / "memory.json"
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(
        f"# Worker RSS in MiB: {plan.seconds:g} s windows after {plan.warmup_seconds:g} s of "
        f"warm-up, at least {plan.backlog_records:,} records of {VALUE_SIZE} B waiting\n"
    )
    print(table(results))
    print(
        f"\nceiling = idle + {COPIES} x the in-flight plaintext the bound admits + the "
        f"consumer's prefetch; LS = least squares, TS = Theil-Sen; "
        f"flat = TS slope <= {FLAT_SLOPE_MIB_PER_MIN:g} MiB/min and "
        "max <= ceiling"
    )
    progress(f"wrote {path}; worker and service logs in {logs}")
    return 1 if any("error" in entry for entry in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
