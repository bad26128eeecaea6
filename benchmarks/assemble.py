"""What every stage measured, assembled into results.json and details.json.

results.json keeps every name issue 4 fixed (`machine`, `quick`, `crypto`, `pipeline`,
`kms_calls_per_million_records`, `envelope_overhead_bytes`, `peak_rss_mib`) and adds, for the
compact-v2 and encrypt-CPU issue: `envelope_overhead_bytes_v2`, `overhead_bytes` (per format
and value size), `crypto_batch` (whole-batch seal per record, `seal_many` over `aead_only`),
`codecs`, `json_compression`, `providers` and `kafka`; each pipeline row gains
`cpu_us_per_record` and `light_latency_ms`. details.json holds what a reader needs to trust
them: counts, configurations, every run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.codec_stage import CodecResults
from benchmarks.crypto_stage import CryptoResults
from benchmarks.kms_budget import KmsBudget
from benchmarks.pipeline_stage import PipelineResults
from benchmarks.provider_stage import ProviderResults
from benchmarks.worker_run import Inputs, RunResult
from pipeline.config import Settings


@dataclass
class Measured:
    """Every stage's outcome; the later stages are filled in as they finish."""

    inputs: Inputs
    overhead: dict[str, dict[str, int]]
    json_compression: dict[str, Any]
    crypto: CryptoResults
    budget: KmsBudget
    pipeline: PipelineResults
    codecs: CodecResults | None = None
    providers: ProviderResults | None = None
    kafka: dict[str, Any] = field(default_factory=dict)
    kafka_pipeline: PipelineResults | None = None


def results_json(machine: dict[str, Any], mode: str, measured: Measured) -> dict[str, Any]:
    """results.json: issue 4's shape, plus the keys named in the module docstring."""
    peak: dict[str, Any] = {}
    crypto, pipeline = measured.crypto, measured.pipeline
    for impl, mib in {**crypto.peak_rss_mib, **pipeline.peak_rss_mib}.items():
        peak[impl] = mib if mib is not None else {"error": "not measured (the run failed)"}
    return {
        "machine": machine,
        "quick": mode != "full",
        "crypto": crypto.results,
        "pipeline": pipeline.results,
        "kms_calls_per_million_records": measured.budget.per_million,
        "envelope_overhead_bytes": measured.inputs.overhead,
        "peak_rss_mib": peak,
        "envelope_overhead_bytes_v2": measured.overhead["v2"]["1024"],
        "overhead_bytes": measured.overhead,
        "crypto_batch": crypto.batch,
        "codecs": measured.codecs.results if measured.codecs else {},
        "json_compression": measured.json_compression,
        "providers": measured.providers.results if measured.providers else {},
        "kafka": measured.kafka,
    }


def details_json(plan: Any, measured: Measured) -> dict[str, Any]:
    """What a reader needs to trust the figures: counts, configurations, every run."""
    budget = measured.budget
    max_records = Settings().dek_max_records
    per_dek = budget.per_dek
    pipeline = measured.pipeline
    details: dict[str, Any] = {
        "crypto": measured.crypto.details,
        "kms_budget": {
            "records": budget.records,
            "calls": dict(budget.calls),
            "deks": budget.deks,
            "calls_per_dek": per_dek,
            "checkpoints": budget.checkpoints,
            "flat": per_dek is not None
            and per_dek <= 3
            and budget.deks <= budget.records / max_records + 2,
        },
        "pipeline": _pipeline_details(plan.pipeline, pipeline),
        "codecs": {
            "plan": asdict(plan.codecs),
            "runs": _runs(measured.codecs.runs if measured.codecs else []),
        },
        "providers": {
            "plan": asdict(plan.providers),
            "runs": _runs(measured.providers.runs if measured.providers else []),
        },
    }
    if measured.kafka_pipeline is not None and plan.kafka is not None:
        details["kafka"] = _pipeline_details(plan.kafka, measured.kafka_pipeline)
    return details


def _pipeline_details(plan: Any, pipeline: PipelineResults) -> dict[str, Any]:
    return {
        "plan": asdict(plan),
        "rounds": plan.rounds,
        "paced_rate": pipeline.paced_rate,
        "light_rate": pipeline.light_rate,
        "runs": _runs(pipeline.runs),
    }


def _runs(runs: list[RunResult]) -> list[dict[str, Any]]:
    return [asdict(run) for run in runs]
