"""The worker loop: consume a batch, transform it, hand it to the producer; repeat.

One `StreamWorker` serves every direction; what changes a record is its `Transform`
(`workers.transforms`), when offsets are committed is the `Committer`'s job
(`workers.commits`), and when to pause is `FlowControl`'s (`workers.flow`). Opening and
closing the clients is `Connections`' (`workers.connections`), and where each record of a
batch goes (output, dead letter, the exactly-once transaction) is `Delivery`'s
(`workers.delivery`); a stop request and the waits it cuts short are `Stopping`'s
(`workers.stopping`). This module owns the run itself (signals, metrics, the exit summary),
the fetch loop, and when to retry or stop. See `workers.stream` for the behaviour as a whole.
"""

from __future__ import annotations

import asyncio
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
from pipeline.errors import EnvpipeError
from workers.clients import max_request_size
from workers.commits import Batch, Committer
from workers.connections import Connections
from workers.delivery import Delivery, committed_in_transaction
from workers.flow import KMS, FlowControl, retrying
from workers.jobs import Job
from workers.kafka_access import KafkaAccess
from workers.metrics import MetricsServer
from workers.progress import Progress
from workers.rebalance import Rebalance
from workers.stats import WorkerStats
from workers.stopping import Abandon, Stopping
from workers.topics import DECODE_ERRORS, undecodable
from workers.transforms import Outcome, Transform

__all__ = ["StreamWorker"]

log = logging.getLogger("envpipe.stream")

T = TypeVar("T")


class StreamWorker:
    """The generic consume -> transform -> produce -> commit loop."""

    def __init__(self, settings: Settings, transform: Transform, job: Job) -> None:
        self.settings = settings
        self.kafka = KafkaAccess.from_settings(settings)  # checks TLS and SASL settings first
        self.transform = transform
        self.job = job
        self.stats = WorkerStats(transform.direction)
        self.stopping = Stopping()
        self.flow = FlowControl(settings.max_inflight_records, settings.max_inflight_bytes)
        self.committer = Committer(
            self.stats,
            self.flow,
            overhead_sign=transform.overhead_sign,
            request_stop=self.stopping.request,
            on_commit=self._committed,
            explain=lambda exc: (
                self.kafka.authorization_error(exc, operation="WRITE", topic=job.dest) or exc
            ),
        )
        self.progress = Progress(self)
        self.connections = Connections(self.kafka, settings, job, transform)
        #: per partition, the offset lag is measured from: the last commit, else first fetch
        self.lag_base: dict[TopicPartition, int] = {}

    @property
    def consumer(self) -> Any:
        """The group consumer once started, else None (rebalance, progress and holds read it)."""
        return self.connections.consumer

    # -- lifecycle --

    async def run(self, stats_file: Path | None) -> int:
        """Run until stopped; return the exit code. Everything opened here is closed here."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.request, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.drop_keys)
        tasks: list[asyncio.Task[None]] = []
        metrics = MetricsServer(self.progress.snapshot) if self.settings.metrics_port else None
        try:
            if metrics is not None:
                await metrics.start(self.settings.metrics_port)
            try:
                await self.connections.start_kafka(Rebalance(self), on_consumer=self._attach)
            except KafkaError as exc:
                raise await self.kafka.connection_error(exc) from exc
            try:
                await self._retry(self.connections.start_transform, "starting")
            except Abandon:
                return self.stopping.exit_code
            tasks = [
                asyncio.create_task(self.committer.run(), name="envpipe-committer"),
                asyncio.create_task(self.progress.report(), name="envpipe-progress"),
            ]
            try:
                await self._consume()
            except Exception:
                log.exception("the worker failed")
                self.stopping.request("unexpected error", exit_code=1)
            await self.committer.drain()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.connections.close()
            if metrics is not None:
                await metrics.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info("%s", self.stats.summary_line(self.transform.kms_calls))
            if stats_file is not None:
                self._write_stats(stats_file)
        return self.stopping.exit_code

    def drop_keys(self) -> None:
        """SIGHUP: forget every cached DEK now (shredding takes effect at once)."""
        self.transform.drop_keys()
        log.info("SIGHUP: dropped every cached data key; the next records fetch new ones")

    def _attach(self, consumer: Any) -> None:
        """Flow control pauses, and the committer commits, through the group consumer."""
        self.flow.consumer = self.committer.consumer = consumer
        if self.connections.transactional_id:
            self.committer.commit_offsets = committed_in_transaction

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
        deliver = Delivery(
            self.connections.producer,
            self.job,
            max_request_size=max_request_size(settings),
            headers_of=self.transform.headers,
            request_stop=self.stopping.request,
            transactional=bool(self.connections.transactional_id),
        ).deliver
        while not self.stopping.requested:
            try:
                fetched = await consumer.getmany(
                    timeout_ms=settings.batch_timeout_ms, max_records=settings.batch_max_records
                )
            except DECODE_ERRORS as exc:
                log.error(  # noqa: TRY400 - the message says it all
                    "%s; stopping without skipping it (nothing after it is committed)",
                    await undecodable(consumer, exc),
                )
                self.stopping.request("undecodable record batch", exit_code=1)
                return
            except KafkaError as exc:
                refused = self.kafka.authorization_error(
                    exc, operation="READ", topic=self.job.source, group=self.job.group
                )
                log.error("the consumer failed: %s", refused or exc)  # noqa: TRY400
                self.stopping.request("consumer error", exit_code=1)
                return
            if not fetched:
                self._stop_if_idle()
                continue
            if self.stopping.requested:  # asked to stop while fetching: leave these for later
                return
            batch = self._open_batch(fetched)
            started = time.perf_counter()
            try:
                outcomes = await self._retry(partial(self._values, batch), "transforming a batch")
                await deliver(batch, outcomes)
            except Abandon:
                batch.produced.set_result(False)
                return
            except EnvpipeError as exc:
                log.error(  # noqa: TRY400 - the message says it all
                    "a batch failed and retrying cannot help (%s); stopping", exc
                )
                batch.produced.set_result(False)
                self.stopping.request(type(exc).__name__, exit_code=1)
                return
            except Exception:
                log.exception("a batch failed; stopping without committing it")
                batch.produced.set_result(False)
                self.stopping.request("unexpected error", exit_code=1)
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

    # -- retries, idling --

    async def _retry(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """`flow.retrying`, holding the partitions paused while it waits (nothing skipped)."""
        return await retrying(
            attempt,
            what=f"{what} (partitions paused)",
            cap=self.settings.kms_retry_max_seconds,
            wait=lambda seconds: self.stopping.hold(seconds, self.consumer),
            on_retry=lambda: self.flow.set_paused(KMS, True),
            on_recovered=lambda: self.flow.set_paused(KMS, False),
        )

    def _stop_if_idle(self) -> None:
        idle = self.job.stop_when_idle
        if (
            idle is not None
            and not self.committer.pending
            and not self.flow.paused
            and time.monotonic() - self.committer.last_activity >= idle
        ):
            self.stopping.request(f"no record for {idle:g}s")

    def _committed(self, offsets: dict[TopicPartition, int]) -> None:
        self.lag_base.update(offsets)
