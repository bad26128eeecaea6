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
`ceiling_mib` is what the bound implies: idle RSS, plus `_COPIES` times the largest
plaintext the in-flight bound admits (one fetched batch past the bound), plus the
consumer's prefetch (one fetch per partition, raw and decoded). The verdict is `flat` if
the Theil-Sen slope is at most `_FLAT_SLOPE_MIB_PER_MIN` and max stays under the ceiling.
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
import contextlib
import json
import math
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.load import OutputWatch, Pair, open_producer, produce
from benchmarks.measure import Progress, machine_info, median, percentiles
from benchmarks.rigs.kafka_proxy import KafkaProxy
from benchmarks.rigs.kms_proxy import KmsFaultProxy
from benchmarks.services import Child, child_environ
from pipeline.config import MIB, Settings, env_name, load_settings
from workers import dev
from workers.contract import STATS_FILE_ENV
from workers.runtime import run as run_async
from workers.topics import create_topics

_HOST = "127.0.0.1"
_VALUE_SIZE = 1024
_DISTINCT_RECORDS = 1000
_PARTITIONS = 3
_SAMPLE_SECONDS = 0.5
_FEED_SECONDS = 0.2
_START_TIMEOUT = 60.0
#: The feeder stops topping up below this much available memory (see `Feeder`).
_MIN_AVAILABLE_BYTES = 2 << 30
#: Each in-flight plaintext byte is held about this often: the fetched record with its
#: object, and the producer's copy of its ~1.4x larger envelope until it is acknowledged.
_COPIES = 3
#: The consumer holds one fetch per partition outside the worker's count, raw and decoded.
#: aiokafka asks for at most 1 MiB per partition, but the embedded broker answers with about
#: 5,500 records of 1 KiB (measured), so this is the embedded broker's figure.
_PREFETCH_BYTES_PER_PARTITION = 6 * MIB
#: A 60 s window cannot tell a (Theil-Sen) slope this small from noise.
_FLAT_SLOPE_MIB_PER_MIN = 2.0
#: The client id of `benchmarks.load.open_producer`: the feeder is never throttled.
_FEEDER_CLIENT_ID = "envpipe-bench-load"
_SETTINGS_SHOWN = (
    "max_inflight_bytes",
    "max_inflight_records",
    "batch_max_records",
    "dek_max_records",
)


@dataclass(frozen=True)
class Plan:
    """How long to measure, after how long a warm-up, with how much waiting unread."""

    seconds: float
    warmup_seconds: float
    backlog_records: int


PLANS = {
    "full": Plan(seconds=60.0, warmup_seconds=10.0, backlog_records=200_000),
    "quick": Plan(seconds=20.0, warmup_seconds=5.0, backlog_records=100_000),
}
#: `--seconds N` (the smoke test): tiny durations and backlog; the figures mean nothing.
_SMOKE = Plan(seconds=3.0, warmup_seconds=1.0, backlog_records=20_000)


@dataclass(frozen=True)
class Scenario:
    """One worker run: what is slowed, and the worker settings that differ from the defaults."""

    name: str
    what: str
    settings: Mapping[str, str] = field(default_factory=dict)
    kms_delay_seconds: float = 0.0
    destination_bytes_per_s: float | None = None


SCENARIOS = (
    Scenario("baseline", "nothing slowed"),
    Scenario(
        "slow_kms",
        "every KMS request held 500 ms; a DEK per 2,000 records",
        {env_name("dek_max_records"): "2000"},
        kms_delay_seconds=0.5,
    ),
    Scenario(
        "slow_destination",
        "the worker's Produce requests paced to 2 MB/s",
        destination_bytes_per_s=2e6,
    ),
    Scenario(
        "slow_destination_small_bound",
        "as slow_destination, with ENVPIPE_MAX_INFLIGHT_BYTES = 1 MiB",
        {env_name("max_inflight_bytes"): str(MIB)},
        destination_bytes_per_s=2e6,
    ),
)


# --- load and sampling ------------------------------------------------------------------------


