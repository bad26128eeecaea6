"""The stream workers: one consume -> transform -> produce -> commit loop for both directions.

Encrypt and decrypt differ only in their `Transform` (how a batch of values and a record's
headers change); everything about Kafka lives once, in `_Worker`:

* A consumer group reads the source with `getmany` (auto-commit off, `earliest`).
* A whole fetched batch is transformed in one call (`seal_many` / `open_many`), then its
  outputs are handed to an `acks=all` producer as one batch per partition
  (`workers.outbox`; no idempotence, no transactions: the embedded broker cannot do either).
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

Dead-letter reason codes: the decrypt side uses `pipeline.errors.Reason` (`malformed`,
`unknown_version`, `key_not_allowed`, `bad_signature`, `unwrap_failed`, `bad_tag`); the
encrypt side `too_large` (the envelope exceeds the producer's request size) and
`seal_failed` (an unexpected error sealing that one record). An encrypt DLQ holds the
*plaintext* of what it could not seal: protect it like the source topic.

Metrics: with `ENVPIPE_METRICS_PORT` a worker serves Prometheus metrics read from the state
above at scrape time (`workers.metrics`), so they cost nothing per record.

Exit codes: 0 after a clean stop; 1 if the worker had to stop on an error it cannot handle
(a record that cannot be sealed with no DLQ, a KMS request refused for good, a produce that
failed after the producer's own retries); 2 (from the CLI) for configuration errors and an
unreachable broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from pipeline.config import MIB, Settings
from pipeline.crypto import Decryptor, Encryptor
from pipeline.envelope import VERSION_HEADER
from pipeline.errors import DecryptionError, EnvpipeError
from pipeline.histogram import Histogram
from pipeline.kms.counting import CountingKms
from pipeline.retry import backoff_delay
from workers.kafka_access import KafkaAccess
from workers.metrics import MetricsServer, Snapshot
from workers.outbox import Outbox, RecordTooLarge
from workers.runtime import configure_logging, open_kms, run
from workers.stats import WorkerStats
from workers.topics import create_with

__all__ = [
    "ERROR_HEADER",
    "SOURCE_HEADER",
    "STATS_FILE_ENV",
    "DeadLetter",
    "Open",
    "Pair",
    "Seal",
    "Transform",
    "ensure_topics",
    "run_decrypt",
    "run_encrypt",
    "run_passthrough",
    "run_transform",
]

log = logging.getLogger("envpipe.stream")
#: Logged with the partitions whenever the group assigns some: tools wait for it.
ASSIGNED_LOG = "partitions assigned:"

#: Environment variable naming the JSON stats file a worker writes on exit.
STATS_FILE_ENV = "ENVPIPE_STATS_FILE"
#: Headers added to a dead-lettered record.
ERROR_HEADER = "envpipe.error"
SOURCE_HEADER = "envpipe.source"

_VERSION_NAME = VERSION_HEADER[0]
_PROGRESS_SECONDS = 5.0
_DRAIN_SECONDS = 30.0
_REVOKE_WAIT_SECONDS = 30.0
_RESUME_FRACTION = 0.5
_BACKPRESSURE, _KMS = "backpressure", "kms"
_MAX_REPLICATION = 3

T = TypeVar("T")
Pair = tuple[bytes, bytes | None]  # (value, key), the crypto layer's record
Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A transform's verdict that one record cannot be processed, and why (a reason code)."""

    reason: str


# --- transforms ------------------------------------------------------------------------------


class Transform:
    """How one direction changes records. This base class copies them (the benchmark baseline).

    `values` maps a batch of non-null (value, key) pairs to outputs in the same order; it may
    raise a retriable `EnvpipeError` for the whole batch (the worker retries it) or return a
    `DeadLetter` in place of a record that cannot be processed.
    """

    direction = "passthrough"
    #: +1 if outputs are envelopes of the inputs, -1 if the inputs are envelopes, else 0.
    overhead_sign = 0

    async def start(self) -> None:
        """Acquire what the transform needs (KMS client, keys); retried while retriable."""

    async def values(self, pairs: Sequence[Pair]) -> Sequence[bytes | DeadLetter]:
        """The output values of a batch, in order."""
        return [value for value, _ in pairs]

    def headers(self, headers: Headers) -> list[tuple[str, bytes]]:
        """The output headers of one record (aiokafka wants a list; runs once per record)."""
        return list(headers)

    @property
    def kms_calls(self) -> Counter[str]:
        """KMS calls made so far, by operation."""
        return Counter()

    @property
    def kms(self) -> CountingKms | None:
        """The counting KMS client once started; None for transforms without one."""
        return None

    @property
    def cache_stats(self) -> Counter[str]:
        """DEK cache events so far."""
        return Counter()

    async def close(self) -> None:
        """Release everything `start` acquired."""


