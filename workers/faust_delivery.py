"""Writing one Faust event's output to Kafka, and counting it once the broker has it.

`send_like` produces straight to the app's aiokafka producer with the event's key and
timestamp; `Deliveries` acknowledges the event only once that output is acknowledged (so
Faust never commits past a record that was not written) and keeps the stream workers'
statistics (`workers.stats`) as it does. The header rules are the record contract's
(`workers.contract`), adapted to Faust's header types.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from typing import Any

from faust.types import EventT, ProducerT, TopicT
from faust.types.core import HeadersArg

from workers import contract
from workers.stats import WorkerStats

__all__ = ["Deliveries", "dead_letter_headers", "opened_headers", "sealed_headers", "send_like"]

log = logging.getLogger("envpipe.faust")

Headers = list[tuple[str, bytes]]


def pairs(headers: HeadersArg | None) -> Iterable[tuple[str, bytes]]:
    """Kafka headers as (name, value) pairs, in order, repeats kept (Faust's events hold a dict)."""
    if headers is None:
        return ()
    return headers.items() if isinstance(headers, Mapping) else headers


def sealed_headers(headers: HeadersArg | None, format_name: str = "v1") -> Headers:
    """The headers of an envelope record: the original ones plus `envpipe.v`."""
    return contract.sealed_headers(pairs(headers), format_name)


def opened_headers(headers: HeadersArg | None) -> Headers:
    """The headers of an opened record: the original ones without `envpipe.v`."""
    return contract.opened_headers(pairs(headers))


def dead_letter_headers(event: EventT[Any], reason: str) -> Headers:
    """The original headers plus the reason code and where the record came from."""
    message = event.message
    where = contract.source_of(message.topic, message.partition, message.offset)
    return contract.dead_letter_headers(pairs(message.headers), reason, where)


async def send_like(
    topic: TopicT, event: EventT[Any], value: bytes | None, headers: Headers
) -> asyncio.Future[Any]:
    """Produce `value` with the event's key and timestamp; returns the delivery future.

    Goes straight to the app's producer rather than through `topic.send()`, whose per-record
    bookkeeping cost about a quarter of a Faust worker's throughput here, and which would
    hold the record until commit time under Faust's publish-on-commit setting. The default
    partitioner places it, so a key keeps its partition number from topic to topic.
    """
    message = event.message
    seconds = _exact_seconds(message.timestamp)
    if message.key is None and value is None:
        return await _send_empty(topic, seconds, headers)
    producer: ProducerT = await topic.app.maybe_start_producer()
    delivery = await producer.send(
        topic.get_topic_name(), message.key, value, None, seconds, headers
    )
    return asyncio.ensure_future(delivery)


def _exact_seconds(timestamp: float | None) -> float | None:
    """Seconds that Faust's `int(seconds * 1000)` turns back into the same milliseconds.

    Faust hands timestamps over as `ms / 1000`; multiplying back can land a hair below the
    integer and truncate to the millisecond before. Half a millisecond up cannot.
    """
    if timestamp is None:
        return None
    return (round(timestamp * 1000) + 0.5) / 1000


async def _send_empty(
    topic: TopicT, seconds: float | None, headers: Headers
) -> asyncio.Future[Any]:
    """A record with neither key nor value, which aiokafka's `send()` refuses: one-record batch.

    Goes to aiokafka's producer under Faust's (verified with faust-streaming 0.15.3).
    """
    faust_producer: Any = await topic.app.maybe_start_producer()
    producer = faust_producer._ensure_producer()  # no public accessor
    batch = producer.create_batch()
    timestamp_ms = None if seconds is None else int(seconds * 1000)
    batch.append(key=None, value=None, timestamp=timestamp_ms, headers=headers)
    name = topic.get_topic_name()
    partition = random.choice(sorted(await producer.partitions_for(name)))  # noqa: S311
    delivery: asyncio.Future[Any] = await producer.send_batch(batch, name, partition=partition)
    return delivery


def size_change(plaintext: bytes | None, envelope: bytes | None) -> int | None:
    """Bytes the envelope adds to the plaintext; None for a tombstone."""
    if plaintext is None or envelope is None:
        return None
    return len(envelope) - len(plaintext)


class Deliveries:
    """Acknowledge each event once its output is written, and count it as the workers do."""

    def __init__(
        self,
        stats: WorkerStats,
        crash: Callable[[EventT[Any], BaseException, str], Awaitable[None]],
    ) -> None:
        self.stats = stats
        #: `time.monotonic()` of the latest event handed in
        self.last_event: float | None = None
        self._crash = crash
        self._crashes: set[asyncio.Task[None]] = set()

    def took(self, event: EventT[Any]) -> None:
        """Count an event handed to `seal_to` / `open_to`."""
        self.last_event = now = time.monotonic()
        self.stats.fetched(1, now)
        message = event.message
        self.stats.records_in_by_partition[f"{message.topic}/{message.partition}"] += 1

    def watch(
        self,
        delivery: asyncio.Future[Any],
        event: EventT[Any],
        reason: str | None,
        overhead: int | None,
    ) -> None:
        """Acknowledge `event` when `delivery` succeeds; `reason` is set for a dead letter."""
        delivery.add_done_callback(partial(self._delivered, event, reason, overhead))

    def _delivered(
        self,
        event: EventT[Any],
        reason: str | None,
        overhead: int | None,
        delivery: asyncio.Future[Any],
    ) -> None:
        if not delivery.cancelled() and delivery.exception() is None:
            event.ack()
            self._count(event, reason, overhead)
            return
        error = (
            delivery.exception() if not delivery.cancelled() else asyncio.CancelledError()
        ) or RuntimeError("delivery failed")
        task = asyncio.ensure_future(
            self._crash(event, error, "producing failed after the producer's retries")
        )
        self._crashes.add(task)
        task.add_done_callback(self._crashes.discard)

    def _count(self, event: EventT[Any], reason: str | None, overhead: int | None) -> None:
        """The stream workers' bookkeeping: latency is now minus the source record's time."""
        stats = self.stats
        if reason is not None:
            stats.dlq += 1
            stats.dlq_reasons[reason] += 1
        else:
            stats.records_out += 1
            if overhead is None:
                stats.tombstones += 1
            else:
                stats.overhead_bytes += overhead
                stats.overhead_records += 1
        timestamp = event.message.timestamp
        if timestamp is not None:
            stats.latency_ms.add(time.time() * 1000 - timestamp * 1000)
        stats.acknowledged(time.monotonic())