class Feeder:
    """Keeps at least `backlog` records waiting unread in the source topic.

    "Read" is estimated from the output topic's end offsets, which lag by up to one producer
    batch per partition on the embedded broker: the backlog is then a little larger, never
    smaller. The embedded broker keeps every record in memory (it supports neither retention
    nor DeleteRecords), so the feeder stops when the machine runs low: `starved` says so,
    and `lowest_unread` shows whether the worker then ran dry.
    """

    def __init__(self, producer: Any, topic: str, watch: OutputWatch, backlog: int) -> None:
        self._producer = producer
        self._topic = topic
        self._watch = watch
        self._backlog = backlog
        self._pairs = _plaintext_pairs()
        self.produced = 0
        #: the fewest records found waiting at a top-up (0: the worker ran dry)
        self.lowest_unread = math.inf
        self.starved = False

    async def warm_up(self) -> None:
        """One record, to see the worker is running before the load starts."""
        await produce(self._producer, self._topic, self._pairs, 1, partitions=1)
        self.produced += 1

    async def top_up(self) -> None:
        """Produce what is missing from the backlog (and wait for the broker to have it)."""
        unread = self.produced - await self._watch.count()
        self.lowest_unread = min(self.lowest_unread, unread)
        missing = self._backlog - unread
        if missing > 0 and _available_bytes() < _MIN_AVAILABLE_BYTES:
            self.starved = True
        elif missing > 0:
            await produce(self._producer, self._topic, self._pairs, missing, partitions=_PARTITIONS)
            self.produced += missing

    async def run(self) -> None:
        """Top up every `_FEED_SECONDS` until cancelled."""
        while True:
            await self.top_up()
            await asyncio.sleep(_FEED_SECONDS)


def _available_bytes() -> float:
    """MemAvailable from /proc/meminfo (infinite where there is none)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def _plaintext_pairs() -> list[Pair]:
    """Keyed 1 KiB values, incompressible and the same every run."""
    rng = random.Random(5)
    return [
        (f"key-{index:04d}".encode(), rng.randbytes(_VALUE_SIZE))
        for index in range(_DISTINCT_RECORDS)
    ]


def rss_mib(pid: int) -> float | None:
    """A process's resident set now (VmRSS), in MiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class RssSampler:
    """Samples a process's RSS every `_SAMPLE_SECONDS` in the background: (seconds, MiB)."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._started = time.monotonic()
        self.samples: list[tuple[float, float]] = []
        self._task = asyncio.create_task(self._sample())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    async def _sample(self) -> None:
        next_at = time.monotonic()
        while (mib := rss_mib(self._pid)) is not None:
            self.samples.append((round(self.elapsed, 3), round(mib, 2)))
            next_at += _SAMPLE_SECONDS
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def median_slope_per_minute(samples: Sequence[tuple[float, float]]) -> float:
    """The Theil-Sen slope of (seconds, MiB) samples, in MiB per minute: robust to steps."""
    slopes = [
        (m2 - m1) / (t2 - t1)
        for index, (t1, m1) in enumerate(samples)
        for t2, m2 in samples[index + 1 :]
        if t2 > t1
    ]
    return 60 * median(slopes) if slopes else 0.0


def slope_per_minute(samples: Sequence[tuple[float, float]]) -> float:
    """The least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    count = len(samples)
    if count < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / count
    mean_m = sum(m for _, m in samples) / count
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    if spread == 0:
        return 0.0
    return 60 * sum((t - mean_t) * (m - mean_m) for t, m in samples) / spread


def admitted_bytes(settings: Settings) -> int:
    """The most plaintext the in-flight bound lets the worker read before it pauses."""
    return min(settings.max_inflight_bytes, settings.max_inflight_records * _VALUE_SIZE)


def ceiling_mib(idle_mib: float, settings: Settings) -> float:
    """The RSS the in-flight bound implies (see the module docstring)."""
    admitted = admitted_bytes(settings)
    overshoot = settings.batch_max_records * _VALUE_SIZE  # one batch is read past the bound
    prefetch = 2 * _PARTITIONS * _PREFETCH_BYTES_PER_PARTITION
    return idle_mib + (_COPIES * (admitted + overshoot) + prefetch) / MIB


# --- one scenario -----------------------------------------------------------------------------


