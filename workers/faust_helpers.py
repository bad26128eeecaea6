"""Envelope encryption inside your own Faust agents, record for record like `envpipe encrypt`.

Use one `AgentCrypto` per worker process, at module level next to your app, and call it in
an ``async for`` over a ``noack()`` stream of raw bytes::

    app = faust.App("orders", broker="kafka://localhost:9092",
                    key_serializer="raw", value_serializer="raw")
    orders, sealed = app.topic("orders"), app.topic("orders.enc")
    crypto = AgentCrypto()  # ENVPIPE_* settings; KMS client made on first use

    @app.agent(orders)
    async def encrypt(stream):
        async for event in stream.noack().events():
            await crypto.seal_to(sealed, event)

`seal_to` / `open_to` do what the aiokafka workers in `workers.stream` do to one record: the
key, timestamp and headers pass through, `envpipe.v` is added on seal and removed on open, a
tombstone stays a tombstone, and a record that cannot be processed goes to the dead-letter
topic with `envpipe.error` and `envpipe.source`. The event is acknowledged only once the
broker has the output, so Faust never commits past a record that was not written
(at-least-once); that is why the stream must be ``noack()``. An error that retrying cannot
fix crashes the worker (exit code 1) without acknowledging the record, as the workers stop.

Why a helper and not a Faust codec: codecs are synchronous (`_dumps`/`_loads` return bytes)
and run inside Faust's serialization path on the event loop, while every first record of a
DEK needs KMS calls (GenerateDataKey and Sign, or Decrypt), which are network round trips.
A codec would have to block the loop for them, stalling every agent of the worker. A codec
also sees only the value, but the AAD binds the record key and the encryption context names
the stream, and a codec cannot dead-letter a record. See docs/faust.md.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from typing import Any, TypeVar

from aiokafka.errors import MessageSizeTooLargeError
from faust.exceptions import ProducerSendError
from faust.types import AppT, EventT, ProducerT, TopicT
from faust.types.core import HeadersArg
from mode.types.signals import BaseSignalT

from pipeline.config import Settings, load_settings
from pipeline.crypto import Decryptor, Encryptor
from pipeline.envelope import VERSION_HEADER
from pipeline.errors import DecryptionError, EnvpipeError
from pipeline.kms.counting import CountingKms
from pipeline.retry import backoff_delay
from workers.runtime import open_kms
from workers.stats import WorkerStats
from workers.stream import ERROR_HEADER, SOURCE_HEADER

__all__ = [
    "AgentCrypto",
    "dead_letter_headers",
    "opened_headers",
    "sealed_headers",
    "send_like",
]

log = logging.getLogger("envpipe.faust")

T = TypeVar("T")
Headers = list[tuple[str, bytes]]

#: Reason codes for records that fail outside the crypto layer (the stream workers' codes).
SEAL_FAILED = "seal_failed"
TOO_LARGE = "too_large"


def sealed_headers(headers: HeadersArg | None) -> Headers:
    """The headers of an envelope record: the original ones plus `envpipe.v`."""
    return [*_pairs(headers), VERSION_HEADER]


def opened_headers(headers: HeadersArg | None) -> Headers:
    """The headers of an opened record: the original ones without `envpipe.v`."""
    return [header for header in _pairs(headers) if header[0] != VERSION_HEADER[0]]


def dead_letter_headers(event: EventT[Any], reason: str) -> Headers:
    """The original headers plus the reason code and where the record came from."""
    message = event.message
    where = f"{message.topic}/{message.partition}/{message.offset}"
    return [
        *_pairs(message.headers),
        (ERROR_HEADER, reason.encode()),
        (SOURCE_HEADER, where.encode()),
    ]


def _pairs(headers: HeadersArg | None) -> Iterable[tuple[str, bytes]]:
    """Kafka headers as (name, value) pairs, in order, repeats kept (Faust's events hold a dict)."""
    if headers is None:
        return ()
    return headers.items() if isinstance(headers, Mapping) else headers


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


def _size_change(plaintext: bytes | None, envelope: bytes | None) -> int | None:
    """Bytes the envelope adds to the plaintext; None for a tombstone."""
    if plaintext is None or envelope is None:
        return None
    return len(envelope) - len(plaintext)


class AgentCrypto:
    """One KMS client, `Encryptor` and `Decryptor` per worker, created on the worker's loop.

    Sharing them shares their caches: a DEK minted for one record serves the following ones
    (two KMS calls per DEK, not per record), and a reader unwraps each DEK once. They are
    made on first use, inside the running worker, because aiobotocore's client belongs to
    the loop it was made on, and closed when the app shuts down.

    `stream` names the encryption context ("envpipe:stream"); by default each record's
    source topic, as `envpipe encrypt` does.

    `stats` counts what `seal_to` / `open_to` did, as the stream workers count it (records
    in and out, dead letters, latency at acknowledgement); `stats_json()` is the content of
    their stats file. `direction` names it there.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        stream: str | None = None,
        direction: str = "faust",
    ) -> None:
        self._settings = settings
        self._stream = stream
        self.stats = WorkerStats(direction)
        #: `time.monotonic()` of the latest event handed to `seal_to` / `open_to`
        self.last_event: float | None = None
        #: KMS calls and cache events of the clients and caches closed so far
        self._closed_kms_calls: Counter[str] = Counter()
        self._closed_cache: Counter[str] = Counter()
        self._kms: CountingKms | None = None
        self._encryptor: Encryptor | None = None
        self._decryptor: Decryptor | None = None
        self._lock: asyncio.Lock | None = None
        self._crashes: set[asyncio.Task[None]] = set()

    @property
    def settings(self) -> Settings:
        """The envpipe settings: as given, else flags-free `load_settings()` (env, TOML)."""
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    @property
    def kms_calls(self) -> Counter[str]:
        """KMS calls made so far, by operation (including before a `close()`)."""
        calls = Counter(self._closed_kms_calls)
        if self._kms is not None:
            calls.update(self._kms.calls)
        return calls

    @property
    def cache_stats(self) -> Counter[str]:
        """DEK cache events so far, of the encrypt and decrypt caches together."""
        events = Counter(self._closed_cache)
        for cache_stats in self._live_cache_stats():
            events.update(cache_stats)
        return events

    def _live_cache_stats(self) -> list[Counter[str]]:
        live: list[Counter[str]] = []
        if self._encryptor is not None:
            live.append(self._encryptor.cache.stats)
        if self._decryptor is not None:
            live.append(self._decryptor.cache.stats)
        return live

    def stats_json(self) -> dict[str, Any]:
        """The stats file's content, in the format of the stream workers' (workers/stream.py)."""
        return self.stats.as_json(self.kms_calls, self.cache_stats)

    # -- one record --

    async def seal(self, event: EventT[Any]) -> bytes | None:
        """The envelope of the event's value (None for a tombstone).

        Retriable failures (KMS down, DEK spent) are retried with jittered backoff, so the
        agent waits rather than skipping the record or writing plaintext.
        """
        message = event.message
        if message.value is None:
            return None
        encryptor = self._encryptor or await self._start_encryptor(event.app)
        value, key = message.value, message.key
        stream = self._stream or message.topic
        return await self._retrying(lambda: encryptor.seal(value, key, stream=stream))

    async def open(self, event: EventT[Any]) -> bytes | None:
        """The plaintext of the event's envelope (None for a tombstone).

        Raises `DecryptionError` (with a reason code) for a record that cannot be opened;
        retriable KMS failures are retried with jittered backoff.
        """
        message = event.message
        if message.value is None:
            return None
        decryptor = self._decryptor or await self._start_decryptor(event.app)
        value, key = message.value, message.key
        return await self._retrying(lambda: decryptor.open(value, key))

    # -- one record, through to the next topic --

    async def seal_to(self, dest: TopicT, event: EventT[Any], *, dlq: TopicT | None = None) -> None:
        """Seal the event into `dest`; acknowledge it once `dest` has it.

        Without `dlq`, a record that cannot be sealed crashes the worker instead.
        """
        self._took(event)
        try:
            sealed = await self.seal(event)
        except EnvpipeError as exc:
            await self._crash(event, exc, "sealing failed and retrying cannot help")
            raise
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the stream
            log.error("a record could not be sealed: %s", type(exc).__name__)  # noqa: TRY400
            await self._reject(event, SEAL_FAILED, dlq, exc)
            return
        overhead = _size_change(event.message.value, sealed)
        headers = sealed_headers(event.message.headers)
        await self._deliver(dest, event, sealed, headers, dlq, overhead=overhead)

    async def open_to(self, dest: TopicT, event: EventT[Any], *, dlq: TopicT | None = None) -> None:
        """Open the event into `dest`, or dead-letter it; acknowledge it once written.

        Without `dlq`, a record that cannot be opened crashes the worker instead.
        """
        self._took(event)
        try:
            opened = await self.open(event)
        except DecryptionError as exc:
            await self._reject(event, exc.reason.value, dlq, exc)
            return
        except EnvpipeError as exc:
            await self._crash(event, exc, "opening failed and retrying cannot help")
            raise
        overhead = _size_change(opened, event.message.value)
        headers = opened_headers(event.message.headers)
        await self._deliver(dest, event, opened, headers, dlq, overhead=overhead)

    def _took(self, event: EventT[Any]) -> None:
        """Count an event handed to `seal_to` / `open_to`."""
        self.last_event = now = time.monotonic()
        self.stats.fetched(1, now)
        message = event.message
        self.stats.records_in_by_partition[f"{message.topic}/{message.partition}"] += 1

    async def _deliver(
        self,
        dest: TopicT,
        event: EventT[Any],
        value: bytes | None,
        headers: Headers,
        dlq: TopicT | None,
        *,
        overhead: int | None,
    ) -> None:
        """Produce the output; `overhead` is envelope minus plaintext bytes (None: tombstone)."""
        try:
            delivery = await send_like(dest, event, value, headers)
        except ProducerSendError as exc:  # Faust's wrapper of aiokafka's errors
            if not isinstance(exc.__cause__, MessageSizeTooLargeError):
                await self._crash(event, exc, "producing failed")
                raise
            await self._reject(event, TOO_LARGE, dlq, exc)
            return
        delivery.add_done_callback(partial(self._delivered, event, None, overhead))

    async def _reject(
        self, event: EventT[Any], reason: str, dlq: TopicT | None, exc: Exception
    ) -> None:
        """Dead-letter the original record, or crash the worker if there is no DLQ."""
        if dlq is None:
            await self._crash(event, exc, f"a record cannot be processed (reason={reason})")
            raise exc
        message = event.message
        delivery = await send_like(dlq, event, message.value, dead_letter_headers(event, reason))
        delivery.add_done_callback(partial(self._delivered, event, reason, None))

    def _delivered(
        self,
        event: EventT[Any],
        reason: str | None,
        overhead: int | None,
        delivery: asyncio.Future[Any],
    ) -> None:
        """Acknowledge the event once its output is written; crash the worker if it never is.

        `reason` is the dead-letter reason code, None for a record written to its destination.
        """
        if not delivery.cancelled() and delivery.exception() is None:
            event.ack()
            self._count_acknowledged(event, reason, overhead)
            return
        error = (
            delivery.exception() if not delivery.cancelled() else asyncio.CancelledError()
        ) or RuntimeError("delivery failed")
        task = asyncio.ensure_future(
            self._crash(event, error, "producing failed after the producer's retries")
        )
        self._crashes.add(task)
        task.add_done_callback(self._crashes.discard)

    def _count_acknowledged(
        self, event: EventT[Any], reason: str | None, overhead: int | None
    ) -> None:
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

    @staticmethod
    async def _crash(event: EventT[Any], exc: BaseException, why: str) -> None:
        """Stop the worker without acknowledging the record, so it is read again on restart."""
        message = event.message
        log.error(
            "%s at %s/%d/%d (%s); stopping the worker without committing it",
            why,
            message.topic,
            message.partition,
            message.offset,
            type(exc).__name__,
        )
        await event.app.crash(exc)

    # -- lifecycle --

    async def _start_encryptor(self, app: AppT) -> Encryptor:
        async with self._starting():
            if self._encryptor is None:
                kms = await self._open_kms(app)
                self._encryptor = Encryptor.from_settings(
                    kms, self.settings, stream=self._stream or ""
                )
            return self._encryptor

    async def _start_decryptor(self, app: AppT) -> Decryptor:
        async with self._starting():
            if self._decryptor is None:
                kms = await self._open_kms(app)
                self._decryptor = await self._retrying(
                    lambda: Decryptor.from_settings(kms, self.settings)
                )
            return self._decryptor

    def _starting(self) -> asyncio.Lock:
        """One start at a time (made lazily: a lock belongs to the loop that first uses it)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _open_kms(self, app: AppT) -> CountingKms:
        if self._kms is None:
            self._kms = CountingKms(await open_kms(self.settings))
            app.on_before_shutdown.connect(self._on_shutdown)
        return self._kms

    async def _on_shutdown(self, app: Any, /, *_: Any, signal: BaseSignalT[Any], **__: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Drop every DEK and close the KMS client; the next use starts afresh."""
        encryptor, decryptor, kms = self._encryptor, self._decryptor, self._kms
        for cache_stats in self._live_cache_stats():
            self._closed_cache.update(cache_stats)
        if kms is not None:
            self._closed_kms_calls.update(kms.calls)
        self._encryptor = self._decryptor = self._kms = None
        if encryptor is not None:
            await encryptor.close()
        if decryptor is not None:
            decryptor.close()
        if kms is not None:
            calls = ", ".join(f"{name} {count}" for name, count in sorted(kms.calls.items()))
            log.info("KMS calls by operation: %s", calls or "none")
            await kms.close()

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` until it succeeds, backing off (jittered) on retriable errors."""
        failures = 0
        while True:
            try:
                return await attempt()
            except EnvpipeError as exc:
                if not exc.retriable:
                    raise
                failures += 1
                delay = backoff_delay(failures, self.settings.kms_retry_max_seconds)
                log.warning(
                    "%s; nothing skipped, retry %d in %.2fs", type(exc).__name__, failures, delay
                )
                await asyncio.sleep(delay)
