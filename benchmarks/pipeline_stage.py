"""Stage 2: the workers end to end through the embedded broker, side by side.

Every implementation runs as its own process, as it would in production, on the same input:
1 KiB values with keys, round-robin over 3 partitions (`envpipe_decrypt` reads envelopes of
those values, sealed by the harness with envpipe's `Encryptor`). Every run gets fresh topics
(created by the harness, with 3 partitions) and a fresh consumer group. Three kinds of run:

* *drain*: the records are produced before the worker starts; `records_per_s` is the
  output's growth between 10% and 90% of them, read from end offsets by the harness, the
  same way for every implementation. Nothing else competes for the CPU meanwhile.
* *burst*: one warm-up record (timestamped an hour ahead, so it can never count as slow) is
  produced, the worker started, and its output awaited: the worker has joined its group and
  fetched its keys. Then the records come as fast as the harness can produce them (about
  twice the passthrough's rate); `latency_ms` is mostly the queueing behind that burst.
* *paced*: the same warm-up, then records at half the passthrough's drain rate;
  `paced_latency_ms` is the latency envpipe adds when the system is not saturated.
* *light*: the same at an eighth of the passthrough's drain rate. On this 2-core machine
  the broker, the load generator and the worker share the cores, and at half the rate of a
  fast passthrough they are busy enough that queueing, not the worker's own path, sets the
  tail; the light runs show the latency added when nothing queues (details.json and
  results.md only: results.json keeps the shape issue 4 fixes).

The worker stops itself after `--stop-when-idle` and writes its stats file. Latency is each
worker's own figure: acknowledgement time minus the source record's timestamp (the Faust app
`workers.faust_app`, run as `python -m faust -A workers.faust_app worker`, measures it the
same way, through `ENVPIPE_STATS_FILE` and `ENVPIPE_FAUST_STOP_WHEN_IDLE`). All drains run first,
then all bursts, then all paced runs, then the light ones; within each kind, rounds interleave the
implementations in rotating order, and the reported figures are medians over rounds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.load import OutputWatch, Pair, open_producer, produce
from benchmarks.measure import Progress, median
from benchmarks.services import Child, child_environ
from workers import dev
from workers.topics import create_topics

IMPLS = (
    "passthrough",
    "passthrough_padded",
    "envpipe_encrypt",
    "envpipe_decrypt",
    "faust_encrypt",
)
#: Faust is roughly 20x slower; it gets fewer records so a run takes comparable time.
SLOW_IMPLS = frozenset({"faust_encrypt"})
_WARMUP_SHIFT_MS = 3_600_000
_START_TIMEOUT = 90.0
#: paced: half the passthrough's drain rate (issue 4); light: an eighth, where nothing queues
_PACE_FRACTIONS = {"paced": 0.5, "light": 0.125}


@dataclass(frozen=True)
class PipelinePlan:
    """Record counts, rounds, and whether runs may overlap (only for the smoke test)."""

    records: int
    paced_records: int
    slow_records: int
    slow_paced_records: int
    rounds: int
    idle_seconds: float
    #: an unmeasured passthrough drain first: the first run on a fresh broker is slow
    warmup_records: int = 0
    partitions: int = 3
    concurrent: bool = False


@dataclass(frozen=True)
class Inputs:
    """The records every worker is fed: plaintext pairs, and the same sealed by envpipe."""

    plain: Sequence[Pair]
    sealed: Sequence[Pair]
    #: bytes envpipe's envelope adds to a 1 KiB value (what `passthrough_padded` appends)
    overhead: int


@dataclass
class RunResult:
    """One worker run: what it measured, or why it failed."""

    impl: str
    kind: str
    records: int
    rate: float | None = None
    records_per_s: float | None = None
    latency_ms: dict[str, float] | None = None
    peak_rss_mib: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    #: where records_per_s came from: the harness's output watch, or the worker's own stats
    rate_source: str = "output watch"
    #: how fast the harness produced a burst or paced run (to see it outran the worker)
    produced_per_s: float | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class PipelineResults:
    """The stage's figures for results.json, plus every run for the report."""

    results: dict[str, Any]
    runs: list[RunResult]
    paced_rate: float | None
    peak_rss_mib: dict[str, float | None]
    light_rate: float | None = None


