"""A TCP proxy in front of a Kafka broker that reads the client's request frames.

The broker advertises the proxy's port, so after bootstrapping every client connection runs
through it. Client-to-broker bytes are read as Kafka frames (a 4-byte length, then the
request). A Produce request (API key 0) is counted, per client id, in `produce_bytes` and
`produce_requests`: the bytes that really reach the broker, compression included, which is
what "bytes per record on the broker" means. With `bytes_per_s` set, a Produce request also
waits until a link of that speed would have carried it (one link shared by every
connection), then goes on whole. Everything else (fetches, offsets, group traffic) and every
response is copied at once. Produce requests of `exempt_client_id` are neither paced nor
counted, so a feeder can keep the source full.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import Counter
from typing import Any

__all__ = ["KafkaProxy"]

_HOST = "127.0.0.1"
_PRODUCE_API_KEY = 0
_COPY_CHUNK = 64 * 1024


class KafkaProxy:
    """Counts (and optionally paces) Produce requests on their way to the broker."""

    def __init__(self, bytes_per_s: float | None = None, exempt_client_id: str = "") -> None:
        self._bytes_per_s = bytes_per_s
        self._exempt = exempt_client_id
        self._link_free_at = 0.0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._pumps: set[asyncio.Future[None]] = set()
        self.upstream: tuple[str, int] | None = None
        self.port = 0
        #: per client id, the bytes (frames, length prefix included) and count of Produce requests
        self.produce_bytes: Counter[str] = Counter()
        self.produce_requests: Counter[str] = Counter()

    async def start(self) -> KafkaProxy:
        """Listen on a free loopback port; set `upstream` before any client connects."""
        self._server = await asyncio.start_server(self._serve, _HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        if self._server is not None:
            self._server.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> KafkaProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        """One client connection: a pump each way until either side closes."""
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        broker_out: asyncio.StreamWriter | None = None
        try:
            if self.upstream is None:
                return
            broker_in, broker_out = await asyncio.open_connection(*self.upstream)
            pumps = {
                asyncio.ensure_future(self._requests(client_in, broker_out)),
                asyncio.ensure_future(_copy(broker_in, client_out)),
            }
            self._pumps |= pumps
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                self._pumps -= pumps
        except OSError:
            pass
        finally:
            for writer in (client_out, broker_out):
                if writer is not None:
                    writer.transport.abort()
            self._handlers.discard(handler)

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client to broker, frame by frame; Produce frames are counted and may wait."""
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                length = await reader.readexactly(4)
                request = await reader.readexactly(struct.unpack(">i", length)[0])
                client = _produce_client(request)
                if client is not None and client != self._exempt:
                    size = len(length) + len(request)
                    self.produce_bytes[client] += size
                    self.produce_requests[client] += 1
                    if self._bytes_per_s:
                        await self._carry(size)
                writer.write(length + request)
                await writer.drain()

    async def _carry(self, nbytes: int) -> None:
        """Wait until the shared link has carried `nbytes` more (store and forward)."""
        assert self._bytes_per_s  # noqa: S101 - only called when pacing
        now = asyncio.get_running_loop().time()
        self._link_free_at = max(self._link_free_at, now) + nbytes / self._bytes_per_s
        await asyncio.sleep(self._link_free_at - now)


def _produce_client(request: bytes) -> str | None:
    """The client id of a Produce request (the header says who), else None."""
    api_key, client_id_length = struct.unpack_from(">h6xh", request)
    if api_key != _PRODUCE_API_KEY:
        return None
    return request[10 : 10 + max(0, client_id_length)].decode("utf-8", "replace")


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(_COPY_CHUNK):
            writer.write(chunk)
            await writer.drain()
