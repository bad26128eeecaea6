"""A KMS fault proxy: an HTTP-aware asyncio proxy in front of a KMS emulator or Vault.

KMS speaks JSON 1.1 over HTTP POST, with the operation in the `X-Amz-Target` header; Vault
speaks JSON over HTTP with the operation in the path. The proxy reads each request whole and
answers it according to its current mode:

    pass           forward upstream and relay the answer, after `delay_seconds`
    refuse         stop listening and drop open connections (connection refused)
    stall          hold the request, unanswered, until the mode changes; then handle it anew
    throttle       HTTP 400 {"__type": "ThrottlingException"}, as AWS does under load
    internal       HTTP 500 {"__type": "KMSInternalException"}
    disabled       HTTP 400 {"__type": "DisabledException"}: AWS's answer for a disabled key
    invalid_state  HTTP 400 {"__type": "KMSInvalidStateException"}: a key pending deletion
    not_found      HTTP 400 {"__type": "NotFoundException"}: a deleted or unknown key
    access_denied  HTTP 400 {"__type": "AccessDeniedException"}

moto accepts every key in every state, so the key-state answers are made here, in AWS's
exact error shapes. With `only` set, faults hit just the requests whose operation (the
X-Amz-Target operation, else the HTTP path) contains one of its strings; the rest pass.

Being HTTP-aware matters: a plain TCP proxy could not fail requests on a pooled keep-alive
connection, which is exactly what a client does between calls. `requests` counts what each
mode answered, per operation, so a test can prove the fault was really hit. An `observer`, if
set, sees every exchange forwarded in pass mode: (operation, request body, response body), so
a test can tell which request a call carried or take key material from the KMS side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Callable
from typing import Literal
from urllib.parse import urlsplit

Mode = Literal[
    "pass",
    "refuse",
    "stall",
    "throttle",
    "internal",
    "disabled",
    "invalid_state",
    "not_found",
    "access_denied",
]

_HOST = "127.0.0.1"
_MAX_HEAD = 64 * 1024
_ERRORS: dict[str, tuple[int, str, str]] = {
    "throttle": (400, "Bad Request", "ThrottlingException"),
    "internal": (500, "Internal Server Error", "KMSInternalException"),
    "disabled": (400, "Bad Request", "DisabledException"),
    "invalid_state": (400, "Bad Request", "KMSInvalidStateException"),
    "not_found": (400, "Bad Request", "NotFoundException"),
    "access_denied": (400, "Bad Request", "AccessDeniedException"),
}


#: The same faults as Vault answers them (OpenBao 2.7's messages, which envpipe classifies by).
_VAULT_ERRORS: dict[str, tuple[int, str, str]] = {
    "throttle": (429, "Too Many Requests", "request path quota exceeded (fault proxy)"),
    "internal": (500, "Internal Server Error", "internal error (fault proxy)"),
    "disabled": (400, "Bad Request", "encryption key not found"),
    "invalid_state": (
        400,
        "Bad Request",
        "ciphertext or signature version is disallowed by policy (too old)",
    ),
    "not_found": (400, "Bad Request", "encryption key not found"),
    "access_denied": (403, "Forbidden", "1 error occurred:\n\t* permission denied\n\n"),
}


class KmsFaultProxy:
    """Listens on a loopback port; `endpoint` is the URL to give the client instead of the KMS."""

    def __init__(self, upstream: str, *, protocol: Literal["aws", "vault"] = "aws") -> None:
        parts = urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream {upstream!r} needs a host and a port")
        self._upstream = (parts.hostname, parts.port)
        #: whose error shapes the fault answers take: AWS's JSON 1.1, or Vault's {"errors": [...]}
        self.protocol = protocol
        self.mode: Mode = "pass"
        #: pass mode holds every request this long first: a slow (e.g. far-away) KMS
        self.delay_seconds = 0.0
        self.requests: Counter[tuple[str, str]] = Counter()
        #: if set, faults apply only to operations containing one of these strings
        self.only: set[str] | None = None
        #: called with (operation, request body, response body) for each forwarded exchange
        self.observer: Callable[[str, bytes, bytes], None] | None = None
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"http://{_HOST}:{self._port}"

    def count(self, mode: Mode, operation: str | None = None) -> int:
        """How many requests `mode` answered (for operations containing `operation`, or all)."""
        return sum(
            n
            for (m, op), n in self.requests.items()
            if m == mode and (operation is None or operation in op)
        )

    async def start(self) -> KmsFaultProxy:
        await self._listen()
        return self

    async def close(self) -> None:
        await self._stop_listening()
        self._changed.set()  # release stalled requests so their handlers end

    async def set_mode(self, mode: Mode) -> None:
        """Switch mode; stalled requests are then handled under the new one."""
        if mode == self.mode:
            return
        if mode == "refuse":
            await self._stop_listening()
        elif self.mode == "refuse":
            await self._listen()
        self.mode = mode
        self._changed.set()
        self._changed = asyncio.Event()

    async def __aenter__(self) -> KmsFaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, _HOST, self._port, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if server is not None:
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while (request := await _read_message(reader)) is not None:
                response = await self._answer(*request)
                if response is None:
                    return
                writer.write(response)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _answer(self, head: bytes, body: bytes) -> bytes | None:
        """The bytes to send back for one request; None to drop the connection."""
        operation = _header(head, b"x-amz-target").rpartition(".")[2] or _path(head)
        while True:
            mode = self.mode
            if self.only is not None and not any(part in operation for part in self.only):
                mode = "pass"
            self.requests[(mode, operation)] += 1
            if mode != "stall":
                break
            await self._changed.wait()
        if mode == "refuse":
            return None
        if mode == "pass":
            if self.delay_seconds > 0:
                await asyncio.sleep(self.delay_seconds)
            response = await self._forward(head + body)
            if response is not None and self.observer is not None:
                self.observer(operation, body, response.partition(b"\r\n\r\n")[2])
            return response
        if self.protocol == "vault":
            status, reason, message = _VAULT_ERRORS[mode]
            payload = json.dumps({"errors": [message]}).encode()
            content_type = "application/json"
        else:
            status, reason, error_type = _ERRORS[mode]
            payload = json.dumps({"__type": error_type, "message": f"fault proxy: {mode}"}).encode()
            content_type = "application/x-amz-json-1.1"
        return (
            f"HTTP/1.1 {status} {reason}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"x-amzn-RequestId: fault-proxy-{mode}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload

    async def _forward(self, request: bytes) -> bytes | None:
        try:
            reader, writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            return None
        try:
            writer.write(request)
            await writer.drain()
            response = await _read_message(reader)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return None if response is None else response[0] + response[1]


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One HTTP/1.1 message with a Content-Length body: (head, body), or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    except asyncio.LimitOverrunError as exc:
        raise ValueError("HTTP head too long") from exc
    if len(head) > _MAX_HEAD:
        raise ValueError("HTTP head too long")
    if _header(head, b"transfer-encoding"):
        raise ValueError("chunked bodies are not supported")
    length = int(_header(head, b"content-length") or 0)
    return head, await reader.readexactly(length)


def _path(head: bytes) -> str:
    """The request line's path ("/v1/transit/decrypt/orders"), or "?"."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].decode("latin-1") if len(parts) > 1 else "?"


def _header(head: bytes, name: bytes) -> str:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return ""
