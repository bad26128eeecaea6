"""`envpipe bench`: both stages in one run, on one embedded broker and KMS, then the report.

Modes: `full` (about fifteen minutes), `quick` (about two), `smoke` (tiny counts, pipeline
runs overlapping; it exercises every code path for the test suite and its figures mean
nothing). Progress goes to stderr; the files go to `--out`.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.crypto_impls import STREAM, ImplContext
from benchmarks.crypto_stage import CryptoPlan, CryptoResults, run_crypto_stage
from benchmarks.kms_budget import KmsBudget, measure_kms_budget
from benchmarks.load import Pair
from benchmarks.measure import Progress, machine_info
from benchmarks.pipeline_stage import Inputs, PipelinePlan, PipelineResults, PipelineStage
from benchmarks.report import light_load_rows, targets, write_all
from benchmarks.services import child_environ, dev_services
from pipeline.config import Settings, load_settings
from pipeline.encryptor import Encryptor
from pipeline.kms import CountingKms, open_kms
from workers.runtime import run as run_async

_VALUE_SIZE = 1024
_DISTINCT_RECORDS = 1000


@dataclass(frozen=True)
class Plan:
    """Everything a mode decides."""

    crypto: CryptoPlan
    pipeline: PipelinePlan
    kms_records: int


PLANS = {
    "smoke": Plan(
        CryptoPlan(rounds=1, budget_seconds=0.02, max_records=200, warmup_records=20),
        PipelinePlan(
            records=1000,
            paced_records=500,
            slow_records=300,
            slow_paced_records=200,
            rounds=1,
            idle_seconds=1.0,
            concurrent=True,
        ),
        kms_records=5000,
    ),
    "quick": Plan(
        CryptoPlan(rounds=2, budget_seconds=0.25, max_records=50_000, warmup_records=200),
        PipelinePlan(
            records=50_000,
            paced_records=30_000,
            slow_records=8_000,
            slow_paced_records=4_000,
            rounds=1,
            idle_seconds=1.0,
            warmup_records=20_000,
        ),
        kms_records=1_200_000,
    ),
    "full": Plan(
        CryptoPlan(rounds=5, budget_seconds=1.5, max_records=200_000, warmup_records=500),
        PipelinePlan(
            records=100_000,
            paced_records=100_000,
            slow_records=30_000,
            slow_paced_records=15_000,
            rounds=3,
            idle_seconds=1.5,
            warmup_records=50_000,
        ),
        kms_records=3_000_000,
    ),
}


def main(*, out: Path, quick: bool = False, smoke: bool = False) -> int:
    """Run the benchmark and write results.json, results.md, details.json and PNGs to `out`."""
    mode = "smoke" if smoke else "quick" if quick else "full"
    plan = PLANS[mode]
    progress = Progress()
    machine = machine_info()
    machine["bench_mode"] = mode
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    progress(f"{mode} run; starting the embedded broker and KMS")
    with dev_services() as env, _environ(env.as_environ()):
        settings = load_settings()
        inputs, sample = run_async(_prepare(settings))
        progress(f"envelope overhead at 1 KiB: {inputs.overhead} bytes")
        context = ImplContext(env.kms_endpoint, env.region, env.kms_key_canonical, sample)
        crypto = run_crypto_stage(child_environ(env), context, plan.crypto, progress)
        budget = run_async(measure_kms_budget(settings, plan.kms_records, progress))
        stage = PipelineStage(env, plan.pipeline, inputs, logs, progress)
        pipeline = run_async(stage.run())
    results = _results(
        machine, mode, crypto=crypto, budget=budget, pipeline=pipeline, inputs=inputs
    )
    details = _details(plan, crypto, budget, pipeline)
    written = write_all(out, results, details)
    for name, measured, met in targets(results, details):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[met]
        progress(f"target {verdict:>12}: {name}: {measured}")
    for name, measured in light_load_rows(details):
        progress(f"{'not a target':>19}: {name}: {measured}")
    progress(f"wrote {', '.join(str(path) for path in written)}")
    return 0


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """The dev services' variables for our own KMS clients, restored afterwards."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def _prepare(settings: Settings) -> tuple[Inputs, bytes]:
    """The pipeline's input records (plain and sealed) and one envelope for the floor."""
    rng = random.Random(11)
    plain: list[Pair] = [
        (f"key-{index:04d}".encode(), rng.randbytes(_VALUE_SIZE))
        for index in range(_DISTINCT_RECORDS)
    ]
    kms = CountingKms(await open_kms(settings))
    encryptor = await Encryptor.from_settings(kms, settings, stream=STREAM)
    try:
        sealed: list[Pair] = [
            (key, await encryptor.seal(value, key)) for key, value in plain if value is not None
        ]
    finally:
        await encryptor.close()
        await kms.close()
    overhead = len(sealed[0][1]) - _VALUE_SIZE
    return Inputs(plain, sealed, overhead), sealed[0][1]


def _results(
    machine: dict[str, Any],
    mode: str,
    *,
    crypto: CryptoResults,
    budget: KmsBudget,
    pipeline: PipelineResults,
    inputs: Inputs,
) -> dict[str, Any]:
    """results.json, in exactly the shape of issue 4."""
    peak: dict[str, Any] = {}
    for impl, mib in {**crypto.peak_rss_mib, **pipeline.peak_rss_mib}.items():
        peak[impl] = mib if mib is not None else {"error": "not measured (the run failed)"}
    return {
        "machine": machine,
        "quick": mode != "full",
        "crypto": crypto.results,
        "pipeline": pipeline.results,
        "kms_calls_per_million_records": budget.per_million,
        "envelope_overhead_bytes": inputs.overhead,
        "peak_rss_mib": peak,
    }


def _details(
    plan: Plan, crypto: CryptoResults, budget: KmsBudget, pipeline: PipelineResults
) -> dict[str, Any]:
    """What a reader needs to trust the figures: counts, configurations, every run."""
    max_records = Settings().dek_max_records
    per_dek = budget.per_dek
    return {
        "crypto": crypto.details,
        "kms_budget": {
            "records": budget.records,
            "calls": dict(budget.calls),
            "deks": budget.deks,
            "calls_per_dek": per_dek,
            "checkpoints": budget.checkpoints,
            "flat": per_dek is not None
            and per_dek <= 2
            and budget.deks <= budget.records / max_records + 2,
        },
        "pipeline": {
            "plan": asdict(plan.pipeline),
            "rounds": plan.pipeline.rounds,
            "paced_rate": pipeline.paced_rate,
            "light_rate": pipeline.light_rate,
            "runs": [asdict(run) for run in pipeline.runs],
        },
    }


if __name__ == "__main__":
    sys.exit(main(out=Path(sys.argv[1] if len(sys.argv) > 1 else "bench-results")))
