"""Small Kafka helpers for the tools that look at topics from outside a consumer group.

`inspect` and `demo` read whole topics without joining a group or committing anything, and
the demo creates its topics; both share these helpers so the edge cases live in one place.
Each helper takes a `KafkaAccess` (bootstrap servers and TLS, from the settings) or a bare
"host:port" string, which means plaintext: the embedded broker and the tests use those.

Where a topic ends is taken from the high watermark of fetch responses, not from
`end_offsets()`: the embedded Tansu broker answers ListOffsets(latest) with the base offset
of the last batch plus one, which undercounts a partition whose last batch holds more than
one record.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError

from pipeline.errors import EnvpipeError
from workers.kafka_access import KafkaAccess

__all__ = ["TopicError", "consumer", "create_topics", "create_with", "scan"]

_TOPIC_ALREADY_EXISTS = 36
_POLL_MS = 200


class TopicError(EnvpipeError):
    """A topic cannot be read or created (an unreachable broker is a ConfigError)."""


async def create_topics(brokers: KafkaAccess | str, names: Iterable[str], partitions: int) -> None:
    """Create the topics (replication factor 1); a topic that already exists is fine."""
    access = KafkaAccess.of(brokers)
    admin = AIOKafkaAdminClient(**access.client_kwargs(), client_id="envpipe-admin")
    try:
        await admin.start()
    except KafkaConnectionError as exc:
        await admin.close()
        raise await access.connection_error(exc) from exc
    try:
        _, failed = await create_with(admin, names, partitions)
    finally:
        await admin.close()
    if failed:
        raise TopicError("cannot create topic(s): " + "; ".join(failed))


async def create_with(
    admin: AIOKafkaAdminClient, names: Iterable[str], partitions: int, replication: int = 1
) -> tuple[list[str], list[str]]:
    """Create topics through a started admin client: (created, "topic: why" failures).

    A topic that already exists (another worker was first) is neither.
    """
    response = await admin.create_topics(
        [NewTopic(name, partitions, replication) for name in names]
    )
    created, failed = [], []
    for topic, code, message in response.topic_errors:
        if code == 0:
            created.append(topic)
        elif code != _TOPIC_ALREADY_EXISTS:
            failed.append(f"{topic}: {message or f'error code {code}'}")
    return created, failed


@asynccontextmanager
async def consumer(brokers: KafkaAccess | str, *, client_id: str) -> AsyncIterator[Any]:
    """A started consumer with no group and no commits, stopped on exit."""
    access = KafkaAccess.of(brokers)
    kafka = AIOKafkaConsumer(
        **access.client_kwargs(), client_id=client_id, group_id=None, enable_auto_commit=False
    )
    try:
        await kafka.start()
    except KafkaConnectionError as exc:
        await kafka.stop()
        raise await access.connection_error(exc) from exc
    try:
        yield kafka
    finally:
        await kafka.stop()


async def _partitions(kafka: Any, topic: str) -> list[TopicPartition]:
    """Every partition of `topic`, or a TopicError that says the topic does not exist."""
    partitions = kafka.partitions_for_topic(topic)
    if partitions is None:
        known = await kafka.topics()
        if topic not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise TopicError(f"topic {topic!r} does not exist (topics on the broker: {listed})")
        raise TopicError(f"topic {topic!r} has no partition metadata yet; try again")
    return [TopicPartition(topic, partition) for partition in sorted(partitions)]


async def scan(
    brokers: KafkaAccess | str,
    topic: str,
    *,
    client_id: str,
    limit: int | None = None,
    stall_seconds: float = 15.0,
) -> AsyncGenerator[list[Any], None]:
    """Yield batches of `topic`'s records from the start of every partition, up to its end.

    "The end" is each partition's high watermark as seen when the scan reaches it, so records
    appended meanwhile may or may not be included. Each batch is sorted by (partition,
    offset). Stops after `limit` records; raises TopicError if no partition makes progress
    for `stall_seconds` (a partition without a leader, say). A consumer of its own per scan:
    aiokafka narrows its metadata to the assigned topics, so one cannot scan a second topic.
    """
    async with consumer(brokers, client_id=client_id) as kafka:
        partitions = await _partitions(kafka, topic)
        kafka.assign(partitions)
        await kafka.seek_to_beginning(*partitions)
        remaining = limit
        last_progress = time.monotonic()
        while remaining is None or remaining > 0:
            pending = [tp for tp in partitions if not await _at_end(kafka, tp)]
            if not pending:
                return
            fetched = await kafka.getmany(*pending, timeout_ms=_POLL_MS, max_records=remaining)
            batch = sorted(
                (record for records in fetched.values() for record in records),
                key=lambda record: (record.partition, record.offset),
            )
            if batch:
                last_progress = time.monotonic()
                if remaining is not None:
                    batch = batch[:remaining]
                    remaining -= len(batch)
                yield batch
            elif time.monotonic() - last_progress > stall_seconds:
                stuck = ", ".join(str(tp.partition) for tp in pending)
                raise TopicError(f"topic {topic!r}: partition(s) {stuck} stopped answering")


async def _at_end(kafka: Any, tp: TopicPartition) -> bool:
    """Whether the consumer's position has reached the partition's last fetched high watermark."""
    highwater = kafka.highwater(tp)
    return highwater is not None and await kafka.position(tp) >= highwater
