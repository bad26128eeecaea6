"""Flow control: why consumption is paused, backpressure bounds, and the one retry rule.

A worker pauses its whole assignment while any reason holds (`backpressure`: too much read
but not yet acknowledged; `kms`: the service or a v2 header is not there yet) and resumes
when none does. Retriable errors are retried with jittered exponential backoff
(`pipeline.retry`) until the attempt succeeds or the caller is told to stop; the stream worker
and the Faust helper both use `retrying`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pipeline.errors import EnvpipeError
from pipeline.retry import backoff_delay

__all__ = ["BACKPRESSURE", "KMS", "FlowControl", "retrying"]

log = logging.getLogger("envpipe.flow")

BACKPRESSURE, KMS = "backpressure", "kms"
#: Resume once below this fraction of both in-flight limits.
RESUME_FRACTION = 0.5

T = TypeVar("T")


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    *,
    what: str,
    cap: float,
    wait: Callable[[float], Awaitable[None]],
    on_retry: Callable[[], None] | None = None,
    on_recovered: Callable[[], None] | None = None,
) -> T:
    """Run `attempt` until it succeeds, backing off on retriable `EnvpipeError`s.

    `wait(seconds)` sleeps between attempts (the stream worker keeps polling the group while
    it waits, and raises to abandon); `on_retry` runs before each wait, `on_recovered` once
    after a success that followed failures. Anything not retriable is raised at once.
    """
    failures = 0
    while True:
        try:
            result = await attempt()
        except EnvpipeError as exc:
            if not exc.retriable:
                raise
            failures += 1
            delay = backoff_delay(failures, cap)
            if on_retry is not None:
                on_retry()
            log.warning(
                "%s: %s (%s); nothing skipped, retry %d in %.2fs",
                what,
                type(exc).__name__,
                exc,
                failures,
                delay,
            )
            await wait(delay)
            continue
        if failures:
            log.info("%s succeeded after %d retries; resuming", what, failures)
            if on_recovered is not None:
                on_recovered()
        return result


class FlowControl:
    """Pause reasons and in-flight accounting for one worker's consumer."""

    def __init__(self, max_records: int, max_bytes: int) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.reasons: set[str] = set()
        #: how often consumption was paused, by reason
        self.pauses: Counter[str] = Counter()
        self.inflight_records = 0
        self.inflight_bytes = 0
        self.consumer: Any = None

    @property
    def paused(self) -> bool:
        return bool(self.reasons)

    def set_paused(self, reason: str, on: bool) -> None:
        """Pause the whole assignment while any reason holds; resume when none does."""
        before = bool(self.reasons)
        if on:
            if reason not in self.reasons:
                self.pauses[reason] += 1
            self.reasons.add(reason)
        else:
            self.reasons.discard(reason)
        if self.consumer is None or before == bool(self.reasons):
            return
        assignment = self.consumer.assignment()
        if self.reasons:
            self.consumer.pause(*assignment)
        else:
            self.consumer.resume(*assignment)

    def took(self, records: int, nbytes: int) -> None:
        """Records read; pause for backpressure above either bound."""
        self.inflight_records += records
        self.inflight_bytes += nbytes

    def check_backpressure(self) -> None:
        if self.inflight_records > self.max_records or self.inflight_bytes > self.max_bytes:
            self.set_paused(BACKPRESSURE, True)

    def released(self, records: int, nbytes: int) -> None:
        """Records committed (or given up); resume once below half of both bounds."""
        self.inflight_records -= records
        self.inflight_bytes -= nbytes
        if (
            self.inflight_records <= self.max_records * RESUME_FRACTION
            and self.inflight_bytes <= self.max_bytes * RESUME_FRACTION
        ):
            self.set_paused(BACKPRESSURE, False)

    def describe(self) -> str:
        """For the progress line: " (backpressure, kms)" or ""."""
        return f" ({', '.join(sorted(self.reasons))})" if self.reasons else ""
