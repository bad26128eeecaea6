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

`seal_to` / `open_to` do what the aiokafka workers in `workers.stream` do to one record, with
the same code: the record contract's header and dead-letter rules (`workers.contract`), the
one retry rule (`workers.flow.retrying`), and the library's `Encryptor` / `Decryptor`. The
key, timestamp and headers pass through, `envpipe.v` is added on seal and removed on open, a
tombstone stays a tombstone, and a record that cannot be processed goes to the dead-letter
topic with `envpipe.error` and `envpipe.source`. With `ENVPIPE_FORMAT=v2` it writes v2 and
publishes headers to the keys topic of each destination. The event is acknowledged only once the
broker has the output, so Faust never commits past a record that was not written
(at-least-once); that is why the stream must be ``noack()``. An error that retrying cannot
fix crashes the worker (exit code 1) without acknowledging the record, as the workers stop.

Why a helper and not a Faust codec: codecs are synchronous (`_dumps`/`_loads` return bytes)
and run inside Faust's serialization path on the event loop, while every first record of a
DEK needs service calls (generate-and-wrap and sign, or unwrap), which are network round trips.
A codec would have to block the loop for them, stalling every agent of the worker. A codec
also sees only the value, but the AAD binds the record key and the encryption context names
the stream, and a codec cannot dead-letter a record. See docs/faust.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiokafka.errors import MessageSizeTooLargeError
from faust.exceptions import ProducerSendError
from faust.types import AppT, EventT, TopicT
from mode.types.signals import BaseSignalT

from pipeline.config import Settings, load_settings
from pipeline.decryptor import Decryptor
from pipeline.encryptor import Encryptor
from pipeline.errors import DecryptionError, EnvpipeError, Reason, SealError
from pipeline.keys_topic import KeysTopicReader, KeysTopicWriter
from pipeline.kms import CountingKms, open_kms
from workers.faust_delivery import (
    Deliveries,
    Headers,
    dead_letter_headers,
    opened_headers,
    sealed_headers,
    send_like,
    size_change,
)
from workers.flow import retrying
from workers.jobs import keys_topic_of
from workers.kafka_access import KafkaAccess
from workers.stats import WorkerStats

__all__ = [
    "AgentCrypto",
    "dead_letter_headers",
    "opened_headers",
    "sealed_headers",
    "send_like",
]

log = logging.getLogger("envpipe.faust")

T = TypeVar("T")