class _KmsTransform(Transform):
    """A transform that holds the process's one (counting) KMS client."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._kms: CountingKms | None = None

    async def _open_kms(self) -> CountingKms:
        if self._kms is None:
            self._kms = CountingKms(await open_kms(self._settings))
        return self._kms

    @property
    def kms_calls(self) -> Counter[str]:
        return self._kms.calls if self._kms is not None else Counter()

    @property
    def kms(self) -> CountingKms | None:
        return self._kms

    async def close(self) -> None:
        if self._kms is not None:
            await self._kms.close()


class Seal(_KmsTransform):
    """Encrypt: seal each value under the stream's current DEK; add the version header."""

    direction = "encrypt"
    overhead_sign = 1

    def __init__(self, settings: Settings, *, stream: str) -> None:
        super().__init__(settings)
        self._stream = stream
        self._encryptor: Encryptor | None = None

    async def start(self) -> None:
        if self._encryptor is None:
            kms = await self._open_kms()
            self._encryptor = Encryptor.from_settings(kms, self._settings, stream=self._stream)

    async def values(self, pairs: Sequence[Pair]) -> Sequence[bytes | DeadLetter]:
        encryptor = self._ready(self._encryptor)
        try:
            return await encryptor.seal_many(pairs)
        except EnvpipeError:
            raise  # retriable: the worker retries the batch; otherwise it stops
        except Exception:  # noqa: BLE001 - find the record that broke the batch
            log.warning("sealing a batch failed unexpectedly; sealing its records one by one")
        return [await self._seal_one(encryptor, value, key) for value, key in pairs]

    @staticmethod
    async def _seal_one(
        encryptor: Encryptor, value: bytes, key: bytes | None
    ) -> bytes | DeadLetter:
        try:
            return await encryptor.seal(value, key)
        except EnvpipeError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the stream
            log.error(  # noqa: TRY400 - no traceback: it could quote the payload
                "a record could not be sealed: %s", type(exc).__name__
            )
            return DeadLetter("seal_failed")

    def headers(self, headers: Headers) -> list[tuple[str, bytes]]:
        return [*headers, VERSION_HEADER]

    @property
    def cache_stats(self) -> Counter[str]:
        return self._encryptor.cache.stats if self._encryptor is not None else Counter()

    async def close(self) -> None:
        if self._encryptor is not None:
            await self._encryptor.close()
        await super().close()

    @staticmethod
    def _ready(encryptor: Encryptor | None) -> Encryptor:
        if encryptor is None:
            raise RuntimeError("Seal.start() was not awaited")
        return encryptor


class Open(_KmsTransform):
    """Decrypt: verify and open each envelope; a `DecryptionError` becomes a dead letter."""

    direction = "decrypt"
    overhead_sign = -1

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._decryptor: Decryptor | None = None

    async def start(self) -> None:
        if self._decryptor is None:
            kms = await self._open_kms()
            self._decryptor = await Decryptor.from_settings(kms, self._settings)

    async def values(self, pairs: Sequence[Pair]) -> Sequence[bytes | DeadLetter]:
        if self._decryptor is None:
            raise RuntimeError("Open.start() was not awaited")
        opened = await self._decryptor.open_many(pairs)
        return [
            DeadLetter(result.reason.value) if isinstance(result, DecryptionError) else result
            for result in opened
        ]

    def headers(self, headers: Headers) -> list[tuple[str, bytes]]:
        return [header for header in headers if header[0] != _VERSION_NAME]

    @property
    def cache_stats(self) -> Counter[str]:
        return self._decryptor.cache.stats if self._decryptor is not None else Counter()

    async def close(self) -> None:
        if self._decryptor is not None:
            self._decryptor.close()
        await super().close()