class PipelineStage:
    """Runs the workers one after another (or together, in smoke mode) and collects figures."""

    def __init__(
        self,
        env: dev.DevEnv,
        plan: PipelinePlan,
        inputs: Inputs,
        workdir: Path,
        progress: Progress,
        *,
        impls: Sequence[str] = IMPLS,
    ) -> None:
        self._env = env
        self._plan = plan
        self._inputs = inputs
        self._workdir = workdir
        self._progress = progress
        self._impls = list(impls)
        self._sequence = 0
        self._producer: Any = None

    async def run(self) -> PipelineResults:
        """All drains, then all bursts, then all paced runs, each kind in rounds; then medians.

        The pace is half the passthrough's median drain rate, so one noisy drain cannot
        set it; within each kind the implementations are interleaved, in rotating order.
        """
        runs: list[RunResult] = []
        rates: dict[str, float | None] = {"drain": None, "burst": None}
        self._producer = await open_producer(self._env.bootstrap_servers)
        try:
            if self._plan.warmup_records:
                await self._run("passthrough", "drain", None, "warm-up", self._plan.warmup_records)
            for kind in ("drain", "burst", "paced", "light"):
                if kind in _PACE_FRACTIONS:
                    rates[kind] = rate = _pace(runs, _PACE_FRACTIONS[kind])
                    if rate is None:
                        break
                    self._progress(f"pipeline: {kind} runs at {rate:,.0f} records/s")
                for round_index in range(self._plan.rounds):
                    shift = round_index % len(self._impls)
                    order = self._impls[shift:] + self._impls[:shift]
                    runs.extend(await self._batch(order, kind, rates[kind], round_index))
        finally:
            await self._producer.stop()
        paced = rates.get("paced")
        return PipelineResults(
            results={impl: _summarize(impl, runs, paced) for impl in self._impls},
            runs=runs,
            paced_rate=paced,
            peak_rss_mib={impl: _peak(impl, runs) for impl in self._impls},
            light_rate=rates.get("light"),
        )

    async def _batch(
        self, order: list[str], kind: str, rate: float | None, round_index: int
    ) -> list[RunResult]:
        label = f"round {round_index + 1}/{self._plan.rounds}"
        if self._plan.concurrent:
            return list(await asyncio.gather(*(self._run(i, kind, rate, label) for i in order)))
        return [await self._run(impl, kind, rate, label) for impl in order]

    def _count(self, impl: str, kind: str) -> int:
        plan = self._plan
        slow = impl in SLOW_IMPLS
        if kind == "paced":
            return plan.slow_paced_records if slow else plan.paced_records
        if kind == "light":  # a quarter of the paced count: the same seconds at 1/4 the rate
            return max(1, (plan.slow_paced_records if slow else plan.paced_records) // 4)
        return plan.slow_records if slow else plan.records

    async def _run(
        self, impl: str, kind: str, rate: float | None, label: str, count: int | None = None
    ) -> RunResult:
        """One worker process: its input, its start, the measured records, its idle stop."""
        self._sequence += 1
        tag = f"{self._sequence:03d}-{impl}-{kind}"
        source, dest = f"bench-{tag}-in", f"bench-{tag}-out"
        count = count or self._count(impl, kind)
        result = RunResult(impl, kind, count, rate)
        pairs = self._inputs.sealed if impl == "envpipe_decrypt" else self._inputs.plain
        partitions = self._plan.partitions
        started = time.monotonic()
        # The output topics too, so that watching them cannot create them first.
        await create_topics(self._env.bootstrap_servers, [source, dest, f"{dest}-dlq"], partitions)
        if kind == "drain":
            await produce(self._producer, source, pairs, count, partitions=partitions)
        else:
            shift = _WARMUP_SHIFT_MS
            await produce(self._producer, source, pairs, 1, partitions=1, timestamp_shift_ms=shift)
        stats_file = self._workdir / f"{tag}.json"
        module, args, extra = self._command(impl, source, dest, f"bench-{tag}")
        extra["ENVPIPE_STATS_FILE"] = str(stats_file)
        environ = child_environ(self._env, extra)
        child = Child(module, args, environ, self._workdir / f"{tag}.log")
        watch = OutputWatch(self._env.bootstrap_servers, dest, partitions)
        try:
            await watch.start()
            if kind == "drain":
                watch.sample_in_background()
            elif await _started(child, watch):
                seconds = await produce(
                    self._producer, source, pairs, count, partitions=partitions, rate=rate
                )
                result.produced_per_s = round(count / seconds, 1)
            else:
                result.error = "the warm-up record never came out"
            if result.error is None:
                await child.wait(within=_START_TIMEOUT + count / 500)
        finally:
            await watch.stop()
            ended = await child.stop()  # returns at once if it has exited; else ends it
        result.peak_rss_mib = ended.peak_rss_mib
        result.seconds = time.monotonic() - started
        if kind == "drain":
            result.records_per_s = watch.rate_between(count // 10, count * 9 // 10)
        if result.error is None:
            _read_stats(result, stats_file, ended.code, child)
        else:
            result.error += f" (worker exit code {ended.code}); log: {child.tail(3)}"
        self._progress(_progress_line(result, label))
        return result

    def _command(
        self, impl: str, source: str, dest: str, group: str
    ) -> tuple[str, list[str], dict[str, str]]:
        """The module, arguments and extra environment that start `impl` (the real CLIs)."""
        idle = f"{self._plan.idle_seconds:g}"
        common = ["--source", source, "--dest", dest, "--group", group, "--stop-when-idle", idle]
        if impl == "passthrough":
            return "benchmarks.pipeline_worker", ["passthrough", *common], {}
        if impl == "passthrough_padded":
            pad = ["--pad", str(self._inputs.overhead)]
            return "benchmarks.pipeline_worker", ["passthrough_padded", *common, *pad], {}
        if impl == "envpipe_encrypt":
            return "workers.cli", ["encrypt", *common], {}
        if impl == "envpipe_decrypt":
            return "workers.cli", ["decrypt", *common, "--dlq", f"{dest}-dlq"], {}
        if impl == "faust_encrypt":
            # The ready app, configured as its docs say: only through the environment.
            app = {
                "ENVPIPE_FAUST_SOURCE": source,
                "ENVPIPE_FAUST_ENCRYPTED": dest,
                "ENVPIPE_FAUST_APP_ID": group,
                "ENVPIPE_FAUST_STOP_WHEN_IDLE": idle,
                "FAUST_DATADIR": str(self._workdir / f"{group}-data"),  # not the temp dir
            }
            return "faust", ["-A", "workers.faust_app", "worker", "-l", "warn"], app
        raise ValueError(f"unknown pipeline implementation {impl!r}")


async def _started(child: Child, watch: OutputWatch) -> bool:
    """Whether the warm-up record came out before the worker exited or the deadline."""
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if await watch.count() >= 1:
            return True
        if child.exited():
            return False
        await asyncio.sleep(0.05)
    return False


def _read_stats(result: RunResult, stats_file: Path, code: int, child: Child) -> None:
    """Check the worker's stats file and take the run's latency from it."""
    try:
        result.stats = json.loads(stats_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        result.error = f"no stats file (exit code {code}): {exc}; log: {child.tail(3)}"
        return
    expected = result.records + (0 if result.kind == "drain" else 1)
    written = int(result.stats.get("records_out", 0))
    if written < expected:
        result.error = f"worker wrote {written} of {expected} records (exit code {code})"
        return
    if result.kind == "drain":
        if result.records_per_s is None:
            # A drain too short for the 50 ms watch (smoke mode): the worker's own figure,
            # first fetch to last acknowledgement.
            result.records_per_s = float(result.stats.get("records_per_s") or 0.0) or None
            result.rate_source = "worker stats"
        if result.records_per_s is None:
            result.error = "no rate measured"
        return
    latency = result.stats.get("latency_ms") or {}
    if any(latency.get(name) is None for name in ("p50", "p99", "p999")):
        result.error = "worker recorded no latency"
        return
    result.latency_ms = {name: round(float(latency[name]), 2) for name in ("p50", "p99", "p999")}


def _progress_line(result: RunResult, label: str) -> str:
    head = f"pipeline {label} {result.kind:<5} {result.impl:<18}"
    if result.error is not None:
        return f"{head} FAILED: {result.error}"
    if result.latency_ms is None:
        figure = f"{result.records_per_s or 0:>9,.0f} records/s"
    else:
        latency = result.latency_ms
        figure = f"latency p50 {latency['p50']:,.1f} p99 {latency['p99']:,.1f} ms"
    return f"{head} {result.records:>7,} records: {figure} ({result.seconds:.1f}s)"


def _pace(runs: list[RunResult], fraction: float) -> float | None:
    """A fraction of the passthrough's median drain rate; None if it never drained."""
    rates = [
        run.records_per_s
        for run in runs
        if run.impl == "passthrough" and run.kind == "drain" and run.records_per_s
    ]
    return median(rates) * fraction if rates else None


def light_latency(runs: list[dict[str, Any]], impl: str) -> dict[str, float] | None:
    """Median light-load latency of `impl` over its rounds, from details.json's runs."""
    return _median_percentiles(
        [
            run["latency_ms"]
            for run in runs
            if run["impl"] == impl and run["kind"] == "light" and run.get("latency_ms")
        ]
    )


def _median_latency(runs: list[RunResult]) -> dict[str, float] | None:
    return _median_percentiles([run.latency_ms for run in runs if run.latency_ms is not None])


def _median_percentiles(values: list[dict[str, float]]) -> dict[str, float] | None:
    if not values:
        return None
    return {name: round(median([v[name] for v in values]), 2) for name in ("p50", "p99", "p999")}


def _summarize(impl: str, runs: list[RunResult], rate: float | None) -> dict[str, Any]:
    """results.json's entry for `impl`: medians over the rounds that succeeded."""
    mine = [run for run in runs if run.impl == impl]
    drains = [run for run in mine if run.kind == "drain"]
    good = [run for run in drains if run.error is None and run.records_per_s]
    if not good:
        reasons = "; ".join(sorted({run.error or "no rate" for run in drains})) or "did not run"
        return {"error": reasons}
    summary: dict[str, Any] = {
        "records_per_s": round(median([r.records_per_s or 0.0 for r in good]), 1)
    }
    for kind, key in (("burst", "latency_ms"), ("paced", "paced_latency_ms")):
        these = [run for run in mine if run.kind == kind]
        latency = _median_latency([run for run in these if run.error is None])
        if latency is None:
            why = "; ".join(sorted({run.error or "" for run in these}))
            if not these:
                why = "not run: no passthrough rate to pace at" if rate is None else "not run"
            summary[key] = {"error": why}
        else:
            summary[key] = latency
    return summary


def _peak(impl: str, runs: list[RunResult]) -> float | None:
    peaks = [r.peak_rss_mib for r in runs if r.impl == impl and r.peak_rss_mib is not None]
    return max(peaks) if peaks else None
