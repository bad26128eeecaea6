"""The v2 keys topic on Kafka: a `HeaderSink` for writers, a `HeaderSource` for readers.

This is an IO edge (aiokafka), beside the pure core. The topic is compacted, keyed by
`dek_id`, and holds one signed header per DEK (`pipeline.envelope_v2`).

* `KeysTopicWriter.publish` produces a header with acks=all and returns once the broker has
  acknowledged it: the Encryptor calls it before any record under that DEK is sealed.
* `KeysTopicReader` reads the topic from the beginning (no consumer group, nothing
  committed), loads every header before `start()` returns, and keeps following it in the
  background, so a header published after the reader started is found moments later.

Memory: the reader keeps each header once, about 0.8 KiB of RSS per DEK for AWS-sized
~440-byte headers (`benchmarks/keys_load.py`: the bytes, the 16-byte key, the dict entry,
and what the fetches leave behind), at most `max_headers` of them; past that the oldest loaded
are dropped (logged once), and their records would end as `header_missing`. Size it above the
number of DEKs in the encrypted topic's retention. A reader trusts nothing it loads: every
header is verified like a v1 header before it can cause an unwrap. It does keep the *first*
header seen for a `dek_id` and ignores a later, different one (logged), so a forged header
written after the real one cannot replace it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.errors import TopicError

__all__ = ["InMemoryHeaders", "KeysTopicReader", "KeysTopicWriter", "topic_partitions"]

log = logging.getLogger("envpipe.keys")

_POLL_MS = 200
_LOAD_STALL_SECONDS = 30.0
_APPEAR_POLL_SECONDS = 2.0
_METADATA_WAIT_SECONDS = 10.0
_UNREADABLE_RETRY_SECONDS = 5.0


async def topic_partitions(consumer: Any, topic: str) -> set[int] | None:
    """The partition numbers of `topic` as a started aiokafka consumer sees them; None if the
    topic does not exist. The consumer may be left assigned to the topic's partition 0.

    A new aiokafka consumer asks for the metadata of no topic (a Metadata request with an
    empty list): Tansu answers with every topic, Apache Kafka with none, and the consumer
    then refreshes only the topics it is assigned (all of them every 5 minutes). So a topic
    it does not know is looked for in `topics()` and, if there, assigned (partition 0, which
    every topic has), which fetches its metadata at once.
    """
    partitions = consumer.partitions_for_topic(topic)
    if partitions:
        return set(partitions)
    if topic not in await consumer.topics():
        return None
    consumer.assign([TopicPartition(topic, 0)])
    deadline = time.monotonic() + _METADATA_WAIT_SECONDS
    while not (partitions := consumer.partitions_for_topic(topic)):
        if time.monotonic() > deadline:
            raise TopicError(f"topic {topic!r} exists but its partitions are not known yet")
        await asyncio.sleep(_POLL_MS / 1000)
    return set(partitions)


class InMemoryHeaders:
    """A `HeaderSink` and `HeaderSource` in one dict: v2 in a single process (tests, timing).

    Not durable: a reader in another process cannot see these headers.
    """

    def __init__(self) -> None:
        self._headers: dict[bytes, bytes] = {}

    async def publish(self, dek_id: bytes, header: bytes) -> None:
        self._headers.setdefault(dek_id, header)

    def get(self, dek_id: bytes) -> bytes | None:
        return self._headers.get(dek_id)

    def __len__(self) -> int:
        return len(self._headers)


class KeysTopicWriter:
    """Publishes headers through a started producer (acks=all); owns it if it made it."""

    def __init__(self, producer: Any, topic: str, *, owned: bool = False) -> None:
        self.topic = topic
        self._producer = producer
        self._owned = owned
        self.published = 0

    @classmethod
    async def open(cls, topic: str, **client_kwargs: Any) -> KeysTopicWriter:
        """A writer with a producer of its own (`client_kwargs` as for any aiokafka client)."""
        producer = AIOKafkaProducer(**client_kwargs, acks="all", enable_idempotence=False)
        await producer.start()
        return cls(producer, topic, owned=True)

    async def publish(self, dek_id: bytes, header: bytes) -> None:
        """Produce the header under its dek_id and wait for the acknowledgement."""
        sent = await self._producer.send(self.topic, header, key=dek_id)
        await sent
        self.published += 1

    async def close(self) -> None:
        if self._owned:
            await self._producer.stop()


class KeysTopicReader:
    """Every header of the keys topic, in memory, kept current by a background task."""

    def __init__(self, consumer: Any, topic: str, *, max_headers: int = 200_000) -> None:
        self.topic = topic
        self._consumer = consumer
        self._max_headers = max_headers
        self._headers: OrderedDict[bytes, bytes] = OrderedDict()
        self._follow: asyncio.Task[None] | None = None
        self._warned_full = False
        self.conflicts = 0
        #: seconds the initial load took, and how many headers it found
        self.load_seconds = 0.0
        self.loaded = 0

    @classmethod
    async def open(
        cls, topic: str, *, max_headers: int = 200_000, follow: bool = True, **client_kwargs: Any
    ) -> KeysTopicReader:
        """Start a group-less consumer on every partition of `topic` and load it all.

        With `follow`, keep reading in the background (and wait for the topic to appear, if
        it does not exist yet: a reader may start before the first v2 writer).
        """
        consumer = AIOKafkaConsumer(
            **client_kwargs, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=100
        )
        await consumer.start()
        reader = cls(consumer, topic, max_headers=max_headers)
        try:
            await reader.start(follow=follow)
        except BaseException:
            await consumer.stop()
            raise
        return reader

    def get(self, dek_id: bytes) -> bytes | None:
        return self._headers.get(dek_id)

    def __len__(self) -> int:
        return len(self._headers)

    async def start(self, *, follow: bool = True) -> None:
        """Load up to each partition's end (from fetch high watermarks), then keep following."""
        partitions = await topic_partitions(self._consumer, self.topic)
        if partitions:
            await self._load(partitions)
        else:
            log.info("keys topic %s does not exist (yet); no v2 header known", self.topic)
        if follow:
            self._follow = asyncio.create_task(
                self._keep_following(assigned=bool(partitions)), name="envpipe-keys-topic"
            )

    async def _load(self, partitions: set[int]) -> None:
        assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(assigned)
        await self._consumer.seek_to_beginning(*assigned)
        started = time.monotonic()
        last_progress = started
        while pending := [tp for tp in assigned if not await self._at_end(tp)]:
            if await self._poll(pending):
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > _LOAD_STALL_SECONDS:
                raise TopicError(f"keys topic {self.topic!r} stopped answering while loading")
        self.load_seconds = time.monotonic() - started
        self.loaded = len(self._headers)
        log.info("loaded %d headers from %s in %.2fs", self.loaded, self.topic, self.load_seconds)

    async def _at_end(self, tp: TopicPartition) -> bool:
        highwater = self._consumer.highwater(tp)
        return highwater is not None and await self._consumer.position(tp) >= highwater

    async def _poll(self, partitions: list[TopicPartition] | None = None) -> int:
        try:
            fetched = await self._consumer.getmany(*(partitions or ()), timeout_ms=_POLL_MS)
        except Exception as exc:
            if isinstance(exc, KafkaError) and exc.retriable:
                raise
            # Not a passing fault: a record batch that cannot be decoded (a codec's own
            # error, a bad CRC). Say where the reader stands, never skip past it.
            kind = type(exc).__name__
            kind = f"{type(exc).__module__}.{kind}" if kind.islower() else kind
            at = ", ".join(
                [
                    f"{tp.partition} at offset {await self._consumer.position(tp)}"
                    for tp in sorted(self._consumer.assignment())
                ]
            )
            raise TopicError(
                f"the keys topic {self.topic!r} cannot be read past a record batch it cannot "
                f"decode (partition {at}; {kind}: {exc})"
            ) from exc
        count = 0
        for records in fetched.values():
            for record in records:
                self._add(record.key, record.value)
                count += 1
        return count

    def _add(self, dek_id: bytes | None, header: bytes | None) -> None:
        if not dek_id or not header:
            return  # not a header (a tombstone, a stray record): nothing to keep
        known = self._headers.get(dek_id)
        if known is not None:
            if known != header:
                self.conflicts += 1
                log.warning(
                    "keys topic %s has a second, different header for dek_id %s; keeping "
                    "the first (who else writes this topic?)",
                    self.topic,
                    dek_id.hex(),
                )
            return
        self._headers[dek_id] = header
        if len(self._headers) > self._max_headers:
            self._headers.popitem(last=False)
            if not self._warned_full:
                self._warned_full = True
                log.warning(
                    "more than %d headers in %s: dropping the oldest; records under them "
                    "will be dead-lettered as header_missing",
                    self._max_headers,
                    self.topic,
                )

    async def _keep_following(self, *, assigned: bool) -> None:
        while not assigned:  # wait for the first writer to create the topic
            await asyncio.sleep(_APPEAR_POLL_SECONDS)
            with contextlib.suppress(KafkaError, TopicError):
                assigned = await self._load_once_created()
        while True:
            try:
                await self._poll()
            except KafkaError as exc:
                log.warning("reading the keys topic %s failed (%s); retrying", self.topic, exc)
                await asyncio.sleep(1.0)
            except TopicError as exc:  # headers after it cannot arrive: records will wait
                log.error("%s; v2 records under later DEKs end as header_missing", exc)  # noqa: TRY400
                await asyncio.sleep(_UNREADABLE_RETRY_SECONDS)

    async def _load_once_created(self) -> bool:
        """Load the topic if it exists now; whether it does."""
        partitions = await topic_partitions(self._consumer, self.topic)
        if partitions:
            await self._load(partitions)
        return bool(partitions)

    async def close(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
        await self._consumer.stop()
