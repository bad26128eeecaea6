"""The Vault token: where it comes from, and keeping it valid for a long-running worker.

A worker runs for weeks; a Vault token usually lives for hours. Two mechanisms cover that:

- `TokenSource` reads the token from `VAULT_TOKEN` / `BAO_TOKEN`, or from a file that Vault
  Agent (or any sidecar) rewrites: the file is read again whenever its inode, size or mtime
  changes, so a rotated token is used from the next request on, with no restart.
- `TokenRenewer` looks the token up once (`auth/token/lookup-self`) and, if it is renewable
  and has a TTL, renews it (`auth/token/renew-self`) at about 2/3 of each TTL in a background
  task. Root and dev tokens have no TTL and are never renewed.

The token is never logged and never part of a repr or an error message; logs name its origin
(the variable or setting it came from) instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, KmsAccessDeniedError, KmsError

__all__ = ["TokenRenewer", "TokenSource"]

_log = logging.getLogger(__name__)

#: A token goes into an HTTP header: printable ASCII, no spaces.
_TOKEN = re.compile(r"[!-~]+")
TOKEN_FILE_SETTING = "ENVPIPE_VAULT_TOKEN_FILE"  # noqa: S105 - a name, not a secret


def _valid(token: str) -> bool:
    return bool(_TOKEN.fullmatch(token))


class TokenSource:
    """The current token: a fixed value, or a file read again when it changes.

    `origin` (`VAULT_TOKEN`, `ENVPIPE_VAULT_TOKEN_FILE`, ...) is what error messages tell the
    user to check; the token itself is never shown.
    """

    __slots__ = ("_identity", "_path", "_token", "origin")

    def __init__(self, token: str, origin: str, path: Path | None = None) -> None:
        """Prefer `fixed` or `from_file`."""
        self._token = token
        self._path = path
        self._identity: tuple[int, int, int, int] | None = None
        self.origin = origin

    @classmethod
    def fixed(cls, token: str, origin: str = "VAULT_TOKEN") -> TokenSource:
        """A token that never changes (from an environment variable, or a test)."""
        token = token.strip()
        if not _valid(token):
            raise ConfigError(origin, "the Vault token is empty or holds spaces/control bytes")
        return cls(token, origin)

    @classmethod
    def from_file(cls, path: Path | str, origin: str = TOKEN_FILE_SETTING) -> TokenSource:
        """A token file (Vault Agent's sink); ConfigError now if it holds no usable token."""
        file = Path(path)
        source = cls("", origin, file)
        try:
            source._reload(file, os.stat(file))
        except OSError as exc:
            raise ConfigError(
                origin, f"cannot read the Vault token file {path}: {exc.strerror}"
            ) from exc
        if not source._token:
            raise ConfigError(
                origin, f"the Vault token file {path} is empty or holds more than a token"
            )
        return source

    @property
    def watches_file(self) -> bool:
        """Whether the token may change under us (so a new one may become renewable)."""
        return self._path is not None

    def current(self) -> str:
        """The token to send now. A file that cannot be read keeps the last good token."""
        if self._path is not None:
            try:
                stat = os.stat(self._path)
                if _identity(stat) != self._identity:
                    self._reload(self._path, stat)
            except OSError as exc:
                _log.warning(
                    "cannot read the Vault token file %s (%s); keeping the previous token",
                    self._path,
                    exc.strerror,
                )
        return self._token

    def _reload(self, path: Path, stat: os.stat_result) -> None:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        self._identity = _identity(stat)
        if not _valid(text):
            # A sink being rewritten in place can be empty for a moment: keep the old token.
            _log.warning("the Vault token file %s holds no usable token; ignoring it", path)
            return
        if self._token and text != self._token:
            _log.info("the Vault token file %s changed; using the new token", path)
        self._token = text

    def __repr__(self) -> str:
        return f"TokenSource(origin={self.origin!r}, token=<hidden>)"


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


#: `request(method, path, token)` → the decoded JSON body, or a KmsError.
Request = Callable[[str, str, str], Awaitable[Mapping[str, Any]]]


class TokenRenewer:
    """Renews a renewable token at ~2/3 of its TTL, in one background task."""

    def __init__(
        self,
        source: TokenSource,
        request: Request,
        *,
        poll_seconds: float = 30.0,
        min_seconds: float = 0.5,
    ) -> None:
        self._source = source
        self._request = request
        self._poll = poll_seconds
        self._min = min_seconds
        self._looked_up: str | None = None
        self._full_ttl = 0
        self._expires = 0.0
        self._capped_warned = False
        self._failures = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Look the token up now (so a bad one is reported at start), then keep it fresh."""
        delay = await self._step()
        if delay is not None:
            self._task = asyncio.create_task(self._run(delay), name="vault-token-renewal")

    async def close(self) -> None:
        """Stop renewing. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)
            next_delay = await self._step()
            if next_delay is None:
                return
            delay = next_delay

    async def _step(self) -> float | None:
        """Look up a new token or renew a known one; seconds until the next step, or None."""
        token = self._source.current()
        origin = self._source.origin
        idle = self._poll if self._source.watches_file else None
        try:
            if token != self._looked_up:
                body = await self._request("GET", "auth/token/lookup-self", token)
                data = body.get("data") or {}
                ttl, renewable = int(data.get("ttl") or 0), bool(data.get("renewable"))
                self._looked_up, self._full_ttl, self._capped_warned = token, ttl, False
                _log.info(
                    "Vault token from %s: ttl %d s, %s",
                    origin,
                    ttl,
                    "renewable" if renewable and ttl > 0 else "not renewed by envpipe",
                )
            else:
                body = await self._request("POST", "auth/token/renew-self", token)
                auth = body.get("auth") or {}
                ttl, renewable = int(auth.get("lease_duration") or 0), bool(auth.get("renewable"))
                _log.debug("renewed the Vault token from %s: ttl %d s", origin, ttl)
                self._warn_if_capped(ttl)
        except KmsAccessDeniedError as exc:
            # Expired, revoked, or without the "default" policy (lookup-self/renew-self).
            self._looked_up = token
            _log.warning(
                "the Vault token from %s cannot be looked up or renewed (%s); it will not be "
                "renewed: give it the 'default' policy, or have Vault Agent renew it",
                origin,
                exc,
            )
            return idle
        except KmsError as exc:
            # Before expiry: try again well within what is left; after: back off to the poll.
            self._failures += 1
            remaining = self._expires - time.monotonic()
            backoff = max(self._min, remaining / 3) if remaining > 0 else 2.0**self._failures
            delay = min(self._poll, backoff)
            _log.warning(
                "renewing the Vault token from %s failed (%s); retrying in %.1f s",
                origin,
                exc,
                delay,
            )
            return delay
        self._failures = 0
        if ttl <= 0 or not renewable:
            return idle
        self._expires = time.monotonic() + ttl
        return max(self._min, ttl * 2 / 3)

    def _warn_if_capped(self, ttl: int) -> None:
        """A renewal that no longer restores the full TTL means explicit_max_ttl is near."""
        if ttl < self._full_ttl and not self._capped_warned:
            self._capped_warned = True
            _log.warning(
                "the Vault token from %s reaches its maximum TTL in %d s and cannot be "
                "renewed past it; provide a new token before then (%s)",
                self._source.origin,
                ttl,
                TOKEN_FILE_SETTING if self._source.watches_file else "restart with a new token",
            )
