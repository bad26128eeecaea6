"""One memory scenario: its services and proxies, one encrypt worker, the window, the summary.

A scenario names what is slowed (the KMS through `benchmarks.rigs.kms_proxy.KmsFaultProxy`,
the destination through `benchmarks.rigs.kafka_proxy.KafkaProxy`) and the worker settings
that differ from the defaults. `run_scenario` starts a fresh broker and KMS behind those
proxies, one `envpipe encrypt` worker and the feeder, samples the worker's RSS over the
window, stops everything (an `AsyncExitStack` owns each thing started) and summarizes.
See `benchmarks.memory` for what the figures mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.load import OutputWatch, open_producer
from benchmarks.measure import Progress, percentiles
from benchmarks.memory_sampling import (
    MIN_AVAILABLE_BYTES,
    PARTITIONS,
    VALUE_SIZE,
    Feeder,
    RssSampler,
    median_slope_per_minute,
    rss_mib,
    slope_per_minute,
)
from benchmarks.rigs.kafka_proxy import KafkaProxy
from benchmarks.rigs.kms_proxy import KmsFaultProxy
from benchmarks.services import Child, child_environ
from pipeline.config import MIB, Settings, env_name, load_settings
from workers import dev
from workers.contract import STATS_FILE_ENV
from workers.topics import create_topics

_HOST = "127.0.0.1"
_START_TIMEOUT = 60.0
#: Each in-flight plaintext byte is held about this often: the fetched record with its
#: object, and the producer's copy of its ~1.4x larger envelope until it is acknowledged.
COPIES = 3
#: The consumer holds one fetch per partition outside the worker's count, raw and decoded.
#: aiokafka asks for at most 1 MiB per partition, but the embedded broker answers with about
#: 5,500 records of 1 KiB (measured), so this is the embedded broker's figure.
_PREFETCH_BYTES_PER_PARTITION = 6 * MIB
#: A 60 s window cannot tell a (Theil-Sen) slope this small from noise.
FLAT_SLOPE_MIB_PER_MIN = 2.0
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


def admitted_bytes(settings: Settings) -> int:
    """The most plaintext the in-flight bound lets the worker read before it pauses."""
    return min(settings.max_inflight_bytes, settings.max_inflight_records * VALUE_SIZE)


def ceiling_mib(idle_mib: float, settings: Settings) -> float:
    """The RSS the in-flight bound implies (see `benchmarks.memory`)."""
    admitted = admitted_bytes(settings)
    overshoot = settings.batch_max_records * VALUE_SIZE  # one batch is read past the bound
    prefetch = 2 * PARTITIONS * _PREFETCH_BYTES_PER_PARTITION
    return idle_mib + (COPIES * (admitted + overshoot) + prefetch) / MIB


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
        await create_topics(bootstrap, [source, dest], PARTITIONS)
        producer = await open_producer(bootstrap)
        stack.push_async_callback(producer.stop)
        watch = OutputWatch(bootstrap, dest, PARTITIONS)
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
            left = f"{MIN_AVAILABLE_BYTES / (1 << 30):g} GiB"
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
        *(["GROWING"] if slope > FLAT_SLOPE_MIB_PER_MIN else []),
        *(["ABOVE CEILING"] if max(values) > ceiling else []),
    ]
    verdict = ", ".join(failures) or "flat"
    # Fewer records waiting than the bound admits: the worker was not held at its bound.
    saturated = measured.lowest_unread * VALUE_SIZE >= admitted_bytes(settings)
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
