"""Producing the pipeline stage's input and watching its output, from the harness process.

The producer appends records straight into per-partition batches (`create_batch` /
`send_batch`), a few microseconds of CPU per record, so the harness takes as little of this
2-core machine from the worker under test as it can. Timestamps are the moment a record is
appended, so a worker's latency (acknowledgement minus timestamp) starts there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.config import MIB

Pair = tuple[bytes | None, bytes]  # (key, value)
_BATCH_RECORDS = 500
_TICK_SECONDS = 0.005
_POLL_SECONDS = 0.05


async def open_producer(bootstrap_servers: str) -> Any:
    """A started producer like the workers' (acks=all, no idempotence)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id="envpipe-bench-load",
        acks="all",
        enable_idempotence=False,
        linger_ms=0,
        max_batch_size=MIB,
        max_request_size=2 * MIB,
    )
    await producer.start()
    return producer


async def produce(
    producer: Any,
    topic: str,
    pairs: Sequence[Pair],
    count: int,
    *,
    partitions: int,
    rate: float | None = None,
    timestamp_shift_ms: int = 0,
) -> float:
    """Produce `count` records cycling `pairs`, round-robin over partitions; returns seconds.

    With `rate` the records are paced (every 5 ms, whatever is due); without, they go as
    fast as the producer takes them. Waits until every record is acknowledged.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    acks: list[asyncio.Future[Any]] = []
    while sent < count:
        due = count if rate is None else min(count, int((loop.time() - start) * rate) + 1)
        while sent < due:
            now_ms = int(time.time() * 1000) + timestamp_shift_ms
            batches = [producer.create_batch() for _ in range(partitions)]
            stop = min(due, sent + _BATCH_RECORDS * partitions)
            for index in range(sent, stop):
                key, value = pairs[index % len(pairs)]
                batches[index % partitions].append(
                    key=key, value=value, timestamp=now_ms, headers=[]
                )
            for partition, batch in enumerate(batches):
                if batch.record_count():
                    acks.append(await producer.send_batch(batch, topic, partition=partition))
            sent = stop
        if rate is not None and sent < count:
            await asyncio.sleep(_TICK_SECONDS)
    await asyncio.gather(*acks)
    return loop.time() - start


class OutputWatch:
    """Counts the records in an output topic while a worker writes it, cheaply.

    It asks for the end offsets every 50 ms (no fetching). The topic must exist already:
    asking about a missing topic makes the embedded broker create it with its defaults.
    There, end offsets lag by up to one producer batch per partition, which shifts both ends
    of a measuring window alike and so does not bias a rate taken between two crossings.
    """

    def __init__(self, bootstrap_servers: str, topic: str, partitions: int) -> None:
        self._partitions = [TopicPartition(topic, index) for index in range(partitions)]
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            client_id="envpipe-bench-watch",
            group_id=None,
            enable_auto_commit=False,
        )
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect; sampling starts with `sample_in_background`."""
        await self._consumer.start()

    async def count(self) -> int:
        """Records in the topic now."""
        try:
            offsets = await self._consumer.end_offsets(self._partitions)
        except KafkaError:
            return 0
        return int(sum(offsets.values()))

    def sample_in_background(self) -> None:
        """Record (time, count) every 50 ms until `stop`."""

        async def sample() -> None:
            while True:
                self.samples.append((time.monotonic(), await self.count()))
                await asyncio.sleep(_POLL_SECONDS)

        self._task = asyncio.create_task(sample())

    def rate_between(self, low: int, high: int) -> float | None:
        """Records/s between the first samples at or above `low` and `high`; None if unseen."""
        first = next((when for when, seen in self.samples if seen >= low), None)
        last = next(((when, seen) for when, seen in self.samples if seen >= high), None)
        start = next((seen for when, seen in self.samples if when == first), None)
        if first is None or last is None or start is None or last[0] <= first:
            return None
        return (last[1] - start) / (last[0] - first)

    async def stop(self) -> None:
        """Stop sampling and disconnect."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()
