"""The worker loop: consume a batch, transform it, hand it to the producer; repeat.

One `StreamWorker` serves every direction; what changes a record is its `Transform`
(`workers.transforms`), when offsets are committed is the `Committer`'s job
(`workers.commits`), and when to pause is `FlowControl`'s (`workers.flow`). This module owns
the lifecycle (signals, clients, the v2 keys topic, shutdown), the fetch loop, the
per-record hand-off to the producer (`workers.outbox`), dead-lettering, and the rebalance
listener. See `workers.stream` for the behaviour as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from pipeline.config import Settings
from pipeline.errors import EnvpipeError, RecordTooLarge
from pipeline.keys_topic import KeysTopicReader, KeysTopicWriter
from workers.clients import compression, max_request_size, new_consumer, new_producer_for
from workers.commits import Batch, Committer
from workers.contract import dead_letter_headers, source_of
from workers.flow import KMS, FlowControl, retrying
from workers.jobs import Job
from workers.kafka_access import KafkaAccess
from workers.metrics import MetricsServer
from workers.outbox import Outbox
from workers.progress import Progress
from workers.rebalance import Rebalance
from workers.stats import WorkerStats
from workers.topics import DECODE_ERRORS, ensure_keys_topic, ensure_outputs, undecodable
from workers.transforms import DeadLetter, Outcome, Transform

__all__ = ["StreamWorker"]

log = logging.getLogger("envpipe.stream")

T = TypeVar("T")


class _Abandon(Exception):
    """The current batch will not be finished: the worker is stopping."""


class StreamWorker:
    """The generic consume -> transform -> produce -> commit loop."""

    def __init__(self, settings: Settings, transform: Transform, job: Job) -> None:
        self.settings = settings
        self.kafka = KafkaAccess.from_settings(settings)  # checks TLS and SASL settings first
        self.transform = transform
        self.job = job
        self.stats = WorkerStats(transform.direction)
        self.flow = FlowControl(settings.max_inflight_records, settings.max_inflight_bytes)
        self.committer = Committer(
            self.stats,
            self.flow,
            overhead_sign=transform.overhead_sign,
            request_stop=self.request_stop,
            on_commit=self._committed,
            explain=lambda exc: (
                self.kafka.authorization_error(exc, operation="WRITE", topic=job.dest) or exc
            ),
        )
        self.progress = Progress(self)
        self.consumer: Any = None
        self.producer: Any = None
        self._keys: tuple[KeysTopicWriter | None, KeysTopicReader | None] = (None, None)
        #: set when the worker runs exactly-once (a transactional producer)
        self.transactional_id: str | None = None
        self._stop = asyncio.Event()
        self._exit_code = 0
        #: per partition, the offset lag is measured from: the last commit, else first fetch
        self.lag_base: dict[TopicPartition, int] = {}

    # -- lifecycle --

    async def run(self, stats_file: Path | None) -> int:
        """Run until stopped; return the exit code. Everything opened here is closed here."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.drop_keys)
        tasks: list[asyncio.Task[None]] = []
        metrics = MetricsServer(self.progress.snapshot) if self.settings.metrics_port else None
        try:
            if metrics is not None:
                await metrics.start(self.settings.metrics_port)
            try:
                await self._start_clients()
            except KafkaError as exc:
                raise await self.kafka.connection_error(exc) from exc
            try:
                await self._retry(self._start_transform, "starting")
            except _Abandon:
                return self._exit_code
            tasks = [
                asyncio.create_task(self.committer.run(), name="envpipe-committer"),
                asyncio.create_task(self.progress.report(), name="envpipe-progress"),
            ]
            try:
                await self._consume()
            except Exception:
                log.exception("the worker failed")
                self.request_stop("unexpected error", exit_code=1)
            await self.committer.drain()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close()
            if metrics is not None:
                await metrics.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info("%s", self.stats.summary_line(self.transform.kms_calls))
            if stats_file is not None:
                self._write_stats(stats_file)
        return self._exit_code

    def request_stop(self, why: str, *, exit_code: int = 0) -> None:
        if not self._stop.is_set():
            log.info("stopping (%s): draining in-flight records, then committing", why)
        self._exit_code = self._exit_code or exit_code
        self._stop.set()

    def drop_keys(self) -> None:
        """SIGHUP: forget every cached DEK now (shredding takes effect at once)."""
        self.transform.drop_keys()
        log.info("SIGHUP: dropped every cached data key; the next records fetch new ones")

    async def _start_clients(self) -> None:
        settings, job = self.settings, self.job
        client_id = f"envpipe-{self.stats.direction}"
        self.producer, self.transactional_id = await new_producer_for(
            self.kafka, settings, client_id=client_id, group=job.group
        )
        await self.producer.start()
        if self.transactional_id:
            self.committer.commit_offsets = _committed_in_transaction
        await ensure_outputs(self.kafka, job.source, [job.dest, *([job.dlq] if job.dlq else [])])
        self.consumer = new_consumer(
            self.kafka,
            settings,
            client_id=client_id,
            group_id=job.group,
            read_committed=settings.exactly_once,
        )
        self.flow.consumer = self.committer.consumer = self.consumer
        self.consumer.subscribe([job.source], listener=Rebalance(self))
        await self.consumer.start()

    async def _start_transform(self) -> None:
        """The v2 keys topic (if this direction needs it), then the transform itself."""
        writer, reader = self._keys
        if self.transform.writes_headers(self.settings) and writer is None:
            await ensure_keys_topic(self.kafka, self.job.keys_out, like=self.job.dest)
            if self.transactional_id:  # a header must be acknowledged outside any transaction
                writer = await KeysTopicWriter.open(
                    self.job.keys_out, **self.kafka.client_kwargs(), **compression(self.settings)
                )
            else:
                writer = KeysTopicWriter(self.producer, self.job.keys_out)
            self._keys = (writer, reader)  # closed at the end even if a retry follows
        if self.transform.reads_headers and reader is None:
            reader = await KeysTopicReader.open(
                self.job.keys_in,
                max_headers=self.settings.keys_cache_size,
                **self.kafka.client_kwargs(),
            )
        self._keys = (writer, reader)
        await self.transform.start(writer, reader)

    async def _close(self) -> None:
        """Stop the producer (flushing), leave the group, drop keys, close the service client."""
        reader = self._keys[1]
        closing: list[Any] = [self.producer, self.consumer]
        for client in closing:
            if client is not None:
                try:
                    await client.stop()
                except Exception as exc:  # noqa: BLE001 - closing the rest matters more
                    log.warning("closing %s failed: %s", type(client).__name__, exc)
        if reader is not None:
            await reader.close()
        await self.transform.close()
        if self._keys[0] is not None:  # after the transform: no DEK is minted any more
            await self._keys[0].close()  # stops its producer, if it has its own

    def _write_stats(self, path: Path) -> None:
        try:
            self.stats.pauses.update(self.flow.pauses)
            self.stats.write(path, self.transform.kms_calls, self.transform.cache_stats)
        except OSError as exc:
            log.warning("cannot write the stats file %s: %s", path, exc)

    # -- the main loop --

    async def _consume(self) -> None:
        """Fetch, transform, hand to the producer; the committer does the rest."""
        consumer, settings = self.consumer, self.settings
        while not self._stop.is_set():
            try:
                fetched = await consumer.getmany(
                    timeout_ms=settings.batch_timeout_ms, max_records=settings.batch_max_records
                )
            except DECODE_ERRORS as exc:
                log.error(  # noqa: TRY400 - the message says it all
                    "%s; stopping without skipping it (nothing after it is committed)",
                    await undecodable(consumer, exc),
                )
                self.request_stop("undecodable record batch", exit_code=1)
                return
            except KafkaError as exc:
                refused = self.kafka.authorization_error(
                    exc, operation="READ", topic=self.job.source, group=self.job.group
                )
                log.error("the consumer failed: %s", refused or exc)  # noqa: TRY400
                self.request_stop("consumer error", exit_code=1)
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
                if self.transactional_id:
                    await self._produce_in_transaction(batch, outcomes)
                else:
                    await self._produce(batch, outcomes)
            except _Abandon:
                batch.produced.set_result(False)
                return
            except EnvpipeError as exc:
                log.error(  # noqa: TRY400 - the message says it all
                    "a batch failed and retrying cannot help (%s); stopping", exc
                )
                batch.produced.set_result(False)
                self.request_stop(type(exc).__name__, exit_code=1)
                return
            except Exception:
                log.exception("a batch failed; stopping without committing it")
                batch.produced.set_result(False)
                self.request_stop("unexpected error", exit_code=1)
                return
            batch.produced.set_result(True)
            self.progress.processed(len(batch.records), time.perf_counter() - started)
            self.flow.check_backpressure()

    def _open_batch(self, fetched: dict[TopicPartition, list[Any]]) -> Batch:
        batch = self.committer.open_batch(fetched)
        self.stats.fetched(len(batch.records))
        by_partition = self.stats.records_in_by_partition
        for tp, part in fetched.items():
            by_partition[f"{tp.topic}/{tp.partition}"] += len(part)
            self.lag_base.setdefault(tp, part[0].offset)
        return batch

    async def _values(self, batch: Batch) -> Sequence[Outcome]:
        records = [record for record in batch.records if record.value is not None]
        return await self.transform.values(records) if records else []

    async def _produce(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        """Hand every output to the producer. This loop runs once per record: keep it lean
        (a plain `try_add` per record; only a record that must wait is awaited)."""
        outbox = Outbox(self.producer, max_request_size(self.settings))
        try_add, add, dest = outbox.try_add, outbox.add, self.job.dest
        headers_of = self.transform.headers
        results = iter(outcomes)
        in_bytes = out_bytes = tombstones = 0
        for record in batch.records:
            value = record.value
            out: bytes | None = None
            if value is None:
                tombstones += 1
            else:
                outcome = next(results)
                if not isinstance(outcome, bytes):
                    await self._dead_letter(batch, outbox, record, str(outcome.reason))
                    continue
                out = outcome
            key, timestamp, headers = record.key, record.timestamp, headers_of(record.headers)
            try:
                if not try_add(dest, key, out, timestamp, headers):
                    await add(dest, key, out, timestamp, headers)
            except RecordTooLarge:
                await self._dead_letter(batch, outbox, record, DeadLetter("too_large").reason)
                continue
            if out is not None:
                in_bytes += len(value)
                out_bytes += len(out)
        batch.futures = await outbox.flush()
        batch.in_bytes, batch.out_bytes, batch.tombstones = in_bytes, out_bytes, tombstones
        batch.out = len(batch.records) - batch.dlq

    async def _produce_in_transaction(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        """Exactly-once: outputs, dead letters and the batch's offsets in one transaction.

        Batches are not pipelined here: the next one starts once this one is committed, so a
        rebalance (which runs inside the next fetch) never meets an open transaction.
        """
        producer = self.producer
        await producer.begin_transaction()
        try:
            await self._produce(batch, outcomes)
            await producer.send_offsets_to_transaction(batch.offsets, self.job.group)
            await producer.commit_transaction()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.abort_transaction()
            raise

    async def _dead_letter(self, batch: Batch, outbox: Outbox, record: Any, reason: str) -> None:
        """Send the original record to the DLQ, or stop if there is none."""
        where = source_of(record.topic, record.partition, record.offset)
        if self.job.dlq is None:
            log.error(
                "record %s cannot be processed (reason=%s) and there is no --dlq: "
                "stopping without committing it",
                where,
                reason,
            )
            self.request_stop("a record cannot be processed", exit_code=1)
            raise _Abandon
        headers = dead_letter_headers(record.headers, reason, where)
        await outbox.add(self.job.dlq, record.key, record.value, record.timestamp, headers)
        batch.dlq += 1
        batch.reasons[reason] += 1

    # -- retries, idling --

    async def _retry(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """`flow.retrying`, holding the partitions paused while it waits (nothing skipped)."""
        return await retrying(
            attempt,
            what=f"{what} (partitions paused)",
            cap=self.settings.kms_retry_max_seconds,
            wait=self._hold,
            on_retry=lambda: self.flow.set_paused(KMS, True),
            on_recovered=lambda: self.flow.set_paused(KMS, False),
        )

    async def _hold(self, seconds: float) -> None:
        """Wait, still polling so the group keeps us; raise `_Abandon` if asked to stop."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stop.is_set():
                raise _Abandon
            if self.consumer is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), left)
                continue
            fetched = await self.consumer.getmany(timeout_ms=int(min(left, 1.0) * 1000) + 1)
            for tp, part in fetched.items():  # paused partitions return nothing; be sure
                self.consumer.seek(tp, part[0].offset)
        if self._stop.is_set():
            raise _Abandon

    def _stop_if_idle(self) -> None:
        idle = self.job.stop_when_idle
        if (
            idle is not None
            and not self.committer.pending
            and not self.flow.paused
            and time.monotonic() - self.committer.last_activity >= idle
        ):
            self.request_stop(f"no record for {idle:g}s")

    def _committed(self, offsets: dict[TopicPartition, int]) -> None:
        self.lag_base.update(offsets)


async def _committed_in_transaction(offsets: dict[TopicPartition, int]) -> None:
    """Exactly-once: the offsets went with the batch's transaction; nothing is left to do."""
