"""Stage 3: wire formats and compression, as bytes that reach the broker, CPU and throughput.

Every `ENVPIPE_COMPRESSION` codec for the passthrough and for `envpipe encrypt` in v1, and the
v2 encrypt worker with the codecs a v2 user would weigh, each as a drain of the same JSON
values of at most 1 KiB (`benchmarks.envelopes.json_values`: the demo's orders; random values
would not compress in either case and hide what encryption does to compression).

The broker here is a fresh embedded one that advertises a `KafkaProxy` in front of it (as the
memory benchmark's throttle), so every Produce request a worker sends is counted by its client
id on its way to the broker: `broker_bytes_per_record` is that count over the records the
worker wrote, request and batch framing and the v2 keys topic included. The proxy copies every
byte in this process, so absolute rates here are below the pipeline stage's: compare within
the table. Configurations interleave over rounds (rotating order); figures are medians.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.envelopes import json_values
from benchmarks.load import open_producer
from benchmarks.measure import Progress, median
from benchmarks.rigs.kafka_proxy import KafkaProxy
from benchmarks.worker_run import Inputs, RunResult, WorkerRunner
from workers import dev

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
#: (implementation, codecs) measured; v2 with the codecs its trade-off table shows
CONFIGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("passthrough", CODECS),
    ("envpipe_encrypt", CODECS),
    ("envpipe_encrypt_v2", ("none", "lz4", "zstd")),
)
_LOAD_CLIENT_ID = "envpipe-bench-load"
_FIGURES = ("broker_bytes_per_record", "cpu_us_per_record", "records_per_s")


@dataclass(frozen=True)
class CodecPlan:
    """Records per drain, rounds, and the workers' idle stop."""

    records: int
    rounds: int
    idle_seconds: float
    #: an unmeasured passthrough drain first: the first run on a fresh broker is slow
    warmup_records: int = 0
    #: every configuration at once (the smoke test only: the counts then mix)
    concurrent: bool = False
    #: (implementation, codecs) to measure
    configs: tuple[tuple[str, tuple[str, ...]], ...] = CONFIGS


@dataclass
class CodecResults:
    """results.json's `codecs`, and every run for details.json."""

    results: dict[str, Any]
    runs: list[RunResult]


async def run_codec_stage(plan: CodecPlan, workdir: Path, progress: Progress) -> CodecResults:
    """A broker behind a counting proxy, then every configuration's drains in rounds."""
    proxy = await KafkaProxy(exempt_client_id=_LOAD_CLIENT_ID).start()
    state = Path(tempfile.mkdtemp(prefix="envpipe-bench-codecs-"))
    try:
        env = dev.up(state, advertised_port=proxy.port)
        try:
            host, _, port = env.bootstrap_servers.rpartition(":")
            proxy.upstream = (host, int(port))
            runs = await _drains(env, proxy, plan, workdir, progress)
        finally:
            dev.down(state)
    finally:
        await proxy.close()
        shutil.rmtree(state, ignore_errors=True)
    return CodecResults(summarize(runs, plan.configs), runs)


async def _drains(
    env: dev.DevEnv, proxy: KafkaProxy, plan: CodecPlan, workdir: Path, progress: Progress
) -> list[RunResult]:
    values = json_values()
    mean = sum(len(value) for _, value in values) / len(values)
    progress(f"codecs: {len(values)} JSON values of {mean:,.0f} B on average, through a proxy")
    producer = await open_producer(env.bootstrap_servers)
    runner = WorkerRunner(
        env,
        Inputs(values),
        workdir,
        progress,
        producer=producer,
        idle_seconds=plan.idle_seconds,
        proxy=proxy,
        prefix="codec",
    )
    grid = [(impl, codec) for impl, codecs in plan.configs for codec in codecs]
    runs: list[RunResult] = []
    try:
        if plan.warmup_records:
            await runner.run("passthrough", "drain", plan.warmup_records, label="codecs warm-up")
        for round_index in range(plan.rounds):
            shift = round_index % len(grid)
            label = f"codecs round {round_index + 1}/{plan.rounds}"

            def one(impl: str, codec: str, label: str = label) -> Any:
                compression = {"ENVPIPE_COMPRESSION": codec}
                return runner.run(
                    impl, "drain", plan.records, label=label, variant=codec, extra_env=compression
                )

            order = grid[shift:] + grid[:shift]
            if plan.concurrent:
                runs.extend(await asyncio.gather(*(one(impl, codec) for impl, codec in order)))
            else:
                runs.extend([await one(impl, codec) for impl, codec in order])
    finally:
        await producer.stop()
    return runs


def summarize(
    runs: Sequence[RunResult], configs: Sequence[tuple[str, tuple[str, ...]]] = CONFIGS
) -> dict[str, Any]:
    """Per implementation and codec: medians of the figures, and throughput x passthrough."""
    table: dict[str, Any] = {}
    for impl, codecs in configs:
        table[impl] = {}
        for codec in codecs:
            mine = [r for r in runs if (r.impl, r.variant) == (impl, codec)]
            good = [r for r in mine if r.error is None and r.broker_bytes_per_record]
            if not good:
                why = "; ".join(sorted({r.error or "nothing counted" for r in mine}))
                table[impl][codec] = {"error": why or "did not run"}
                continue
            cell: dict[str, Any] = {}
            for name in _FIGURES:
                values = [getattr(r, name) for r in good if getattr(r, name) is not None]
                cell[name] = round(median(values), 2) if values else None
            table[impl][codec] = cell
    for impl, codecs in configs:
        for codec in codecs:
            cell = table[impl][codec]
            base = table["passthrough"].get(codec, {})
            if "error" not in cell and cell.get("records_per_s") and base.get("records_per_s"):
                cell["x_passthrough"] = round(cell["records_per_s"] / base["records_per_s"], 3)
    return table
