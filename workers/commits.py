"""Acknowledgements and commits: a batch's offsets are committed only once every output of it
(dead letters included) is acknowledged by the broker, in fetch order.

The committer runs as its own task. It takes batches in the order they were fetched, waits
for the producer's futures of the oldest, coalesces the following batches that are already
acknowledged into the same commit, and only then commits `last offset + 1` per partition.
While it waits, the worker transforms the next batch (pipelining).

A batch that was abandoned, or whose produce failed, blocks every later commit: nothing after
an unfinished batch may be committed, so those records are read again after a restart
(at-least-once). A generation counter, bumped at every revocation, keeps a member from
committing offsets of partitions it no longer owns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from workers.flow import FlowControl
from workers.stats import WorkerStats

__all__ = ["Batch", "Committer"]

log = logging.getLogger("envpipe.commits")

_DRAIN_SECONDS = 30.0
_REVOKE_WAIT_SECONDS = 30.0


@dataclass(eq=False, slots=True)
class Batch:
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

    def acknowledged_now(self) -> bool:
        """Whether every output is already acknowledged, without waiting."""
        if not (self.produced.done() and self.produced.result()):
            return False
        futures = self.futures
        if futures and not futures[-1].done():
            return False
        return all(future.done() and future.exception() is None for future in futures)


class Committer:
    """The batches in flight, and the task that commits them."""

    def __init__(
        self,
        stats: WorkerStats,
        flow: FlowControl,
        *,
        overhead_sign: int,
        request_stop: Callable[..., None],
        on_commit: Callable[[dict[TopicPartition, int]], None],
        explain: Callable[[BaseException], object] = lambda exc: exc,
    ) -> None:
        self.consumer: Any = None
        self.pending: deque[Batch] = deque()
        self.generation = 0
        self.last_activity = time.monotonic()
        #: set to commit through a transaction instead (exactly-once); returns when done
        self.commit_offsets: Callable[[dict[TopicPartition, int]], Any] | None = None
        self._queued = asyncio.Event()
        self._stats = stats
        self._flow = flow
        self._overhead_sign = overhead_sign
        self._request_stop = request_stop
        self._on_commit = on_commit
        self._explain = explain  # a produce failure in words (an ACL refusal names the ACL)

    def open_batch(self, fetched: dict[TopicPartition, list[Any]]) -> Batch:
        """Register a fetched batch in fetch order (synchronously: no rebalance in between)."""
        records = [record for part in fetched.values() for record in part]
        nbytes = max(0, sum(record.serialized_value_size for record in records))
        loop = asyncio.get_running_loop()
        batch = Batch(
            generation=self.generation,
            records=records,
            offsets={tp: part[-1].offset + 1 for tp, part in fetched.items()},
            nbytes=nbytes,
            produced=loop.create_future(),
            committed=loop.create_future(),
        )
        self.pending.append(batch)
        self._queued.set()
        self._flow.took(len(records), nbytes)
        self.last_activity = time.monotonic()
        return batch

    async def run(self) -> None:
        """Run the committer; if it ever breaks, stop rather than run on without commits."""
        try:
            await self._commit_batches()
        except Exception:
            log.exception("the committer failed")
            self._request_stop("committer failure", exit_code=1)
            self._block("the committer failed")

    async def _commit_batches(self) -> None:
        while True:
            while not self.pending:
                self._queued.clear()
                await self._queued.wait()
            head = self.pending[0]
            if not await self._acknowledged(head):
                return
            done = [head]  # coalesce: later batches already acknowledged share the commit
            for batch in list(self.pending)[1:]:
                if not batch.acknowledged_now():
                    break
                done.append(batch)
            await self._commit(done)
            self._finish(done)

    async def _acknowledged(self, batch: Batch) -> bool:
        """Wait for every output of `batch`; False if it was abandoned or a send failed."""
        if not await batch.produced:
            self._block("a batch was abandoned")
            return False
        try:
            for future in batch.futures:
                await future
        except Exception as exc:  # noqa: BLE001 - whatever it was, the batch is not acknowledged
            log.error(  # noqa: TRY400 - aiokafka's message is enough
                "producing failed after the producer's retries: %s", self._explain(exc)
            )
            self._request_stop("produce failure", exit_code=1)
            self._block("a produce failed")
            return False
        return True

    def _block(self, why: str) -> None:
        """Nothing after an unfinished batch may be committed: release every waiter."""
        log.info("%s: not committing it or anything after it", why)
        self._finish(list(self.pending))

    async def _commit(self, batches: list[Batch]) -> None:
        offsets: dict[TopicPartition, int] = {}
        assignment = self.consumer.assignment()
        for batch in batches:
            if batch.generation == self.generation:
                for tp, offset in batch.offsets.items():
                    if tp in assignment:
                        offsets[tp] = offset
        self._count(batches)
        if not offsets:
            return
        try:
            if self.commit_offsets is not None:
                await self.commit_offsets(offsets)
            else:
                await self.consumer.commit(offsets)
        except KafkaError as exc:
            log.warning("commit failed (%s); those records will be processed again", exc)
            return
        self._on_commit(offsets)

    def _count(self, batches: list[Batch]) -> None:
        """The stats of acknowledged batches (dead letters and tombstones included)."""
        wall_ms, stats = time.time() * 1000, self._stats
        for batch in batches:
            stats.records_out += batch.out
            stats.dlq += batch.dlq
            stats.tombstones += batch.tombstones
            stats.dlq_reasons.update(batch.reasons)
            stats.overhead_bytes += self._overhead_sign * (batch.out_bytes - batch.in_bytes)
            stats.overhead_records += len(batch.records) - batch.tombstones - batch.dlq
            stats.latency_ms.add_many([wall_ms - record.timestamp for record in batch.records])
        stats.acknowledged(time.monotonic())

    def _finish(self, batches: list[Batch]) -> None:
        """Batches the committer is done with (a prefix of the pending ones, in order)."""
        for batch in batches:
            if batch.committed.done():
                continue
            if self.pending and self.pending[0] is batch:
                self.pending.popleft()
            self._flow.released(len(batch.records), batch.nbytes)
            batch.committed.set_result(None)
        self.last_activity = time.monotonic()

    async def drain(self) -> None:
        """After the main loop: wait (bounded) for in-flight batches to be committed."""
        waiting = [batch.committed for batch in self.pending]
        if not waiting:
            return
        _, late = await asyncio.wait(waiting, timeout=_DRAIN_SECONDS)
        if late:
            log.warning(
                "%d batches not acknowledged within %gs; they will be processed again",
                len(late),
                _DRAIN_SECONDS,
            )

    async def before_revoke(self, holding: bool) -> None:
        """Let in-flight work commit before partitions go; then no older batch may commit.

        `holding`: a batch held by a service outage cannot finish soon, so only batches
        already with the producer are waited for.
        """
        waiting = [b.committed for b in self.pending if b.produced.done() or not holding]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=_REVOKE_WAIT_SECONDS)
            if late:
                log.warning("%d batches in flight at revocation; not committing them", len(late))
        self.generation += 1