@dataclass
class Measured:
    """What one scenario measured, before it becomes JSON."""

    scenario: Scenario
    settings: Settings
    idle_mib: float = math.nan
    window_start: float = math.nan
    window_records: int = 0
    window_seconds: float = math.nan
    lowest_unread: int = 0
    broker_mib: float = math.nan
    samples: list[tuple[float, float]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    peak_rss_mib: float = math.nan
    exit_code: int | None = None


@contextlib.asynccontextmanager
async def _services(state_dir: Path, advertised_port: int | None) -> AsyncIterator[dev.DevEnv]:
    """A fresh broker and KMS for one scenario (the broker keeps every record in memory)."""
    try:
        yield dev.up(state_dir, advertised_port=advertised_port)
    finally:
        dev.down(state_dir)


async def run_scenario(
    scenario: Scenario, plan: Plan, logs: Path, progress: Progress
) -> dict[str, Any]:
    """Start the services, the worker and the feeder; sample; stop everything; summarize."""
    async with AsyncExitStack() as stack:
        run = _ScenarioRun(scenario, plan, logs, progress, stack)
        measured = await run.measure(*await run.services())
    return summarize(measured)


@dataclass
class _ScenarioRun:
    """One scenario's steps; everything started is registered on `stack`, which stops it."""

    scenario: Scenario
    plan: Plan
    logs: Path
    progress: Progress
    stack: AsyncExitStack

    async def services(self) -> tuple[dev.DevEnv, dict[str, str]]:
        """The broker and KMS behind the scenario's proxies; the worker's settings for them."""
        scenario, stack = self.scenario, self.stack
        throttle: KafkaProxy | None = None
        if scenario.destination_bytes_per_s is not None:
            throttle = await KafkaProxy(
                scenario.destination_bytes_per_s, exempt_client_id=_FEEDER_CLIENT_ID
            ).start()
            stack.push_async_callback(throttle.close)
        state_dir = self.logs / f"{scenario.name}-services"
        env = await stack.enter_async_context(
            _services(state_dir, throttle.port if throttle else None)
        )
        overrides = {env_name("bootstrap_servers"): env.bootstrap_servers, **scenario.settings}
        if throttle is not None:
            host, _, port = env.bootstrap_servers.rpartition(":")
            throttle.upstream = (host, int(port))
            overrides[env_name("bootstrap_servers")] = f"{_HOST}:{throttle.port}"
        if scenario.kms_delay_seconds:
            kms_proxy = await KmsFaultProxy(env.kms_endpoint).start()
            kms_proxy.delay_seconds = scenario.kms_delay_seconds
            stack.push_async_callback(kms_proxy.close)
            overrides[env_name("kms_endpoint")] = kms_proxy.endpoint
        return env, overrides

    async def measure(self, env: dev.DevEnv, overrides: dict[str, str]) -> Measured:
        """Topics, feeder, worker; idle RSS after one record, then the warm-up and the window."""
        name, plan, stack, logs = self.scenario.name, self.plan, self.stack, self.logs
        bootstrap = overrides[env_name("bootstrap_servers")]
        source, dest = f"memory-{name}-in", f"memory-{name}-out"
        # The output topic too, so that watching it cannot create it first.
        await create_topics(bootstrap, [source, dest], _PARTITIONS)
        producer = await open_producer(bootstrap)
        stack.push_async_callback(producer.stop)
        watch = OutputWatch(bootstrap, dest, _PARTITIONS)
        await watch.start()
        stack.push_async_callback(watch.stop)
        feeder = Feeder(producer, source, watch, plan.backlog_records)

        stats_file = logs / f"{name}-stats.json"
        stats_file.unlink(missing_ok=True)
        environ = child_environ(env, {**overrides, STATS_FILE_ENV: str(stats_file)})
        measured = Measured(self.scenario, load_settings(environ=environ))
        args = ["encrypt", "--source", source, "--dest", dest, "--group", f"memory-{name}"]
        child = Child("workers.cli", args, environ, logs / f"{name}.log")
        stack.push_async_callback(child.stop)  # returns at once if it has exited already
        sampler = RssSampler(child.pid)
        stack.push_async_callback(sampler.stop)

        await feeder.warm_up()
        await _first_output(child, watch)
        measured.idle_mib = rss_mib(child.pid) or math.nan
        self.progress(
            f"{name}: worker ready, idle RSS {measured.idle_mib:.1f} MiB; "
            f"keeping {plan.backlog_records:,} records waiting"
        )
        feeding = asyncio.create_task(feeder.run())
        stack.push_async_callback(_cancel, feeding)
        await _sleep_checking(plan.warmup_seconds, child, feeding)

        self.progress(f"{name}: warm; sampling RSS for {plan.seconds:g}s")
        measured.window_start = sampler.elapsed
        written_before = await watch.count()
        feeder.lowest_unread = math.inf
        await _sleep_checking(plan.seconds, child, feeding)
        measured.window_records = await watch.count() - written_before
        measured.window_seconds = sampler.elapsed - measured.window_start
        measured.lowest_unread = int(min(feeder.lowest_unread, plan.backlog_records))
        if feeder.starved:
            left = f"{_MIN_AVAILABLE_BYTES / (1 << 30):g} GiB"
            self.progress(f"{name}: the feeder stopped: under {left} of memory left on the machine")
        measured.broker_mib = rss_mib(env.broker_pid) or math.nan
        await sampler.stop()
        measured.samples = list(sampler.samples)

        await _cancel(feeding)
        ended = await child.stop()  # SIGTERM: it drains, commits and writes its stats file
        measured.exit_code = ended.code
        measured.peak_rss_mib = ended.peak_rss_mib
        measured.stats = _read_stats(stats_file, child)
        return measured


async def _first_output(child: Child, watch: OutputWatch) -> None:
    """Wait until the warm-up record is out: the worker has its group, keys and a DEK."""
    deadline = time.monotonic() + _START_TIMEOUT
    while await watch.count() < 1:
        if child.exited() or time.monotonic() > deadline:
            raise RuntimeError(f"the worker never wrote its first record: {child.tail(5)}")
        await asyncio.sleep(0.05)


async def _sleep_checking(seconds: float, child: Child, feeding: asyncio.Task[None]) -> None:
    """Sleep, but fail at once if the worker exits or the feeder breaks."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if child.exited():
            raise RuntimeError(f"the worker exited early: {child.tail(5)}")
        if feeding.done():
            feeding.result()  # raises what broke it
            raise RuntimeError("the feeder stopped")
        await asyncio.sleep(min(left, 0.25))


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _read_stats(path: Path, child: Child) -> dict[str, Any]:
    try:
        stats: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"the worker wrote no stats file ({exc}): {child.tail(5)}") from exc
    return stats


def summarize(measured: Measured) -> dict[str, Any]:
    """memory.json's entry for one scenario."""
    scenario, settings = measured.scenario, measured.settings
    window = [(t, mib) for t, mib in measured.samples if t >= measured.window_start]
    if not window:
        raise RuntimeError(f"{scenario.name}: no RSS samples in the window")
    values = [mib for _, mib in window]
    if not (math.isfinite(measured.idle_mib) and math.isfinite(measured.broker_mib)):
        raise RuntimeError(f"{scenario.name}: the worker or the broker was gone when sampled")
    slope = median_slope_per_minute(window)
    ceiling = ceiling_mib(measured.idle_mib, settings)
    failures = [
        *(["GROWING"] if slope > _FLAT_SLOPE_MIB_PER_MIN else []),
        *(["ABOVE CEILING"] if max(values) > ceiling else []),
    ]
    verdict = ", ".join(failures) or "flat"
    # Fewer records waiting than the bound admits: the worker was not held at its bound.
    saturated = measured.lowest_unread * _VALUE_SIZE >= admitted_bytes(settings)
    if not saturated:
        verdict += " (worker not saturated)"
    pauses = measured.stats.get("pauses", {})
    return {
        "what": scenario.what,
        "settings": {env_name(name): getattr(settings, name) for name in _SETTINGS_SHOWN},
        "kms_delay_ms": round(scenario.kms_delay_seconds * 1000),
        "destination_bytes_per_s": scenario.destination_bytes_per_s or 0,
        "rss_mib": {
            "idle": round(measured.idle_mib, 1),
            "start": round(values[0], 1),
            "p50": round(percentiles(values)["p50"], 1),
            "max": round(max(values), 1),
            "end": round(values[-1], 1),
            "peak_vmhwm": measured.peak_rss_mib,
        },
        "slope_mib_per_min": round(slope_per_minute(window), 2),
        "median_slope_mib_per_min": round(slope, 2),
        "ceiling_mib": round(ceiling, 1),
        "records_per_s": round(measured.window_records / measured.window_seconds, 1),
        "window_seconds": round(measured.window_seconds, 1),
        "lowest_backlog_records": measured.lowest_unread,
        "saturated": saturated,
        "broker_rss_mib": round(measured.broker_mib, 1),
        "worker": {
            "exit_code": measured.exit_code,
            "records_in": int(measured.stats.get("records_in", 0)),
            "records_out": int(measured.stats.get("records_out", 0)),
            "records_per_s": float(measured.stats.get("records_per_s", 0.0)),
            "pauses": {reason: int(pauses.get(reason, 0)) for reason in ("backpressure", "kms")},
            "kms_calls": sum(measured.stats.get("kms_calls", {}).values()),
        },
        "flat": verdict == "flat",
        "verdict": verdict,
        "samples": [[t - measured.window_start, mib] for t, mib in measured.samples],
    }


# --- the run ----------------------------------------------------------------------------------


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
            "value_bytes": _VALUE_SIZE,
            "partitions": _PARTITIONS,
            "sample_seconds": _SAMPLE_SECONDS,
            "flat_slope_mib_per_min": _FLAT_SLOPE_MIB_PER_MIN,
        },
        "scenarios": results,
    }
    path = args.out / "memory.json"
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(
        f"# Worker RSS in MiB: {plan.seconds:g} s windows after {plan.warmup_seconds:g} s of "
        f"warm-up, at least {plan.backlog_records:,} records of {_VALUE_SIZE} B waiting\n"
    )
    print(table(results))
    print(
        f"\nceiling = idle + {_COPIES} x the in-flight plaintext the bound admits + the "
        f"consumer's prefetch; LS = least squares, TS = Theil-Sen; "
        f"flat = TS slope <= {_FLAT_SLOPE_MIB_PER_MIN:g} MiB/min and "
        "max <= ceiling"
    )
    progress(f"wrote {path}; worker and service logs in {logs}")
    return 1 if any("error" in entry for entry in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
