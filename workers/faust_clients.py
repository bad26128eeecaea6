"""What one Faust worker's `AgentCrypto` seals and opens with, from first use to shutdown.

`AgentCrypto` (`workers.faust_helpers`) handles records; this owns the things it needs:
one counting service client, the `Encryptor` and `Decryptor` over it, and the v2 keys
topics. They are the stream workers' `Seal` and `Open` transforms (`workers.transforms`)
sharing that client, so a Faust worker builds them as `envpipe encrypt` / `decrypt` do, and
their start is retried by the workers' one retry rule (`workers.flow.retrying`).

Everything is made on first use, inside the running worker, because a client belongs to
the loop it was made on (and so does the lock that keeps to one start at a time). It is
closed when the app shuts down; the counts of service calls and cache events outlive that.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from faust.types import AppT
from mode.types.signals import BaseSignalT

from pipeline.config import Settings, load_settings
from pipeline.decryptor import Decryptor
from pipeline.encryptor import Encryptor
from pipeline.keys_topic import KeysTopicReader, KeysTopicWriter
from pipeline.kms import CountingKms, open_kms
from workers.clients import compression
from workers.flow import retrying
from workers.jobs import keys_topic_of
from workers.kafka_access import KafkaAccess
from workers.transforms import Open, Seal

__all__ = ["AgentClients"]

log = logging.getLogger("envpipe.faust")

T = TypeVar("T")


class AgentClients:
    """The service client, `Encryptor`, `Decryptor` and keys topics of one worker process.

    `stream` names the encryption context of the encryptor ("" when the caller names it per
    record); `keys_topic` is the v2 keys topic to publish to (default: the destination's
    `<topic>.keys`, or ENVPIPE_KEYS_TOPIC).
    """

    def __init__(self, settings: Settings | None, *, stream: str, keys_topic: str) -> None:
        self._settings = settings
        self._stream = stream
        self._keys_topic = keys_topic
        #: service calls and cache events of the clients and caches closed so far
        self._closed_kms_calls: Counter[str] = Counter()
        self._closed_cache: Counter[str] = Counter()
        self._kms: CountingKms | None = None
        self._sealing: Seal | None = None
        self._opening: Open | None = None
        self._keys: list[KeysTopicWriter | KeysTopicReader] = []
        self._lock: asyncio.Lock | None = None

    @property
    def settings(self) -> Settings:
        """The envpipe settings: as given, else flags-free `load_settings()` (env, TOML)."""
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    @property
    def encryptor(self) -> Encryptor | None:
        """The encryptor once started (the per-record path, without the lock)."""
        return self._sealing.encryptor if self._sealing is not None else None

    @property
    def decryptor(self) -> Decryptor | None:
        """The decryptor once started."""
        return self._opening.decryptor if self._opening is not None else None

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
        halves = (self._sealing, self._opening)
        return [half.cache_stats for half in halves if half is not None]

    async def start_encryptor(self, app: AppT, dest: str) -> Encryptor:
        """The encryptor, started for records going to `dest` (its keys topic, in v2)."""
        async with self._starting():
            if self.encryptor is None:
                kms, settings = await self._open_kms(app), self.settings
                sink = None
                if settings.format == "v2":
                    kafka = KafkaAccess.from_settings(settings)
                    sink = await KeysTopicWriter.open(
                        self._keys_topic or keys_topic_of(dest, settings.keys_topic),
                        **kafka.client_kwargs(),
                        **compression(settings),
                    )
                    self._keys.append(sink)
                sealing = Seal(settings, stream=self._stream, client=kms)
                await self.retrying(lambda: sealing.start(sink, None))
                self._sealing = sealing
            return _started(self.encryptor)

    async def start_decryptor(self, app: AppT, source: str) -> Decryptor:
        """The decryptor, started for records read from `source` (and its keys topic)."""
        async with self._starting():
            if self.decryptor is None:
                kms, settings = await self._open_kms(app), self.settings
                kafka = KafkaAccess.from_settings(settings)
                reader = await KeysTopicReader.open(
                    keys_topic_of(source, settings.keys_topic),
                    max_headers=settings.keys_cache_size,
                    **kafka.client_kwargs(),
                )
                self._keys.append(reader)
                opening = Open(settings, client=kms)
                await self.retrying(lambda: opening.start(None, reader))
                self._opening = opening
            return _started(self.decryptor)

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
        halves, kms, keys = (self._sealing, self._opening), self._kms, self._keys
        for live in self._live_caches():
            self._closed_cache.update(live)
        if kms is not None:
            self._closed_kms_calls.update(kms.calls)
        self._sealing = self._opening = self._kms = None
        self._keys = []
        for half in halves:
            if half is not None:
                await half.close()  # its encryptor or decryptor; the client is ours
        for topic in keys:
            await topic.close()
        if kms is not None:
            calls = ", ".join(f"{name} {count}" for name, count in sorted(kms.calls.items()))
            log.info("KMS calls by operation: %s", calls or "none")
            await kms.close()

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """The stream workers' retry rule: jittered backoff on retriable errors."""
        return await retrying(
            attempt,
            what="the Faust agent",
            cap=self.settings.kms_retry_max_seconds,
            wait=asyncio.sleep,
        )


def _started(component: T | None) -> T:
    if component is None:  # a start that returned has set it
        raise RuntimeError("the start did not finish")
    return component
