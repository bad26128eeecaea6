"""Stage 2: the workers end to end through the broker, side by side.

Every implementation runs as its own process, as it would in production, on the same input:
1 KiB values with keys, round-robin over 3 partitions (`envpipe_decrypt` and
`envpipe_decrypt_v2` read envelopes of those values, sealed by the harness with envpipe's
`Encryptor` in v1 and v2; the v2 headers are put in the source's keys topic first). How one
run is fed and measured is `benchmarks.worker_run`'s; this module decides which runs, in
which order, and turns them into medians. Four kinds of run:

* *drain*: `records_per_s` and `cpu_us_per_record` (the worker's own CPU time over the
  records it read).
* *burst*: the records come as fast as the harness can produce them (about twice the
  passthrough's rate); `latency_ms` is mostly the queueing behind that burst.
* *paced*: records at half the passthrough's drain rate; `paced_latency_ms` is the latency
  envpipe adds when the system is not saturated.
* *light*: the same at an eighth of the passthrough's drain rate. On this 2-core machine
  the broker, the load generator and the worker share the cores, and at half the rate of a
  fast passthrough they are busy enough that queueing, not the worker's own path, sets the
  tail; the light runs show the latency added when nothing queues (`light_latency_ms`).

The worker stops itself after `--stop-when-idle` and writes its stats file. Latency is each
worker's own figure: acknowledgement time minus the source record's timestamp (the Faust app
`workers.faust_app`, run as `python -m faust -A workers.faust_app worker`, measures it the
same way, through `ENVPIPE_STATS_FILE` and `ENVPIPE_FAUST_STOP_WHEN_IDLE`). All drains run first,
then all bursts, then all paced runs, then the light ones; within each kind, rounds interleave the
implementations in rotating order, and the reported figures are medians over rounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.load import open_producer
from benchmarks.measure import Progress, median
from benchmarks.worker_run import Inputs, RunResult, WorkerRunner
from workers import dev

IMPLS = (
    "passthrough",
    "passthrough_padded",
    "envpipe_encrypt",
    "envpipe_encrypt_v2",
    "envpipe_decrypt",
    "envpipe_decrypt_v2",
    "faust_encrypt",
)
#: Faust is roughly 20x slower; it gets fewer records so a run takes comparable time.
SLOW_IMPLS = frozenset({"faust_encrypt"})
#: paced: half the passthrough's drain rate (issue 4); light: an eighth, where nothing queues
_PACE_FRACTIONS = {"paced": 0.5, "light": 0.125}
KINDS = ("drain", "burst", "paced", "light")
#: the kinds where records queue up: fewer rounds may do (`PipelinePlan.queued_rounds`)
_QUEUED = frozenset({"burst", "paced"})


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
    #: rounds of the queued kinds (burst, paced), if fewer than `rounds`
    queued_rounds: int | None = None
    #: per kind, the only implementations that run it (a kind not named: all of them);
    #: the others' entries say "not run in this mode"
    only: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


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
        prefix: str = "bench",
    ) -> None:
        self._env = env
        self._plan = plan
        self._inputs = inputs
        self._workdir = workdir
        self._progress = progress
        self._impls = list(impls)
        self._prefix = prefix

    async def run(self) -> PipelineResults:
        """All drains, then all bursts, then all paced runs, each kind in rounds; then medians.

        The pace is a fraction of the passthrough's median drain rate, so one noisy drain
        cannot set it; within each kind the implementations are interleaved, in rotating order.
        """
        runs: list[RunResult] = []
        rates: dict[str, float | None] = {"drain": None, "burst": None}
        plan = self._plan
        producer = await open_producer(self._env.bootstrap_servers)
        runner = WorkerRunner(
            self._env,
            self._inputs,
            self._workdir,
            self._progress,
            producer=producer,
            idle_seconds=plan.idle_seconds,
            partitions=plan.partitions,
            prefix=self._prefix,
        )
        try:
            if plan.warmup_records:
                await runner.run("passthrough", "drain", plan.warmup_records, label="warm-up")
            for kind in KINDS:
                if kind in _PACE_FRACTIONS:
                    rates[kind] = rate = _pace(runs, _PACE_FRACTIONS[kind])
                    if rate is None:
                        break
                    self._progress(f"{self._prefix}: {kind} runs at {rate:,.0f} records/s")
                impls = [i for i in self._impls if i in plan.only.get(kind, self._impls)]
                rounds = plan.queued_rounds or plan.rounds if kind in _QUEUED else plan.rounds
                for round_index in range(rounds):
                    shift = round_index % len(impls)
                    order = impls[shift:] + impls[:shift]
                    label = f"{self._prefix} round {round_index + 1}/{rounds}"
                    runs.extend(await self._batch(runner, order, kind, rates[kind], label))
        finally:
            await producer.stop()
        paced = rates.get("paced")
        return PipelineResults(
            results={impl: _summarize(impl, runs, paced) for impl in self._impls},
            runs=runs,
            paced_rate=paced,
            peak_rss_mib={impl: _peak(impl, runs) for impl in self._impls},
            light_rate=rates.get("light"),
        )

    async def _batch(
        self, runner: WorkerRunner, order: list[str], kind: str, rate: float | None, label: str
    ) -> list[RunResult]:
        def one(impl: str) -> Any:
            return runner.run(impl, kind, self._count(impl, kind), rate=rate, label=label)

        if self._plan.concurrent:
            return list(await asyncio.gather(*(one(impl) for impl in order)))
        return [await one(impl) for impl in order]

    def _count(self, impl: str, kind: str) -> int:
        plan = self._plan
        slow = impl in SLOW_IMPLS
        if kind == "paced":
            return plan.slow_paced_records if slow else plan.paced_records
        if kind == "light":  # a quarter of the paced count: the same seconds at 1/4 the rate
            return max(1, (plan.slow_paced_records if slow else plan.paced_records) // 4)
        return plan.slow_records if slow else plan.records


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
    cpu = [run.cpu_us_per_record for run in good if run.cpu_us_per_record is not None]
    summary: dict[str, Any] = {
        "records_per_s": round(median([r.records_per_s or 0.0 for r in good]), 1),
        "cpu_us_per_record": round(median(cpu), 2) if cpu else {"error": "no stats file"},
    }
    kinds = (("burst", "latency_ms"), ("paced", "paced_latency_ms"), ("light", "light_latency_ms"))
    for kind, key in kinds:
        these = [run for run in mine if run.kind == kind]
        latency = _median_latency([run for run in these if run.error is None])
        if latency is None:
            why = "; ".join(sorted({run.error or "" for run in these}))
            if not these:
                why = "not run: no passthrough rate to pace at" if rate is None else "not run"
                why = "not run in this mode" if rate is not None else why
            summary[key] = {"error": why}
        else:
            summary[key] = latency
    return summary


def _peak(impl: str, runs: list[RunResult]) -> float | None:
    peaks = [r.peak_rss_mib for r in runs if r.impl == impl and r.peak_rss_mib is not None]
    return max(peaks) if peaks else None