# --- entry points ----------------------------------------------------------------------------


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
    return _run_job(settings, transform, _Job(source, dest, group, dlq, stop_when_idle))


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
    return _run_job(settings, Open(settings), _Job(source, dest, group, dlq, stop_when_idle))


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
    return _run_job(settings, transform, _Job(source, dest, group, dlq, stop_when_idle))


def _run_job(settings: Settings, transform: Transform, job: _Job) -> int:
    configure_logging(settings.log_level, settings.log_format)
    stats_file = os.environ.get(STATS_FILE_ENV) or None
    return run(_Worker(settings, transform, job).run(Path(stats_file) if stats_file else None))


# --- the worker ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Job:
    source: str
    dest: str
    group: str
    dlq: str | None
    stop_when_idle: float | None


@dataclass(eq=False, slots=True)
class _Batch:
    """One fetched batch, from fetch to commit. Created in fetch order, committed in it too."""

    generation: int
    records: list[Any]
    offsets: dict[TopicPartition, int]
    nbytes: int
    produced: asyncio.Future[bool]  # True once every output is with the producer
    committed: asyncio.Future[None]  # done once the committer has finished with it
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    out: int = 0
    dlq: int = 0
    tombstones: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


class _Abandon(Exception):
    """The current batch will not be finished: the worker is stopping."""


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Forwards aiokafka's rebalance callbacks to the worker."""

    def __init__(self, worker: _Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._worker.on_assigned(assigned)


class _Worker:
    """The generic consume -> transform -> produce -> commit loop (see the module docstring)."""

    def __init__(self, settings: Settings, transform: Transform, job: _Job) -> None:
        self._settings = settings
        self._kafka = KafkaAccess.from_settings(settings)  # checks the TLS settings first
        self._transform = transform
        self._job = job
        self.stats = WorkerStats(transform.direction)
        self._consumer: Any = None
        self._producer: Any = None
        self._stop = asyncio.Event()
        self._exit_code = 0
        self._pending: deque[_Batch] = deque()
        self._queued = asyncio.Event()
        self._generation = 0
        self._inflight_records = 0
        self._inflight_bytes = 0
        self._pause_reasons: set[str] = set()
        self._last_activity = time.monotonic()
        self._max_request_size = max(MIB, settings.producer_max_batch_bytes)
        #: per-record processing time (a batch's time over its records), in seconds
        self._record_seconds = Histogram(min_value=1e-7, max_value=3600)
        #: per partition, the offset lag is measured from: the last commit, else first fetch
        self._lag_base: dict[TopicPartition, int] = {}
        self._metrics: MetricsServer | None = None

    # -- lifecycle --

    async def run(self, stats_file: Path | None) -> int:
        """Run until stopped; return the exit code. Everything opened here is closed here."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig.name)
        tasks: list[asyncio.Task[None]] = []
        try:
            if self._settings.metrics_port:
                self._metrics = MetricsServer(self.metrics_snapshot)
                await self._metrics.start(self._settings.metrics_port)
            try:
                await self._retry(self._transform.start, "starting")
            except _Abandon:
                return self._exit_code
            try:
                await self._start_kafka()
            except KafkaError as exc:
                raise await self._kafka.connection_error(exc) from exc
            tasks = [
                asyncio.create_task(self._commit_loop(), name="envpipe-committer"),
                asyncio.create_task(self._report_progress(), name="envpipe-progress"),
            ]
            try:
                await self._consume()
            except Exception:
                log.exception("the worker failed")
                self._request_stop("unexpected error", exit_code=1)
            await self._drain()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close()
            if self._metrics is not None:
                await self._metrics.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            log.info("%s", self.stats.summary_line())
            if stats_file is not None:
                self._write_stats(stats_file)
        return self._exit_code

    def _request_stop(self, why: str, *, exit_code: int = 0) -> None:
        if not self._stop.is_set():
            log.info("stopping (%s): draining in-flight records, then committing", why)
        self._exit_code = self._exit_code or exit_code
        self._stop.set()

    async def _start_kafka(self) -> None:
        settings, job = self._settings, self._job
        self._producer = AIOKafkaProducer(
            **self._kafka.client_kwargs(),
            client_id=f"envpipe-{self.stats.direction}",
            acks="all",
            enable_idempotence=False,
            linger_ms=settings.linger_ms,
            max_batch_size=settings.producer_max_batch_bytes,
            max_request_size=self._max_request_size,
        )
        await self._producer.start()
        await ensure_topics(self._kafka, job.source, [job.dest, *([job.dlq] if job.dlq else [])])
        self._consumer = AIOKafkaConsumer(
            **self._kafka.client_kwargs(),
            client_id=f"envpipe-{self.stats.direction}",
            group_id=job.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # aiokafka's default 500 ms: brokers such as Tansu hold each fetch that long even
            # when records are waiting, which showed up as ~200 ms of added latency.
            fetch_max_wait_ms=settings.batch_timeout_ms,
        )
        self._consumer.subscribe([job.source], listener=_Rebalance(self))
        await self._consumer.start()

    async def _close(self) -> None:
        """Stop the producer (flushing), leave the group, drop keys, close the KMS client."""
        for client in (self._producer, self._consumer):
            if client is not None:
                try:
                    await client.stop()
                except Exception as exc:  # noqa: BLE001 - closing the rest matters more
                    log.warning("closing %s failed: %s", type(client).__name__, exc)
        await self._transform.close()

    def _write_stats(self, path: Path) -> None:
        try:
            self.stats.write(path, self._transform.kms_calls, self._transform.cache_stats)
        except OSError as exc:
            log.warning("cannot write the stats file %s: %s", path, exc)

    # -- the main loop --

    async def _consume(self) -> None:
        """Fetch, transform, hand to the producer; the committer does the rest."""
        consumer, settings = self._consumer, self._settings
        while not self._stop.is_set():
            try:
                fetched = await consumer.getmany(
                    timeout_ms=settings.batch_timeout_ms, max_records=settings.batch_max_records
                )
            except KafkaError:
                log.exception("the consumer failed")
                self._request_stop("consumer error", exit_code=1)
                return
            if not fetched:
                self._stop_if_idle()
                continue
            if self._stop.is_set():  # asked to stop while fetching: leave these for later
                return
            batch = self._open_batch(fetched)
            started = time.perf_counter()
            try:
                outcomes = await self._retry(partial(self._values, batch), "transforming a batch")
                await self._produce(batch, outcomes)
            except _Abandon:
                batch.produced.set_result(False)
                return
            except EnvpipeError as exc:
                log.error(  # noqa: TRY400 - the message says it all
                    "a batch failed and retrying cannot help (%s); stopping", exc
                )
                batch.produced.set_result(False)
                self._request_stop(type(exc).__name__, exit_code=1)
                return
            except Exception:
                log.exception("a batch failed; stopping without committing it")
                batch.produced.set_result(False)
                self._request_stop("unexpected error", exit_code=1)
                return
            batch.produced.set_result(True)
            if batch.records:
                per_record = (time.perf_counter() - started) / len(batch.records)
                self._record_seconds.add_repeated(per_record, len(batch.records))
            if (
                self._inflight_records > settings.max_inflight_records
                or self._inflight_bytes > settings.max_inflight_bytes
            ):
                self._set_paused(_BACKPRESSURE, True)

    def _open_batch(self, fetched: dict[TopicPartition, list[Any]]) -> _Batch:
        """Register a fetched batch in fetch order (synchronously: no rebalance in between)."""
        records = [record for part in fetched.values() for record in part]
        nbytes = max(0, sum(record.serialized_value_size for record in records))
        loop = asyncio.get_running_loop()
        batch = _Batch(
            generation=self._generation,
            records=records,
            offsets={tp: part[-1].offset + 1 for tp, part in fetched.items()},
            nbytes=nbytes,
            produced=loop.create_future(),
            committed=loop.create_future(),
        )
        self._pending.append(batch)
        self._queued.set()
        self._inflight_records += len(records)
        self._inflight_bytes += nbytes
        self.stats.fetched(len(records))
        by_partition = self.stats.records_in_by_partition
        for tp, part in fetched.items():
            by_partition[f"{tp.topic}/{tp.partition}"] += len(part)
            self._lag_base.setdefault(tp, part[0].offset)
        self._last_activity = time.monotonic()
        return batch

    async def _values(self, batch: _Batch) -> Sequence[bytes | DeadLetter]:
        pairs = [(record.value, record.key) for record in batch.records if record.value is not None]
        return await self._transform.values(pairs) if pairs else []

    async def _produce(self, batch: _Batch, outcomes: Sequence[bytes | DeadLetter]) -> None:
        """Hand every output to the producer. This loop runs once per record: keep it lean."""
        outbox = Outbox(self._producer, self._max_request_size)
        add = outbox.add
        dest = self._job.dest
        headers_of = self._transform.headers
        results = iter(outcomes)
        in_bytes = out_bytes = tombstones = 0
        for record in batch.records:
            value = record.value
            out: bytes | None = None
            if value is None:
                tombstones += 1
            else:
                outcome = next(results)
                if isinstance(outcome, DeadLetter):
                    await self._dead_letter(batch, outbox, record, outcome)
                    continue
                out = outcome
            try:
                await add(dest, record.key, out, record.timestamp, headers_of(record.headers))
            except RecordTooLarge:
                await self._dead_letter(batch, outbox, record, DeadLetter("too_large"))
                continue
            if value is not None and out is not None:
                in_bytes += len(value)
                out_bytes += len(out)
        batch.futures = await outbox.flush()
        batch.in_bytes, batch.out_bytes, batch.tombstones = in_bytes, out_bytes, tombstones
        batch.out = len(batch.records) - batch.dlq

    async def _dead_letter(
        self, batch: _Batch, outbox: Outbox, record: Any, verdict: DeadLetter
    ) -> None:
        """Send the original record to the DLQ, or stop if there is none."""
        where = f"{record.topic}/{record.partition}/{record.offset}"
        if self._job.dlq is None:
            log.error(
                "record %s cannot be processed (reason=%s) and there is no --dlq: "
                "stopping without committing it",
                where,
                verdict.reason,
            )
            self._request_stop("a record cannot be processed", exit_code=1)
            raise _Abandon
        headers = [
            *record.headers,
            (ERROR_HEADER, verdict.reason.encode()),
            (SOURCE_HEADER, where.encode()),
        ]
        await outbox.add(self._job.dlq, record.key, record.value, record.timestamp, headers)
        batch.dlq += 1
        batch.reasons[verdict.reason] += 1

    # -- retries, pausing, idling --

    async def _retry(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """Run `attempt` until it succeeds, backing off on retriable errors (KMS outages).

        Partitions stay paused while retrying, so nothing new is read; the held batch is the
        same one every time. A stop request abandons it (it was never committed).
        """
        failures = 0
        while True:
            try:
                result = await attempt()
            except EnvpipeError as exc:
                if not exc.retriable:
                    raise
                failures += 1
                delay = backoff_delay(failures, self._settings.kms_retry_max_seconds)
                self._set_paused(_KMS, True)
                log.warning(
                    "%s: %s (%s); partitions paused, nothing skipped; retry %d in %.2fs",
                    what,
                    type(exc).__name__,
                    exc,
                    failures,
                    delay,
                )
                await self._hold(delay)
                continue
            if failures:
                log.info("%s succeeded after %d retries; resuming", what, failures)
                self._set_paused(_KMS, False)
            return result

    async def _hold(self, seconds: float) -> None:
        """Wait, still polling so the group keeps us; raise `_Abandon` if asked to stop."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stop.is_set():
                raise _Abandon
            if self._consumer is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), left)
                continue
            fetched = await self._consumer.getmany(timeout_ms=int(min(left, 1.0) * 1000) + 1)
            for tp, part in fetched.items():  # paused partitions return nothing; be sure
                self._consumer.seek(tp, part[0].offset)
        if self._stop.is_set():
            raise _Abandon

    def _set_paused(self, reason: str, on: bool) -> None:
        """Pause the whole assignment while any reason holds; resume when none does."""
        before = bool(self._pause_reasons)
        if on:
            if reason not in self._pause_reasons:
                self.stats.pauses[reason] += 1
            self._pause_reasons.add(reason)
        else:
            self._pause_reasons.discard(reason)
        if self._consumer is None or before == bool(self._pause_reasons):
            return
        assignment = self._consumer.assignment()
        if self._pause_reasons:
            self._consumer.pause(*assignment)
        else:
            self._consumer.resume(*assignment)

    def _stop_if_idle(self) -> None:
        idle = self._job.stop_when_idle
        if (
            idle is not None
            and not self._pending
            and not self._pause_reasons
            and time.monotonic() - self._last_activity >= idle
        ):
            self._request_stop(f"no record for {idle:g}s")

    # -- acknowledgements and commits --

    async def _commit_loop(self) -> None:
        """Run the committer; if it ever breaks, stop rather than run on without commits."""
        try:
            await self._commit_batches()
        except Exception:
            log.exception("the committer failed")
            self._request_stop("committer failure", exit_code=1)
            self._block_commits("the committer failed")

    async def _commit_batches(self) -> None:
        """Commit batches in fetch order, each only once all its outputs are acknowledged."""
        while True:
            while not self._pending:
                self._queued.clear()
                await self._queued.wait()
            head = self._pending[0]
            ready = await self._acknowledged(head)
            if ready is None:
                return
            # Coalesce: later batches already acknowledged share the one commit.
            done = [head]
            for batch in list(self._pending)[1:]:
                if not _acknowledged_now(batch):
                    break
                done.append(batch)
            await self._commit(done)
            self._finish(done)

    async def _acknowledged(self, batch: _Batch) -> _Batch | None:
        """Wait for every output of `batch`; None if it was abandoned or a send failed."""
        if not await batch.produced:
            self._block_commits("a batch was abandoned")
            return None
        try:
            for future in batch.futures:
                await future
        except Exception as exc:  # noqa: BLE001 - whatever it was, the batch is not acknowledged
            log.error(  # noqa: TRY400 - aiokafka's message is enough
                "producing failed after the producer's retries: %s", exc
            )
            self._request_stop("produce failure", exit_code=1)
            self._block_commits("a produce failed")
            return None
        return batch

    def _block_commits(self, why: str) -> None:
        """Nothing after an unfinished batch may be committed: release every waiter."""
        log.info("%s: not committing it or anything after it", why)
        self._finish(list(self._pending))

    async def _commit(self, batches: list[_Batch]) -> None:
        offsets: dict[TopicPartition, int] = {}
        assignment = self._consumer.assignment()
        for batch in batches:
            if batch.generation == self._generation:
                for tp, offset in batch.offsets.items():
                    if tp in assignment:
                        offsets[tp] = offset
        now, wall_ms = time.monotonic(), time.time() * 1000
        stats = self.stats
        for batch in batches:
            stats.records_out += batch.out
            stats.dlq += batch.dlq
            stats.tombstones += batch.tombstones
            stats.dlq_reasons.update(batch.reasons)
            stats.overhead_bytes += self._transform.overhead_sign * (
                batch.out_bytes - batch.in_bytes
            )
            stats.overhead_records += len(batch.records) - batch.tombstones - batch.dlq
            stats.latency_ms.add_many([wall_ms - record.timestamp for record in batch.records])
        stats.acknowledged(now)
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            log.warning("commit failed (%s); those records will be processed again", exc)
            return
        self._lag_base.update(offsets)

    def _finish(self, batches: list[_Batch]) -> None:
        """Batches the committer is done with (a prefix of the pending ones, in order)."""
        for batch in batches:
            if batch.committed.done():
                continue
            if self._pending and self._pending[0] is batch:
                self._pending.popleft()
            self._inflight_records -= len(batch.records)
            self._inflight_bytes -= batch.nbytes
            batch.committed.set_result(None)
        self._last_activity = time.monotonic()
        settings = self._settings
        if (
            self._inflight_records <= settings.max_inflight_records * _RESUME_FRACTION
            and self._inflight_bytes <= settings.max_inflight_bytes * _RESUME_FRACTION
        ):
            self._set_paused(_BACKPRESSURE, False)

    async def _drain(self) -> None:
        """After the main loop: wait (bounded) for in-flight batches to be committed."""
        waiting = [batch.committed for batch in self._pending]
        if not waiting:
            return
        _, late = await asyncio.wait(waiting, timeout=_DRAIN_SECONDS)
        if late:
            log.warning(
                "%d batches not acknowledged within %gs; they will be processed again",
                len(late),
                _DRAIN_SECONDS,
            )

    # -- rebalances --

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before giving partitions up: stop reading them, let in-flight work commit."""
        if not revoked:
            return
        self._consumer.pause(*revoked)
        # A batch held by a KMS outage cannot finish soon: do not hold the group up for it.
        holding = _KMS in self._pause_reasons
        waiting = [b.committed for b in self._pending if b.produced.done() or not holding]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=_REVOKE_WAIT_SECONDS)
            if late:
                log.warning("%d batches in flight at revocation; not committing them", len(late))
        self._generation += 1
        for tp in revoked:
            self._lag_base.pop(tp, None)
        log.info("partitions revoked: %s", ", ".join(_names(revoked)))

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """New partitions: note them, and keep them paused if the worker is holding back."""
        self.stats.assigned_partitions.update(_names(assigned))
        self._last_activity = time.monotonic()
        if self._pause_reasons and assigned:
            self._consumer.pause(*assigned)
        log.info("%s %s", ASSIGNED_LOG, ", ".join(_names(assigned)) or "none")

    # -- progress and metrics --

    def metrics_snapshot(self) -> Snapshot:
        """The worker's state for a metrics scrape (runs on the event loop, never per record)."""
        stats, kms, consumer = self.stats, self._transform.kms, self._consumer
        lag: dict[tuple[str, int], int] = {}
        if consumer is not None:
            for tp, base in self._lag_base.items():
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    lag[(tp.topic, tp.partition)] = max(0, highwater - base)
        return Snapshot(
            direction=stats.direction,
            records_ok=stats.records_out,
            records_dlq=stats.dlq,
            record_seconds=self._record_seconds,
            end_to_end_ms=stats.latency_ms,
            kms_calls=dict(kms.calls) if kms else {},
            kms_failures=dict(kms.failures) if kms else {},
            kms_latency=dict(kms.latency) if kms else {},
            cache_events=dict(self._transform.cache_stats),
            inflight_bytes=self._inflight_bytes,
            paused_partitions=len(consumer.paused()) if consumer is not None else 0,
            lag=lag,
        )

    async def _report_progress(self) -> None:
        last_in, last_time = self.stats.records_in, time.monotonic()
        while True:
            await asyncio.sleep(_PROGRESS_SECONDS)
            now = time.monotonic()
            rate = (self.stats.records_in - last_in) / (now - last_time)
            last_in, last_time = self.stats.records_in, now
            log.info(
                "%s: %.0f records/s; %d in, %d out, %d dead-lettered; in flight %d records "
                "(%d bytes); %d partitions paused%s",
                self.stats.direction,
                rate,
                self.stats.records_in,
                self.stats.records_out,
                self.stats.dlq,
                self._inflight_records,
                self._inflight_bytes,
                len(self._consumer.paused()),
                f" ({', '.join(sorted(self._pause_reasons))})" if self._pause_reasons else "",
            )


