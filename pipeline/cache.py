"""DEK caches: keep the KMS off the per-record path, with memory bounded by entry counts.

`EncryptDekCache` holds one active DEK per encryption context. A DEK is retired at the
first of its age, record and byte limits; a replacement is minted ahead of time, at
`refresh_at` of any limit, in one background task per context (single-flight), so the
record path does not wait on the KMS. If minting fails retriably (an outage), the current DEK
runs on for a grace period, never past its record limit; after that `reserve` raises
`DekExhaustedError` and the caller pauses. A mint refused for good (the key destroyed,
disabled, or access denied) ends the DEK at its limit and is raised as it is. Failed mints
back off with jitter, so an outage does not become a KMS storm.

`DecryptDekCache` is the reader's LRU of unwrapped DEKs keyed by the records' prefix (the
signed header bytes in v1, version byte and dek_id in v2), with an idle TTL, single-flight
misses and a short negative cache for failed unwraps.

Both are sans-IO: no sockets, no files. The KMS work is an injected coroutine function and
time an injected clock; they do schedule asyncio tasks (the background refresh), so they
need a running event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pipeline.aead import Opener, Sealer
from pipeline.errors import ConfigError, DecryptionError, DekExhaustedError, EnvpipeError, Reason
from pipeline.retry import backoff_delay

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class CacheStats(Counter[str]):
    """Event counts (hit, miss, refresh, rotate, evict, grace, negative) for metrics."""


@dataclass(frozen=True, slots=True)
class DekPolicy:
    """When a DEK is retired, and how long it may outlive that while the KMS is down."""

    max_age_seconds: float = 300.0
    max_records: int = 1_000_000
    max_bytes: int = 1 << 30
    refresh_at: float = 0.8
    grace_seconds: float = 300.0
    retry_max_seconds: float = 30.0
    retry_initial_seconds: float = 0.2


@dataclass(slots=True)
class ActiveDek:
    """A DEK in use for encryption, with what it has consumed so far."""

    sealer: Sealer
    created_at: float
    records: int = 0
    bytes: int = 0
    #: when the DEK first hit its age or byte limit without a replacement (grace started)
    exhausted_at: float | None = None

    def usage(self, now: float, policy: DekPolicy) -> float:
        """The largest fraction of any limit used so far."""
        return max(
            (now - self.created_at) / policy.max_age_seconds,
            self.records / policy.max_records,
            self.bytes / policy.max_bytes,
        )

    def fits(self, records: int, nbytes: int, now: float, policy: DekPolicy) -> bool:
        """Whether `records` more records of `nbytes` stay within every limit."""
        return (
            self.records + records <= policy.max_records
            and self.bytes + nbytes <= policy.max_bytes
            and now - self.created_at < policy.max_age_seconds
        )

    def take(self, records: int, nbytes: int) -> Sealer:
        self.records += records
        self.bytes += nbytes
        return self.sealer


MintDek = Callable[[], Coroutine[Any, Any, Sealer]]


@dataclass(slots=True)
class _Slot:
    """The state of one encryption context: current DEK, next DEK and the mint in flight."""

    mint: MintDek
    current: ActiveDek | None = None
    ready: ActiveDek | None = None
    pending: asyncio.Task[Sealer] | None = None
    failures: int = 0
    retry_at: float = 0.0
    last_error: BaseException | None = None


class EncryptDekCache:
    """Active DEKs per encryption context, refreshed ahead of their limits."""

    def __init__(
        self, policy: DekPolicy, *, max_contexts: int = 1024, clock: Clock = time.monotonic
    ) -> None:
        self.policy = policy
        self.stats = CacheStats()
        self._max_contexts = max_contexts
        self._clock = clock
        self._slots: OrderedDict[Hashable, _Slot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    def try_reserve(self, context: Hashable, nbytes: int, records: int = 1) -> Sealer | None:
        """Fast path: the sealer for `records` records of `nbytes` in all if the current
        DEK fits them all, else None. A batch reserves once, not once per record."""
        slot = self._slots.get(context)
        if slot is None or slot.current is None:
            return None
        now = self._clock()
        current = slot.current
        if not current.fits(records, nbytes, now, self.policy):
            return None
        self.stats["hit"] += records
        sealer = current.take(records, nbytes)
        if slot.ready is None and current.usage(now, self.policy) >= self.policy.refresh_at:
            self._start_mint(slot, now)
        return sealer

    async def reserve(self, context: Hashable, mint: MintDek, nbytes: int) -> Sealer:
        """The sealer for one record of `nbytes`, minting or rotating DEKs as needed.

        Waits on the KMS only when there is no usable DEK at all: the first record of a
        context, or after the record limit / grace period with no replacement yet.
        """
        fast = self.try_reserve(context, nbytes)
        if fast is not None:
            return fast
        if nbytes > self.policy.max_bytes:
            raise ConfigError(
                "ENVPIPE_DEK_MAX_BYTES",
                f"a {nbytes}-byte record exceeds the per-DEK limit of {self.policy.max_bytes}",
            )
        slot = self._slot(context, mint)
        while True:
            now = self._clock()
            current = slot.current
            if current is not None and current.fits(1, nbytes, now, self.policy):
                return current.take(1, nbytes)
            if slot.ready is not None:
                self._rotate(slot, now)
                continue
            if current is not None and slot.pending is None and not slot.failures:
                # Idle past a limit, so nothing was fetched ahead: mint now rather than run on
                # in grace (that is for a failing KMS), or a rotated key would wait a batch.
                self._start_mint(slot, now)
                if slot.pending is not None:
                    await asyncio.wait({slot.pending})
                    continue
            if (
                current is not None
                and _refused(slot) is None  # grace rides out an outage, not a destroyed key
                and self._in_grace(current, nbytes, now)
            ):
                self._start_mint(slot, now)
                self.stats["grace"] += 1
                return current.take(1, nbytes)
            await self._await_mint(slot, now)

    def _slot(self, context: Hashable, mint: MintDek) -> _Slot:
        slot = self._slots.get(context)
        if slot is None:
            slot = self._slots[context] = _Slot(mint)
            while len(self._slots) > self._max_contexts:
                _, evicted = self._slots.popitem(last=False)
                if evicted.pending is not None:
                    evicted.pending.cancel()
                self.stats["evict"] += 1
        else:
            self._slots.move_to_end(context)
        return slot

    def _rotate(self, slot: _Slot, now: float) -> None:
        self.stats["rotate" if slot.current is not None else "miss"] += 1
        slot.current, slot.ready = slot.ready, None

    def _in_grace(self, current: ActiveDek, nbytes: int, now: float) -> bool:
        """Run past the age/byte limit while the KMS is failing; never past the record limit."""
        if current.records + 1 > self.policy.max_records:
            return False
        if current.exhausted_at is None:
            if self.policy.grace_seconds <= 0:
                return False
            current.exhausted_at = now
            log.warning("DEK limit reached with no replacement yet; running on in grace period")
        return now - current.exhausted_at < self.policy.grace_seconds

    def _start_mint(self, slot: _Slot, now: float) -> None:
        """Begin a background mint unless one is running or a failed one is backing off."""
        if slot.pending is not None or now < slot.retry_at:
            return
        slot.pending = asyncio.get_running_loop().create_task(slot.mint())
        slot.pending.add_done_callback(lambda task: self._mint_done(slot, task))

    def _mint_done(self, slot: _Slot, task: asyncio.Task[Sealer]) -> None:
        slot.pending = None
        if task.cancelled():
            return
        error = task.exception()
        now = self._clock()
        if error is None:
            self.stats["refresh"] += 1
            slot.ready = ActiveDek(task.result(), created_at=now)
            slot.failures, slot.last_error = 0, None
            return
        slot.failures += 1
        slot.last_error = error
        slot.retry_at = now + backoff_delay(
            slot.failures, self.policy.retry_max_seconds, self.policy.retry_initial_seconds
        )
        log.warning(
            "minting a data key failed (%s); retry in %.1fs",
            type(error).__name__,
            slot.retry_at - now,
        )

    async def _await_mint(self, slot: _Slot, now: float) -> None:
        """Wait for a DEK when none is usable; raise `DekExhaustedError` if the KMS fails."""
        if slot.pending is None and now < slot.retry_at:
            refused = _refused(slot)
            if refused is not None:
                raise refused.with_traceback(None)  # still refused for good (a missing key)
            raise DekExhaustedError(
                "no usable data key: the KMS is failing and the current key is spent"
            ) from slot.last_error
        self._start_mint(slot, now)
        task = slot.pending
        assert task is not None  # noqa: S101 (just started)
        await asyncio.wait({task})
        error = None if task.cancelled() else task.exception()
        if isinstance(error, EnvpipeError) and not error.retriable:
            raise error  # refused for good (a deleted key, access denied): say so, do not spin
        if task.cancelled() or error is not None:
            raise DekExhaustedError(
                "no usable data key: minting a new one failed"
            ) from slot.last_error

    def drop_all(self) -> None:
        """Drop every DEK now (an operator's SIGHUP); new ones are minted on demand."""
        for slot in self._slots.values():
            if slot.pending is not None:
                slot.pending.cancel()
        self._slots.clear()

    async def close(self) -> None:
        """Cancel background mints and drop every DEK."""
        tasks = [slot.pending for slot in self._slots.values() if slot.pending is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._slots.clear()


def _refused(slot: _Slot) -> EnvpipeError | None:
    """The slot's last mint error if the service refused it for good (key gone, denied)."""
    error = slot.last_error
    return error if isinstance(error, EnvpipeError) and not error.retriable else None


V = TypeVar("V")


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    last_used: float


@dataclass(slots=True)
class _Negative:
    reason: Reason
    until: float


class DecryptDekCache:
    """LRU of unwrapped DEKs keyed by record prefix, with single-flight misses."""

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        idle_seconds: float = 3600.0,
        negative_seconds: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.stats = CacheStats()
        self._max_entries = max_entries
        self._idle_seconds = idle_seconds
        self._negative_seconds = negative_seconds
        self._clock = clock
        self._entries: OrderedDict[bytes, _Entry[Opener]] = OrderedDict()
        self._negative: OrderedDict[bytes, _Negative] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[Opener]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prefix: bytes) -> Opener | None:
        """The opener for a header already verified and unwrapped, if fresh; counts a hit."""
        entry = self._entries.get(prefix)
        if entry is None:
            return None
        now = self._clock()
        if now - entry.last_used > self._idle_seconds:
            del self._entries[prefix]
            self.stats["evict"] += 1
            return None
        entry.last_used = now
        self._entries.move_to_end(prefix)
        self.stats["hit"] += 1
        return entry.value

    def check_negative(self, prefix: bytes) -> None:
        """Raise the remembered error if this header failed recently."""
        negative = self._negative.get(prefix)
        if negative is None:
            return
        if self._clock() < negative.until:
            self.stats["negative"] += 1
            raise DecryptionError(negative.reason)
        del self._negative[prefix]

    async def load(self, prefix: bytes, admit: Callable[[], Awaitable[Opener]]) -> Opener:
        """Opener for `prefix`: cached, or built by `admit` once for all concurrent askers.

        `admit` verifies and unwraps; a `DecryptionError` it raises is remembered for
        `negative_seconds`. Retriable errors (KMS down) are not remembered.
        """
        cached = self.get(prefix)
        if cached is not None:
            return cached
        self.check_negative(prefix)
        pending = self._pending.get(prefix)
        if pending is not None:
            return await asyncio.shield(pending)
        self.stats["miss"] += 1
        future: asyncio.Future[Opener] = asyncio.get_running_loop().create_future()
        self._pending[prefix] = future
        try:
            opener = await admit()
        except EnvpipeError as exc:
            if isinstance(exc, DecryptionError):
                self._remember_failure(prefix, exc.reason)
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters may be absent
            raise
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._pending[prefix]
        self._store(prefix, opener)
        future.set_result(opener)
        return opener

    def _store(self, prefix: bytes, opener: Opener) -> None:
        self._entries[prefix] = _Entry(opener, self._clock())
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.stats["evict"] += 1

    def _remember_failure(self, prefix: bytes, reason: Reason) -> None:
        if self._negative_seconds <= 0:
            return
        self._negative[prefix] = _Negative(reason, self._clock() + self._negative_seconds)
        self._negative.move_to_end(prefix)
        while len(self._negative) > self._max_entries:
            self._negative.popitem(last=False)

    def clear(self) -> None:
        """Drop every DEK (for shutdown, or after a key compromise)."""
        self._entries.clear()
        self._negative.clear()
