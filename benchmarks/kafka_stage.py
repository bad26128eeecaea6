"""Stage 5: the pipeline stage again, on Apache Kafka (what users run) instead of Tansu.

One Apache Kafka 4 node in KRaft mode from its Maven jars (`dev.up(..., broker="kafka")`),
with its own moto; the passthrough, encrypt and decrypt workers run there exactly as in the
pipeline stage (`benchmarks.pipeline_stage`), on inputs sealed under that moto's keys. On
Apache Kafka the workers' producers are idempotent (detected, as in production). Without
Java 17 and Maven (or the jars already cached) the stage is skipped, and says why.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.envelopes import prepare_inputs, random_pairs
from benchmarks.measure import Progress
from benchmarks.pipeline_stage import PipelinePlan, PipelineResults, PipelineStage
from pipeline.errors import ServiceError
from workers import dev
from workers.dev import apache_kafka, kafka_jars

IMPLS = ("passthrough", "envpipe_encrypt", "envpipe_decrypt")
_READY_TIMEOUT = 120.0


def unavailable() -> str | None:
    """Why Apache Kafka cannot run here (no Java 17+, no Maven and no cached jars), or None."""
    try:
        kafka_jars.java_binary()
        if kafka_jars.verify(kafka_jars.cache_dir(apache_kafka.kafka_version())) is not None:
            kafka_jars.maven_binary()
    except ServiceError as exc:
        return str(exc)
    return None


async def run_kafka_stage(
    plan: PipelinePlan, workdir: Path, progress: Progress, stream: str
) -> tuple[dict[str, Any], PipelineResults | None]:
    """results.json's `kafka` entry (or why it was skipped), and the stage's runs."""
    why = unavailable()
    if why is not None:
        progress(f"Apache Kafka: skipped: {why}")
        return {"skipped": why}, None
    state = Path(tempfile.mkdtemp(prefix="envpipe-bench-kafka-"))
    try:
        progress("Apache Kafka: starting one KRaft node (and its own moto)")
        try:
            env = dev.up(state, broker="kafka", ready_timeout=_READY_TIMEOUT)
        except ServiceError as exc:
            progress(f"Apache Kafka: skipped: it did not start: {exc}")
            return {"skipped": f"it did not start: {exc}"}, None
        try:
            inputs, _ = await prepare_inputs(env.as_environ(), random_pairs(), stream)
            stage = PipelineStage(env, plan, inputs, workdir, progress, impls=IMPLS, prefix="kafka")
            pipeline = await stage.run()
        finally:
            dev.down(state)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    entry = {
        "broker": f"Apache Kafka {apache_kafka.kafka_version()} (KRaft, one node, loopback)",
        "pipeline": pipeline.results,
        "paced_rate": pipeline.paced_rate,
        "light_rate": pipeline.light_rate,
    }
    return entry, pipeline