def _acknowledged_now(batch: _Batch) -> bool:
    """Whether every output of `batch` is already acknowledged, without waiting."""
    if not (batch.produced.done() and batch.produced.result()):
        return False
    futures = batch.futures
    if futures and not futures[-1].done():
        return False
    return all(future.done() and future.exception() is None for future in futures)


def _names(partitions: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}/{tp.partition}" for tp in partitions)


async def ensure_topics(kafka: KafkaAccess, source: str, targets: list[str]) -> None:
    """Create missing output topics like the source (same partition count); best effort."""
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    try:
        await admin.start()
        # Every topic at once: asking for the source by name could auto-create it.
        described = {topic["topic"]: topic for topic in await admin.describe_topics()}
        missing = [topic for topic in targets if topic not in described]
        if not missing:
            return
        partitions = len(described.get(source, {}).get("partitions", ()))
        if not partitions:
            log.info(
                "source topic %s does not exist yet; leaving %s to the broker", source, missing
            )
            return
        brokers = len((await admin.describe_cluster())["brokers"])
        replication = max(1, min(_MAX_REPLICATION, brokers))
        created, failed = await create_with(admin, missing, partitions, replication)
        for topic in created:
            log.info("created topic %s (%d partitions)", topic, partitions)
        for failure in failed:
            log.warning("could not create topic %s", failure)
    except KafkaError as exc:
        log.warning("could not check or create the output topics: %s", exc)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
