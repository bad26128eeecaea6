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

import logging
from collections import Counter
from typing import Any

from faust.types import EventT, TopicT

from pipeline.config import Settings
from pipeline.errors import DecryptionError, EnvpipeError, Reason, SealError
from workers.faust_clients import AgentClients
from workers.faust_delivery import (
    dead_letter_headers,
    opened_headers,
    sealed_headers,
    send_like,
    size_change,
)
from workers.faust_outcomes import Outcomes, crash
from workers.stats import WorkerStats

__all__ = [
    "AgentCrypto",
    "dead_letter_headers",
    "opened_headers",
    "sealed_headers",
    "send_like",
]

log = logging.getLogger("envpipe.faust")


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

    This class decides what each record becomes; `clients` (`workers.faust_clients`) holds
    what it seals and opens with, and `outcomes` (`workers.faust_outcomes`) writes the result.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        stream: str | None = None,
        direction: str = "faust",
        keys_topic: str = "",
    ) -> None:
        self._stream = stream
        self.clients = AgentClients(settings, stream=stream or "", keys_topic=keys_topic)
        self.outcomes = Outcomes(WorkerStats(direction))
        self.deliveries = self.outcomes.deliveries

    @property
    def settings(self) -> Settings:
        """The envpipe settings: as given, else flags-free `load_settings()` (env, TOML)."""
        return self.clients.settings

    @property
    def stats(self) -> WorkerStats:
        return self.deliveries.stats

    @property
    def last_event(self) -> float | None:
        return self.deliveries.last_event

    @property
    def kms_calls(self) -> Counter[str]:
        """Service calls made so far, by operation (including before a `close()`)."""
        return self.clients.kms_calls

    @property
    def cache_stats(self) -> Counter[str]:
        """DEK cache events so far, of the encrypt and decrypt caches together."""
        return self.clients.cache_stats

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
        encryptor = self.clients.encryptor or await self.clients.start_encryptor(event.app, dest)
        value, key, headers = message.value, message.key, list(opened_headers(message.headers))
        stream = self._stream or message.topic
        return await self.clients.retrying(
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
        decryptor = self.clients.decryptor or await self.clients.start_decryptor(
            event.app, message.topic
        )
        value, key = message.value, message.key
        return await self.clients.retrying(lambda: decryptor.open(value, key))

    # -- one record, through to the next topic --

    async def seal_to(self, dest: TopicT, event: EventT[Any], *, dlq: TopicT | None = None) -> None:
        """Seal the event into `dest`; acknowledge it once `dest` has it.

        Without `dlq`, a record that cannot be sealed crashes the worker instead.
        """
        self.deliveries.took(event)
        try:
            sealed = await self.seal(event, dest.get_topic_name())
        except SealError as exc:
            await self.outcomes.reject(event, exc.reason, dlq, exc)
            return
        except EnvpipeError as exc:
            await crash(event, exc, "sealing failed and retrying cannot help")
            raise
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the stream
            log.error("a record could not be sealed: %s", type(exc).__name__)  # noqa: TRY400
            await self.outcomes.reject(event, Reason.SEAL_FAILED, dlq, exc)
            return
        overhead = size_change(event.message.value, sealed)
        headers = sealed_headers(event.message.headers, self.settings.format)
        await self.outcomes.deliver(dest, event, sealed, headers, dlq, overhead=overhead)

    async def open_to(self, dest: TopicT, event: EventT[Any], *, dlq: TopicT | None = None) -> None:
        """Open the event into `dest`, or dead-letter it; acknowledge it once written.

        Without `dlq`, a record that cannot be opened crashes the worker instead.
        """
        self.deliveries.took(event)
        try:
            opened = await self.open(event)
        except DecryptionError as exc:
            await self.outcomes.reject(event, exc.reason, dlq, exc)
            return
        except EnvpipeError as exc:
            await crash(event, exc, "opening failed and retrying cannot help")
            raise
        overhead = size_change(opened, event.message.value)
        headers = opened_headers(event.message.headers)
        await self.outcomes.deliver(dest, event, opened, headers, dlq, overhead=overhead)

    async def close(self) -> None:
        """Drop every DEK and close the service client; the next use starts afresh."""
        await self.clients.close()
