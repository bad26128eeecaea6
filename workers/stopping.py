"""How a stream worker stops: the one stop request, its exit code, and waits that end early.

A stop is asked for by a signal, the idle timer or a failure; the first reason is logged, the
first non-zero exit code is kept, and from then on the loop fetches nothing new while the
batches in flight drain and commit. A wait between retries (`hold`) keeps polling the
consumer, so the group does not evict the member, and ends in `Abandon` once a stop is asked
for: the batch it was waiting for is never finished, so nothing after it is committed. Kept
apart from `workers.loop` because the loop, the delivery and the committer all stop through
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

__all__ = ["Abandon", "Stopping"]

log = logging.getLogger("envpipe.stream")


class Abandon(Exception):
    """The current batch will not be finished: the worker is stopping."""


class Stopping:
    """One worker's stop request."""

    def __init__(self) -> None:
        self._requested = asyncio.Event()
        self.exit_code = 0

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def request(self, why: str, *, exit_code: int = 0) -> None:
        if not self._requested.is_set():
            log.info("stopping (%s): draining in-flight records, then committing", why)
        self.exit_code = self.exit_code or exit_code
        self._requested.set()

    async def hold(self, seconds: float, consumer: Any) -> None:
        """Wait, still polling so the group keeps us; raise `Abandon` if asked to stop."""
        requested = self._requested
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if requested.is_set():
                raise Abandon
            if consumer is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(requested.wait(), left)
                continue
            fetched = await consumer.getmany(timeout_ms=int(min(left, 1.0) * 1000) + 1)
            for tp, part in fetched.items():  # paused partitions return nothing; be sure
                consumer.seek(tp, part[0].offset)
        if requested.is_set():
            raise Abandon
