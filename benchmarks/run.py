"""`envpipe bench`: every stage in one run, then the report.

Stages, in order: on one embedded broker and moto, the envelope sizes (exact, per format and
value size, and how the demo's JSON compresses before and after sealing), the crypto stage
(`crypto_stage`), the KMS budget (`kms_budget`) and the pipeline stage (`pipeline_stage`);
then, each on services of its own, the codec stage (`codec_stage`: bytes at the broker behind
a counting proxy), the provider stage (`provider_stage`: aws, vault, pkcs11) and the pipeline
stage on Apache Kafka (`kafka_stage`, skipped with a reason without Java 17 and Maven).

Modes: `full` (about twenty minutes), `quick` (four to five: one round, burst and paced runs
only for the v1 workers, the codec table's trade-off rows only, no Apache Kafka), `smoke` (tiny
counts, runs overlapping; it exercises every code path for the test suite and its figures
mean nothing). Most of a run is fixed cost per worker: the embedded broker answers a group
join after half the session timeout, 5 s. Progress goes to stderr; the files go to `--out`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from benchmarks.assemble import Measured, details_json, results_json
from benchmarks.codec_stage import CodecPlan, run_codec_stage
from benchmarks.crypto_impls import STREAM, ImplContext
from benchmarks.crypto_stage import CryptoPlan, run_crypto_stage
from benchmarks.envelopes import json_compression, overhead_by_size, prepare_inputs, random_pairs
from benchmarks.kafka_stage import run_kafka_stage
from benchmarks.kms_budget import measure_kms_budget
from benchmarks.measure import Progress, machine_info
from benchmarks.pipeline_stage import PipelinePlan, PipelineStage
from benchmarks.provider_stage import ProviderPlan, run_provider_stage
from benchmarks.report import write_all
from benchmarks.report_targets import goals, targets
from benchmarks.services import child_environ, dev_services
from pipeline.config import load_settings
from workers.runtime import run as run_async

#: the rows the light runs need (the light-load goal compares these with the passthrough)
_LIGHT = (
    "passthrough",
    "envpipe_encrypt",
    "envpipe_encrypt_v2",
    "envpipe_decrypt",
    "envpipe_decrypt_v2",
)
#: the v1 rows the quick mode's burst and paced runs keep (the issue-4 targets need them)
_QUICK_QUEUED = ("passthrough", "envpipe_encrypt", "envpipe_decrypt")
#: the quick mode's codec table: the v1/v2 trade-off rows and the passthrough beside them
_QUICK_CODECS = (
    ("passthrough", ("none", "lz4", "zstd")),
    ("envpipe_encrypt", ("none", "lz4", "zstd")),
    ("envpipe_encrypt_v2", ("none", "lz4")),
)


@dataclass(frozen=True)
class Plan:
    """Everything a mode decides."""

    crypto: CryptoPlan
    pipeline: PipelinePlan
    kms_records: int
    codecs: CodecPlan
    providers: ProviderPlan
    #: the pipeline stage on Apache Kafka; None: not in this mode
    kafka: PipelinePlan | None


PLANS = {
    "smoke": Plan(
        CryptoPlan(
            rounds=1,
            budget_seconds=0.02,
            max_records=200,
            warmup_records=20,
            batch_records=200,
            batch_repeats=2,
        ),
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
        codecs=CodecPlan(records=500, rounds=1, idle_seconds=1.0, concurrent=True),
        providers=ProviderPlan(calls=10, records=500, rounds=1, idle_seconds=1.0),
        kafka=None,
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
            only={"burst": _QUICK_QUEUED, "paced": _QUICK_QUEUED, "light": _LIGHT},
        ),
        kms_records=1_200_000,
        codecs=CodecPlan(records=30_000, rounds=1, idle_seconds=0.5, configs=_QUICK_CODECS),
        providers=ProviderPlan(calls=200, records=30_000, rounds=1, idle_seconds=1.0),
        kafka=None,
    ),
    "full": Plan(
        CryptoPlan(
            rounds=4, budget_seconds=1.0, max_records=200_000, warmup_records=500, batch_repeats=20
        ),
        PipelinePlan(
            records=100_000,
            paced_records=100_000,
            slow_records=30_000,
            slow_paced_records=15_000,
            rounds=3,
            idle_seconds=1.5,
            warmup_records=50_000,
            queued_rounds=2,
            only={"light": _LIGHT},
        ),
        kms_records=3_000_000,
        codecs=CodecPlan(records=40_000, rounds=2, idle_seconds=1.5, warmup_records=20_000),
        providers=ProviderPlan(calls=300, records=50_000, rounds=2, idle_seconds=1.5),
        kafka=PipelinePlan(
            records=100_000,
            paced_records=60_000,
            slow_records=0,
            slow_paced_records=0,
            rounds=2,
            idle_seconds=1.5,
            warmup_records=50_000,
            queued_rounds=1,
            only={"light": ("passthrough", "envpipe_encrypt", "envpipe_decrypt")},
        ),
    ),
}


def main(*, out: Path, quick: bool = False, smoke: bool = False) -> int:
    """Run the benchmark and write results.json, results.md, details.json and PNGs to `out`."""
    mode = "smoke" if smoke else "quick" if quick else "full"
    plan = PLANS[mode]
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: every service is stopped
    progress = Progress()
    machine = machine_info()
    machine["bench_mode"] = mode
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    progress(f"{mode} run; starting the embedded broker and KMS")
    measured = _on_tansu(plan, logs, progress)
    measured.codecs = run_async(run_codec_stage(plan.codecs, logs, progress))
    measured.providers = run_async(run_provider_stage(plan.providers, logs, progress))
    if plan.kafka is None:
        measured.kafka = {"skipped": f"not in a {mode} run (full runs only)"}
        progress(f"Apache Kafka: {measured.kafka['skipped']}")
    else:
        measured.kafka, measured.kafka_pipeline = run_async(
            run_kafka_stage(plan.kafka, logs, progress, STREAM)
        )
    machine["seconds"] = round(progress.elapsed, 1)
    results, details = results_json(machine, mode, measured), details_json(plan, measured)
    written = write_all(out, results, details)
    for name, measured_value, met in [*goals(results), *targets(results, details)]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[met]
        progress(f"target {verdict:>12}: {name}: {measured_value}")
    progress(f"wrote {', '.join(str(path) for path in written)}")
    return 0


def _on_tansu(plan: Plan, logs: Path, progress: Progress) -> Measured:
    """The stages that share the default embedded broker and moto."""
    with dev_services() as env, _environ(env.as_environ()):
        environ = env.as_environ()
        settings = load_settings()
        inputs, sample = run_async(prepare_inputs(environ, random_pairs(), STREAM))
        overhead = run_async(overhead_by_size(environ, STREAM))
        compression = run_async(json_compression(environ, STREAM))
        progress(f"envelope overhead: v1 {overhead['v1']} B, v2 {overhead['v2']} B (by value size)")
        context = ImplContext(env.kms_endpoint, env.region, env.kms_key_canonical, sample)
        crypto = run_crypto_stage(child_environ(env), context, plan.crypto, progress)
        budget = run_async(measure_kms_budget(settings, plan.kms_records, progress))
        stage = PipelineStage(env, plan.pipeline, inputs, logs, progress)
        pipeline = run_async(stage.run())
    return Measured(
        inputs=inputs,
        overhead=overhead,
        json_compression=compression,
        crypto=crypto,
        budget=budget,
        pipeline=pipeline,
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


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


if __name__ == "__main__":
    sys.exit(main(out=Path(sys.argv[1] if len(sys.argv) > 1 else "bench-results")))
