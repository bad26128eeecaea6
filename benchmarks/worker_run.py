"""One worker process measured end to end: its topics, its input, its start, its stats file.

Every stage that runs workers (`pipeline_stage`, `codec_stage`, `provider_stage`, and the
pipeline stage again on Apache Kafka) runs them through `WorkerRunner.run`, so each figure is
taken the same way everywhere. Every run gets fresh topics (created by the harness, with the
source's partition count) and a fresh consumer group. Three ways to feed it:

* *drain*: the records are produced before the worker starts; `records_per_s` is the
  output's growth between 10% and 90% of them, read from end offsets by the harness, the
  same way for every implementation. Nothing else competes for the CPU meanwhile, so the
  worker's `cpu_seconds / records_in` is its CPU per record.
* *burst*, *paced*, *light*: one warm-up record (timestamped an hour ahead, so it can never
  count as slow) is produced, the worker started, and its output awaited: the worker has
  joined its group and fetched its keys. Then the records come at `rate` (as fast as the
  harness can, for a burst). Latency is the worker's own figure: acknowledgement time minus
  the source record's timestamp.

With a `KafkaProxy` in front of the broker, a run also counts the Produce-request bytes the
worker's client id sent: what reaches the broker per record, compression included.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.load import OutputWatch, Pair, produce
from benchmarks.measure import Progress
from benchmarks.rigs.kafka_proxy import KafkaProxy
from benchmarks.services import Child, child_environ
from pipeline.keys_topic import KeysTopicWriter
from workers import dev
from workers.contract import STATS_FILE_ENV
from workers.topics import create_topics

_WARMUP_SHIFT_MS = 3_600_000
_START_TIMEOUT = 90.0
_PERCENTILES = ("p50", "p99", "p999")


@dataclass(frozen=True)
class Inputs:
    """What the workers are fed: plaintext pairs, and the same sealed by envpipe (v1, v2)."""

    plain: Sequence[Pair]
    sealed: Sequence[Pair] = ()
    sealed_v2: Sequence[Pair] = ()
    #: (dek_id, header) of every DEK `sealed_v2` uses, for the decrypt worker's keys topic
    headers_v2: Sequence[tuple[bytes, bytes]] = ()
    #: bytes envpipe's v1 envelope adds to these values (what `passthrough_padded` appends)
    overhead: int = 0


@dataclass(frozen=True)
class WorkerKind:
    """How to start one implementation: module, arguments, environment, input, client id."""

    module: str
    args: tuple[str, ...]
    feed: str = "plain"  # "plain", "sealed" or "sealed_v2"
    environ: Mapping[str, str] = field(default_factory=dict)
    #: the Kafka client id of its producer (`envpipe-<direction>`), for the proxy's counts
    client_id: str = ""
    dlq: bool = False


_FORMAT = "ENVPIPE_FORMAT"
WORKERS = {
    "passthrough": WorkerKind(
        "benchmarks.pipeline_worker", ("passthrough",), client_id="envpipe-passthrough"
    ),
    "passthrough_padded": WorkerKind(
        "benchmarks.pipeline_worker",
        ("passthrough_padded",),
        client_id="envpipe-passthrough_padded",
    ),
    "envpipe_encrypt": WorkerKind(
        "workers.cli", ("encrypt",), environ={_FORMAT: "v1"}, client_id="envpipe-encrypt"
    ),
    "envpipe_encrypt_v2": WorkerKind(
        "workers.cli", ("encrypt",), environ={_FORMAT: "v2"}, client_id="envpipe-encrypt"
    ),
    "envpipe_decrypt": WorkerKind(
        "workers.cli", ("decrypt",), feed="sealed", client_id="envpipe-decrypt", dlq=True
    ),
    "envpipe_decrypt_v2": WorkerKind(
        "workers.cli", ("decrypt",), feed="sealed_v2", client_id="envpipe-decrypt", dlq=True
    ),
    "faust_encrypt": WorkerKind("faust", ("-A", "workers.faust_app", "worker", "-l", "warn")),
}


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
    #: the worker's CPU time per record read (stats file: cpu_seconds / records_in)
    cpu_us_per_record: float | None = None
    #: Produce-request bytes per record written, as counted by a proxy (None without one)
    broker_bytes_per_record: float | None = None
    #: what distinguishes this run beyond its implementation (a codec, a provider)
    variant: str = ""
    error: str | None = None


class WorkerRunner:
    """Runs one worker at a time against `env` (through `proxy`, if given)."""

    def __init__(
        self,
        env: dev.DevEnv,
        inputs: Inputs,
        workdir: Path,
        progress: Progress,
        *,
        producer: Any,
        idle_seconds: float,
        partitions: int = 3,
        proxy: KafkaProxy | None = None,
        prefix: str = "bench",
    ) -> None:
        self.env = env
        self.inputs = inputs
        self._workdir = workdir
        self._progress = progress
        self._producer = producer
        self._idle = f"{idle_seconds:g}"
        self._partitions = partitions
        self._proxy = proxy
        self._prefix = prefix
        self._sequence = 0

    async def run(
        self,
        impl: str,
        kind: str,
        count: int,
        *,
        rate: float | None = None,
        label: str = "",
        variant: str = "",
        extra_env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> RunResult:
        """One worker process: its input, its start, the measured records, its idle stop.

        `prefix` starts the worker under another program (`benchmarks.profile_worker`'s
        py-spy); its peak RSS is then that program's.
        """
        self._sequence += 1
        tag = f"{self._prefix}-{self._sequence:03d}-{impl}{f'-{variant}' if variant else ''}-{kind}"
        source, dest = f"{tag}-in", f"{tag}-out"
        worker = WORKERS[impl]
        result = RunResult(impl, kind, count, rate, variant=variant)
        started = time.monotonic()
        await self._feed_before_start(worker, kind, source, dest, count)
        stats_file = self._workdir / f"{tag}.json"
        module, args, extra = self._command(impl, source, dest, tag)
        environ = child_environ(
            self.env, {**extra, **(extra_env or {}), STATS_FILE_ENV: str(stats_file)}
        )
        counted_before = self._produce_bytes(worker)
        child = Child(module, args, environ, self._workdir / f"{tag}.log", prefix=prefix)
        watch = OutputWatch(self.env.bootstrap_servers, dest, self._partitions)
        try:
            await watch.start()
            await self._feed_while_running(result, worker, child, watch, source)
        finally:
            await watch.stop()
            ended = await child.stop()  # returns at once if it has exited; else ends it
        result.peak_rss_mib = ended.peak_rss_mib
        result.seconds = time.monotonic() - started
        if kind == "drain":
            result.records_per_s = watch.rate_between(count // 10, count * 9 // 10)
        if result.error is None:
            read_stats(result, stats_file, ended.code, child)
        else:
            result.error += f" (worker exit code {ended.code}); log: {child.tail(3)}"
        if result.error is None and self._proxy is not None:
            written = int(result.stats.get("records_out", 0))
            sent = self._produce_bytes(worker) - counted_before
            result.broker_bytes_per_record = round(sent / written, 1) if written else None
        self._progress(progress_line(result, label))
        return result

    async def _feed_before_start(
        self, worker: WorkerKind, kind: str, source: str, dest: str, count: int
    ) -> None:
        """Topics (the outputs too, so watching cannot create them), v2 headers, then either
        every record (a drain) or the one warm-up record."""
        keys_topic = [f"{source}.keys"] if worker.feed == "sealed_v2" else []
        topics = [source, dest, f"{dest}-dlq", *keys_topic]
        await create_topics(self.env.bootstrap_servers, topics, self._partitions)
        if keys_topic:
            keys = KeysTopicWriter(self._producer, keys_topic[0])
            for dek_id, header in self.inputs.headers_v2:
                await keys.publish(dek_id, header)
        pairs: Sequence[Pair] = getattr(self.inputs, worker.feed)
        if kind == "drain":
            await produce(self._producer, source, pairs, count, partitions=self._partitions)
        else:
            shift = _WARMUP_SHIFT_MS
            await produce(self._producer, source, pairs, 1, partitions=1, timestamp_shift_ms=shift)

    async def _feed_while_running(
        self, result: RunResult, worker: WorkerKind, child: Child, watch: OutputWatch, source: str
    ) -> None:
        """A drain is watched; otherwise the records come at the rate once the worker is up."""
        count = result.records
        if result.kind == "drain":
            watch.sample_in_background()
        elif await _started(child, watch):
            pairs: Sequence[Pair] = getattr(self.inputs, worker.feed)
            seconds = await produce(
                self._producer,
                source,
                pairs,
                count,
                partitions=self._partitions,
                rate=result.rate,
            )
            result.produced_per_s = round(count / seconds, 1)
        else:
            result.error = "the warm-up record never came out"
        if result.error is None:
            await child.wait(within=_START_TIMEOUT + count / 500)

    def _produce_bytes(self, worker: WorkerKind) -> int:
        return self._proxy.produce_bytes[worker.client_id] if self._proxy is not None else 0

    def _command(
        self, impl: str, source: str, dest: str, group: str
    ) -> tuple[str, list[str], dict[str, str]]:
        """The module, arguments and extra environment that start `impl` (the real CLIs)."""
        worker = WORKERS[impl]
        args = list(worker.args)
        environ = dict(worker.environ)
        if impl == "faust_encrypt":
            # The ready app, configured as its docs say: only through the environment.
            environ.update(
                {
                    "ENVPIPE_FAUST_SOURCE": source,
                    "ENVPIPE_FAUST_ENCRYPTED": dest,
                    "ENVPIPE_FAUST_APP_ID": group,
                    "ENVPIPE_FAUST_STOP_WHEN_IDLE": self._idle,
                    "FAUST_DATADIR": str(self._workdir / f"{group}-data"),  # not the temp dir
                }
            )
            return worker.module, args, environ
        args += ["--source", source, "--dest", dest, "--group", group]
        args += ["--stop-when-idle", self._idle]
        if worker.dlq:
            args += ["--dlq", f"{dest}-dlq"]
        if impl == "passthrough_padded":
            args += ["--pad", str(self.inputs.overhead)]
        return worker.module, args, environ


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


def read_stats(result: RunResult, stats_file: Path, code: int, child: Child) -> None:
    """Check the worker's stats file; take the run's latency and CPU per record from it."""
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
    records_in = int(result.stats.get("records_in", 0))
    cpu = result.stats.get("cpu_seconds")
    if records_in and isinstance(cpu, int | float):
        result.cpu_us_per_record = round(cpu / records_in * 1e6, 2)
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
    if any(latency.get(name) is None for name in _PERCENTILES):
        result.error = "worker recorded no latency"
        return
    result.latency_ms = {name: round(float(latency[name]), 2) for name in _PERCENTILES}


def progress_line(result: RunResult, label: str) -> str:
    """One line per run for the progress log."""
    name = f"{result.impl}{f' {result.variant}' if result.variant else ''}"
    head = f"{label} {result.kind:<5} {name:<24}"
    if result.error is not None:
        return f"{head} FAILED: {result.error}"
    if result.latency_ms is None:
        figure = f"{result.records_per_s or 0:>9,.0f} records/s"
        if result.cpu_us_per_record is not None:
            figure += f", {result.cpu_us_per_record:.1f} µs CPU/record"
        if result.broker_bytes_per_record is not None:
            figure += f", {result.broker_bytes_per_record:,.0f} B/record at the broker"
    else:
        latency = result.latency_ms
        figure = f"latency p50 {latency['p50']:,.1f} p99 {latency['p99']:,.1f} ms"
    return f"{head} {result.records:>7,} records: {figure} ({result.seconds:.1f}s)"
