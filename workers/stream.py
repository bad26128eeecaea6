"""The stream workers' entry points, and what they do as a whole.

Encrypt, decrypt and rewrap differ only in their `Transform` (`workers.transforms`: how a
batch of values and a record's headers change); everything about Kafka lives once, in
`workers.loop.StreamWorker`, with commits in `workers.commits` and pausing in `workers.flow`:

* A consumer group reads the source with `getmany` (auto-commit off, `earliest`).
* A whole fetched batch is transformed in one call (`seal_many` / `open_many`), then its
  outputs are handed to an `acks=all` producer as one batch per partition
  (`workers.outbox`), compressed with `ENVPIPE_COMPRESSION`.
  Key, timestamp and headers pass through; tombstones stay tombstones.
* A separate committer task takes batches in fetch order, waits until every output record of
  a batch (dead letters included) is acknowledged, and only then commits `last offset + 1`
  per partition. While it waits, the main loop transforms the next batch (pipelining).
* Records that cannot be processed go to the dead-letter topic with their original bytes and
  `envpipe.error` / `envpipe.source` headers. Without a DLQ, the worker stops instead and
  commits nothing from that batch on, so the record is read again after the problem is fixed.
* A retriable error (KMS down, DEK spent) never writes plaintext and never skips or
  dead-letters: the batch is held, partitions are paused, and it is retried with jittered
  exponential backoff until it goes through or the worker is told to stop.
* Backpressure: above `max_inflight_records` / `max_inflight_bytes` read-but-unacknowledged,
  the assignment is paused (the consumer drops prefetched data rather than buffering it) and
  resumed once below half of both limits.
* Rebalances: before partitions are revoked, the listener waits for in-flight batches to be
  acknowledged and committed; anything still in flight after that is never committed by this
  member (a generation counter guards every commit), so at worst it is processed twice.
* SIGTERM / SIGINT / `--stop-when-idle`: stop fetching, drain, commit, close, exit 0.
  SIGHUP drops every cached DEK at once (after a key is destroyed, say).
* v2 (`ENVPIPE_FORMAT=v2`): the encrypt worker creates the compacted keys topic if missing
  and publishes each DEK's header there (acks=all) before any record under it; readers load
  the keys topic of their source at start and follow it.

Topics: the destination and DLQ are created if missing, with the source topic's partition
count (so the default partitioner maps a key to the same partition number as in the source)
and a replication factor of min(3, brokers). If that fails, the broker's auto-creation or an
operator's topics are used as they are.

Stats: with ``ENVPIPE_STATS_FILE=PATH`` in the environment a worker writes, on exit, a JSON
object with `direction`, `records_in`, `records_out` (every record written to the
destination, tombstones included), `dlq`, `tombstones`, `active_seconds` (first fetch to
last acknowledgement), `records_per_s`, `cpu_seconds` (process CPU in that period),
`latency_ms` (`p50`, `p99`, `p999`: acknowledgement time minus the source record's
timestamp), `kms_calls` (per KMS operation), `cache` (DEK cache events),
`envelope_overhead_bytes` (mean envelope size minus plaintext size, either direction; null
if nothing was sealed or opened), plus `dlq_reasons`, `pauses` (how often consumption was
paused, by reason: `backpressure`, `kms`), `records_in_by_partition` and
`assigned_partitions` (every partition this worker held).

Dead-letter headers and reason codes are the record contract (`workers.contract`). An
encrypt DLQ holds the *plaintext* of what it could not seal: protect it like the source.

Metrics: with `ENVPIPE_METRICS_PORT` a worker serves Prometheus metrics read from the state
above at scrape time (`workers.metrics`), so they cost nothing per record.

Exit codes: 0 after a clean stop; 1 if the worker had to stop on an error it cannot handle
(a record that cannot be sealed with no DLQ, a KMS request refused for good, a produce that
failed after the producer's own retries); 2 (from the CLI) for configuration errors and an
unreachable broker.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import Settings
from workers.contract import STATS_FILE_ENV
from workers.jobs import Job, keys_topic_of
from workers.loop import StreamWorker
from workers.runtime import configure_logging, run
from workers.transforms import Open, Rewrap, Seal, Transform

__all__ = ["run_decrypt", "run_encrypt", "run_passthrough", "run_rewrap", "run_transform"]


def run_encrypt(
    settings: Settings,
    *,
    source: str,
    dest: str,
    group: str,
    dlq: str | None,
    stream: str | None,
    stop_when_idle: float | None,
) -> int:
    """`envpipe encrypt`: seal a plaintext topic into an encrypted one. Returns the exit code."""
    transform = Seal(settings, stream=stream or source)
    return _run(settings, transform, _job(settings, source, dest, group, dlq, stop_when_idle))


def run_decrypt(
    settings: Settings,
    *,
    source: str,
    dest: str,
    group: str,
    dlq: str,
    stop_when_idle: float | None,
) -> int:
    """`envpipe decrypt`: open an encrypted topic into a plaintext one; failures to `dlq`."""
    job = _job(settings, source, dest, group, dlq, stop_when_idle)
    return _run(settings, Open(settings), job)


def run_rewrap(
    settings: Settings,
    *,
    source: str,
    dest: str,
    group: str,
    dlq: str,
    to_key: str,
    stop_when_idle: float | None,
) -> int:
    """`envpipe rewrap`: open each envelope, seal it again under `to_key`; failures to `dlq`."""
    job = _job(settings, source, dest, group, dlq, stop_when_idle)
    return _run(settings, Rewrap(settings, to_key=to_key), job)


def run_passthrough(
    settings: Settings, *, source: str, dest: str, group: str, stop_when_idle: float | None
) -> int:
    """The same loop copying records unchanged: the baseline for throughput comparisons."""
    return run_transform(
        settings, Transform(), source=source, dest=dest, group=group, stop_when_idle=stop_when_idle
    )


def run_transform(
    settings: Settings,
    transform: Transform,
    *,
    source: str,
    dest: str,
    group: str,
    dlq: str | None = None,
    stop_when_idle: float | None = None,
) -> int:
    """The loop with any `Transform` (benchmark baselines, experiments). Returns the exit code."""
    return _run(settings, transform, _job(settings, source, dest, group, dlq, stop_when_idle))


def _job(  # noqa: PLR0917 - a private constructor of the five fields
    settings: Settings,
    source: str,
    dest: str,
    group: str,
    dlq: str | None,
    stop_when_idle: float | None,
) -> Job:
    return Job(
        source,
        dest,
        group,
        dlq,
        stop_when_idle,
        keys_out=keys_topic_of(dest, settings.keys_topic),
        keys_in=keys_topic_of(source, settings.keys_topic),
    )


def _run(settings: Settings, transform: Transform, job: Job) -> int:
    configure_logging(settings.log_level, settings.log_format)
    stats_file = os.environ.get(STATS_FILE_ENV) or None
    worker = StreamWorker(settings, transform, job)
    return run(worker.run(Path(stats_file) if stats_file else None))
