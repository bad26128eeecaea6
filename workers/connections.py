"""What a stream worker opens before its first fetch, and closes after its last.

Opened in this order: the producer (transactional when exactly-once), the output topics, the
group consumer; then, retried by the worker while the service is not there, the v2 keys
topic (writer, reader) as the direction needs it, and the transform (its service client).
Closed in the order that loses nothing: the producer first (it flushes), the consumer (it
leaves the group), the keys reader, the transform, and the keys writer last, once no DEK can
be minted any more. Kept apart from `workers.loop` so the loop reads as fetch, transform,
deliver, and so opening and closing are read side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiokafka import ConsumerRebalanceListener

from pipeline.config import Settings
from pipeline.keys_topic import KeysTopicReader, KeysTopicWriter
from workers.clients import compression, new_consumer, new_producer_for
from workers.jobs import Job
from workers.kafka_access import KafkaAccess
from workers.topics import ensure_keys_topic, ensure_outputs
from workers.transforms import Transform

__all__ = ["Connections"]

log = logging.getLogger("envpipe.stream")


class Connections:
    """One worker's Kafka clients, keys-topic clients and started transform."""

    def __init__(
        self, kafka: KafkaAccess, settings: Settings, job: Job, transform: Transform
    ) -> None:
        self._kafka = kafka
        self._settings = settings
        self._job = job
        self._transform = transform
        self.consumer: Any = None
        self.producer: Any = None
        self._keys: tuple[KeysTopicWriter | None, KeysTopicReader | None] = (None, None)
        #: set when the worker runs exactly-once (a transactional producer)
        self.transactional_id: str | None = None

    async def start_kafka(
        self, listener: ConsumerRebalanceListener, *, on_consumer: Callable[[Any], None]
    ) -> None:
        """Producer, output topics, consumer; `on_consumer` sees the consumer before it joins
        the group (joining runs `listener`)."""
        settings, job = self._settings, self._job
        client_id = f"envpipe-{self._transform.direction}"
        self.producer, self.transactional_id = await new_producer_for(
            self._kafka, settings, client_id=client_id, group=job.group
        )
        await self.producer.start()
        await ensure_outputs(self._kafka, job.source, [job.dest, *([job.dlq] if job.dlq else [])])
        self.consumer = new_consumer(
            self._kafka,
            settings,
            client_id=client_id,
            group_id=job.group,
            read_committed=settings.exactly_once,
        )
        on_consumer(self.consumer)
        self.consumer.subscribe([job.source], listener=listener)
        await self.consumer.start()

    async def start_transform(self) -> None:
        """The v2 keys topic (if this direction needs it), then the transform itself."""
        kafka, job, transform = self._kafka, self._job, self._transform
        writer, reader = self._keys
        if transform.writes_headers(self._settings) and writer is None:
            await ensure_keys_topic(kafka, job.keys_out, like=job.dest)
            if self.transactional_id:  # a header must be acknowledged outside any transaction
                writer = await KeysTopicWriter.open(
                    job.keys_out, **kafka.client_kwargs(), **compression(self._settings)
                )
            else:
                writer = KeysTopicWriter(self.producer, job.keys_out)
            self._keys = (writer, reader)  # closed at the end even if a retry follows
        if transform.reads_headers and reader is None:
            reader = await KeysTopicReader.open(
                job.keys_in,
                max_headers=self._settings.keys_cache_size,
                **kafka.client_kwargs(),
            )
        self._keys = (writer, reader)
        await transform.start(writer, reader)

    async def close(self) -> None:
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
        await self._transform.close()
        if self._keys[0] is not None:  # after the transform: no DEK is minted any more
            await self._keys[0].close()  # stops its producer, if it has its own
