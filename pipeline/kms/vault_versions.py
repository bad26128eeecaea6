"""How often a Vault signing key's versions are read: the bound on forged version numbers.

A reader meets `vault:<mount>:<name>:<version>` in a header before it can check the header's
signature, so the version number is the writer's to choose, forger or not. `HeaderVerifier`
remembers a failed lookup per id, but every forged version is a new id, so a naive lookup
would cost one `GET keys/<name>` per distinct number. `SigningVersions` keeps the last read
of each key name and reads it again only for a version that read lacks, and then only if
that version is the next one (a rotation, seen at once; repeats of one id are bounded by the
verifier's negative memory) or the read is `refetch_seconds` old. Distinct forged versions of
one key therefore cost at most one read per interval, plus one per next-version id and
negative period. Reads are serialised, so one batch of forged headers is one read, not many.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pipeline.errors import KeyUnavailableError
from pipeline.kms.vault_ids import VaultKeyRef

__all__ = ["KEY_REFETCH_SECONDS", "SigningVersions"]

#: A signing key's versions are read again at most this often for an unknown version.
KEY_REFETCH_SECONDS = 5.0
_MAX_KEYS = 1024

KeyData = Mapping[str, Any]
ReadKey = Callable[[str, VaultKeyRef], Awaitable[KeyData]]


class SigningVersions:
    """The last `keys/<name>` read of each signing key (None: the key was not found)."""

    def __init__(
        self,
        read: ReadKey,
        *,
        refetch_seconds: float = KEY_REFETCH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._refetch_seconds = refetch_seconds
        self._clock = clock
        self._last: dict[str, tuple[float, KeyData | None]] = {}
        self._lock = asyncio.Lock()

    async def get(self, operation: str, ref: VaultKeyRef) -> KeyData:
        """The key's data, holding `ref.version` if the service has it (callers check)."""
        async with self._lock:
            read_at, data = self._last.get(ref.key_id, (float("-inf"), {}))
            if data is not None and str(ref.version) in (data.get("keys") or {}):
                return data
            latest = data.get("latest_version") if data is not None else None
            rotation = isinstance(latest, int) and ref.version == latest + 1
            if self._clock() - read_at < self._refetch_seconds and not rotation:
                if data is None:
                    raise KeyUnavailableError(
                        operation, "not_found", f"{ref.key_id} was not found moments ago"
                    )
                return data  # without the version: refused by the caller, with no request
            try:
                data = await self._read(operation, ref)
            except KeyUnavailableError:
                self.remember(ref, None)
                raise
            self.remember(ref, data)
            return data

    def remember(self, ref: VaultKeyRef, data: KeyData | None) -> None:
        """Note a fresh read of the key (resolving the latest version reads it too)."""
        self._last.pop(ref.key_id, None)
        self._last[ref.key_id] = (self._clock(), data)
        while len(self._last) > _MAX_KEYS:
            self._last.pop(next(iter(self._last)))