class AgentCrypto:
    """One service client, `Encryptor` and `Decryptor` per worker, made on the worker's loop.

    Sharing them shares their caches: a DEK minted for one record serves the following ones
    (three service calls per DEK, not per record), and a reader unwraps each DEK once. They
    are made on first use, inside the running worker, because a client belongs to the loop
    it was made on, and closed when the app shuts down.

    `stream` names the encryption context ("envpipe:stream"); by default each record's
    source topic, as `envpipe encrypt` does. `keys_topic` is the v2 keys topic (default: the
    destination's `<topic>.keys`, or ENVPIPE_KEYS_TOPIC).

    `stats` counts what `seal_to` / `open_to` did, as the stream workers count it;
    `stats_json()` is the content of their stats file. `direction` names it there.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        stream: str | None = None,
        direction: str = "faust",
        keys_topic: str = "",
    ) -> None:
        self._settings = settings
        self._stream = stream
        self._keys_topic = keys_topic
        self.deliveries = Deliveries(WorkerStats(direction), self._crash)
        #: service calls and cache events of the clients and caches closed so far
        self._closed_kms_calls: Counter[str] = Counter()
        self._closed_cache: Counter[str] = Counter()
        self._kms: CountingKms | None = None
        self._encryptor: Encryptor | None = None
        self._decryptor: Decryptor | None = None
        self._keys: list[KeysTopicWriter | KeysTopicReader] = []
        self._lock: asyncio.Lock | None = None

    @property
    def settings(self) -> Settings:
        """The envpipe settings: as given, else flags-free `load_settings()` (env, TOML)."""
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    @property
    def stats(self) -> WorkerStats:
        return self.deliveries.stats

    @property
    def last_event(self) -> float | None:
        return self.deliveries.last_event

    @property
    def kms_calls(self) -> Counter[str]:
        """Service calls made so far, by operation (including before a `close()`)."""
        calls = Counter(self._closed_kms_calls)
        if self._kms is not None:
            calls.update(self._kms.calls)
        return calls

    @property
    def cache_stats(self) -> Counter[str]:
        """DEK cache events so far, of the encrypt and decrypt caches together."""
        events = Counter(self._closed_cache)
        for live in self._live_caches():
            events.update(live)
        return events

    def _live_caches(self) -> list[Counter[str]]:
        caches = (self._encryptor, self._decryptor)
        return [crypto.cache.stats for crypto in caches if crypto is not None]

    def stats_json(self) -> dict[str, Any]:
        """The stats file's content, in the format of the stream workers' (workers/stream.py)."""
        return self.stats.as_json(self.kms_calls, self.cache_stats)

    # -- one record --

    async def seal(self, event: EventT[Any], dest: str = "") -> bytes | None:
        """The envelope of the event's value (None for a tombstone).

        Retriable failures (service down, DEK spent) are retried with jittered backoff, so
        the agent waits rather than skipping the record or writing plaintext.
        """
        message = event.message
        if message.value is None:
            return None
        encryptor = self._encryptor or await self._start_encryptor(event.app, dest)
        value, key, headers = message.value, message.key, list(opened_headers(message.headers))
        stream = self._stream or message.topic
        return await self._retrying(
            lambda: encryptor.seal(value, key, headers=headers, stream=stream)
        )

    async def open(self, event: EventT[Any]) -> bytes | None:
        """The plaintext of the event's envelope (None for a tombstone).

        Raises `DecryptionError` (with a reason code) for a record that cannot be opened;
        retriable failures are retried with jittered backoff.
        """
        message = event.message
        if message.value is None:
            return None
        decryptor = self._decryptor or await self._start_decryptor(event.app, message.topic)
        value, key = message.value, message.key
        return await self._retrying(lambda: decryptor.open(value, key))

    # -- one record, through to the next topic --

    async def seal_to(self, dest: TopicT, event: EventT[Any], *, dlq: TopicT | None = None) -> None:
        """Seal the event into `dest`; acknowledge it once `dest` has it.

        Without `dlq`, a record that cannot be sealed crashes the worker instead.
        """
        self.deliveries.took(event)
        try:
            sealed = await self.seal(event, dest.get_topic_name())
        except SealError as exc:
            await self._reject(event, exc.reason, dlq, exc)
            return
        except EnvpipeError as exc:
            await self._crash(event, exc, "sealing failed and retrying cannot help")
            raise
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the stream
            log.error("a record could not be sealed: %s", type(exc).__name__)  # noqa: TRY400
            await self._reject(event, Reason.SEAL_FAILED, dlq, exc)
            return
        overhead = size_change(event.message.value, sealed)
        headers = sealed_headers(event.message.headers, self.settings.format)
        await self._deliver(dest, event, sealed, headers, dlq, overhead=overhead)

    async def open_to(self, dest: TopicT, event: EventT[Any], *, dlq: TopicT | None = None) -> None:
        """Open the event into `dest`, or dead-letter it; acknowledge it once written.

        Without `dlq`, a record that cannot be opened crashes the worker instead.
        """
        self.deliveries.took(event)
        try:
            opened = await self.open(event)
        except DecryptionError as exc:
            await self._reject(event, exc.reason, dlq, exc)
            return
        except EnvpipeError as exc:
            await self._crash(event, exc, "opening failed and retrying cannot help")
            raise
        overhead = size_change(opened, event.message.value)
        headers = opened_headers(event.message.headers)
        await self._deliver(dest, event, opened, headers, dlq, overhead=overhead)

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
            await self._reject(event, Reason.TOO_LARGE, dlq, exc)
            return
        self.deliveries.watch(delivery, event, None, overhead)

    async def _reject(
        self, event: EventT[Any], reason: str, dlq: TopicT | None, exc: Exception
    ) -> None:
        """Dead-letter the original record, or crash the worker if there is no DLQ."""
        if dlq is None:
            await self._crash(event, exc, f"a record cannot be processed (reason={reason})")
            raise exc
        message = event.message
        delivery = await send_like(dlq, event, message.value, dead_letter_headers(event, reason))
        self.deliveries.watch(delivery, event, str(reason), None)

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

    async def _start_encryptor(self, app: AppT, dest: str) -> Encryptor:
        async with self._starting():
            if self._encryptor is None:
                kms, settings = await self._open_kms(app), self.settings
                sink = None
                if settings.format == "v2":
                    kafka = KafkaAccess.from_settings(settings)
                    sink = await KeysTopicWriter.open(
                        self._keys_topic or keys_topic_of(dest, settings.keys_topic),
                        **kafka.client_kwargs(),
                    )
                    self._keys.append(sink)
                self._encryptor = await self._retrying(
                    lambda: Encryptor.from_settings(
                        kms, settings, stream=self._stream or "", header_sink=sink
                    )
                )
            return self._encryptor

    async def _start_decryptor(self, app: AppT, source: str) -> Decryptor:
        async with self._starting():
            if self._decryptor is None:
                kms, settings = await self._open_kms(app), self.settings
                kafka = KafkaAccess.from_settings(settings)
                reader = await KeysTopicReader.open(
                    keys_topic_of(source, settings.keys_topic),
                    max_headers=settings.keys_cache_size,
                    **kafka.client_kwargs(),
                )
                self._keys.append(reader)
                self._decryptor = await self._retrying(
                    lambda: Decryptor.from_settings(kms, settings, header_source=reader)
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
        """Drop every DEK and close the service client; the next use starts afresh."""
        encryptor, decryptor, kms, keys = self._encryptor, self._decryptor, self._kms, self._keys
        for live in self._live_caches():
            self._closed_cache.update(live)
        if kms is not None:
            self._closed_kms_calls.update(kms.calls)
        self._encryptor = self._decryptor = self._kms = None
        self._keys = []
        for crypto in (encryptor, decryptor):
            if crypto is not None:
                await crypto.close()
        for topic in keys:
            await topic.close()
        if kms is not None:
            calls = ", ".join(f"{name} {count}" for name, count in sorted(kms.calls.items()))
            log.info("KMS calls by operation: %s", calls or "none")
            await kms.close()

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """The stream workers' retry rule: jittered backoff on retriable errors."""
        return await retrying(
            attempt,
            what="the Faust agent",
            cap=self.settings.kms_retry_max_seconds,
            wait=asyncio.sleep,
        )
