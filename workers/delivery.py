"""Handing one transformed batch to the producer: where each record goes.

A record becomes its output (a tombstone stays a tombstone), or a dead letter when its
outcome is a failure or its output could never be produced; with no dead-letter topic the
worker stops instead, and the batch is abandoned. Exactly-once, the outputs, the dead letters
and the batch's offsets go in one transaction. Kept apart from `workers.loop` because this is
the per-record hot path and the one place that decides a record's fate; nothing here commits
at-least-once offsets (`workers.commits` does, once the futures left on the batch are
acknowledged).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

from aiokafka import TopicPartition

from pipeline.errors import RecordTooLarge
from workers.commits import Batch
from workers.contract import Headers, dead_letter_headers, source_of
from workers.jobs import Job
from workers.outbox import Outbox
from workers.stopping import Abandon
from workers.transforms import DeadLetter, Outcome

__all__ = ["Delivery", "committed_in_transaction"]

log = logging.getLogger("envpipe.stream")


@dataclass(frozen=True, slots=True)
class Delivery:
    """Outputs and dead letters of each batch, through one producer."""

    producer: Any
    job: Job
    _: KW_ONLY
    max_request_size: int
    headers_of: Callable[[Headers], list[tuple[str, bytes]]]
    request_stop: Callable[..., None]
    #: exactly-once: each batch goes in one transaction with its offsets
    transactional: bool

    async def deliver(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        """Hand the batch to the producer (in a transaction when exactly-once); raises
        `Abandon` if a record cannot be processed and there is nowhere to dead-letter it."""
        if self.transactional:
            await self._produce_in_transaction(batch, outcomes)
        else:
            await self._produce(batch, outcomes)

    async def _produce(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        """Hand every output to the producer. This loop runs once per record: keep it lean
        (a plain `try_add` per record; only a record that must wait is awaited)."""
        outbox = Outbox(self.producer, self.max_request_size)
        try_add, add, dest = outbox.try_add, outbox.add, self.job.dest
        headers_of = self.headers_of
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
        dlq = self.job.dlq
        if dlq is None:
            log.error(
                "record %s cannot be processed (reason=%s) and there is no --dlq: "
                "stopping without committing it",
                where,
                reason,
            )
            self.request_stop("a record cannot be processed", exit_code=1)
            raise Abandon
        headers = dead_letter_headers(record.headers, reason, where)
        await outbox.add(dlq, record.key, record.value, record.timestamp, headers)
        batch.dlq += 1
        batch.reasons[reason] += 1


async def committed_in_transaction(offsets: dict[TopicPartition, int]) -> None:
    """Exactly-once: the offsets went with the batch's transaction; nothing is left to do."""
