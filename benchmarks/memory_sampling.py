"""The memory benchmark's load and its measuring instruments: a feeder, an RSS sampler, slopes.

`Feeder` keeps a backlog waiting unread in the source topic; `RssSampler` reads a process's
VmRSS twice a second; the two slopes (least squares, Theil-Sen) turn those samples into MiB
per minute. `benchmarks.memory_scenario` wires them around one worker.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.load import OutputWatch, Pair, produce
from benchmarks.measure import median

VALUE_SIZE = 1024
PARTITIONS = 3
SAMPLE_SECONDS = 0.5
_DISTINCT_RECORDS = 1000
_FEED_SECONDS = 0.2
#: The feeder stops topping up below this much available memory (see `Feeder`).
MIN_AVAILABLE_BYTES = 2 << 30


class Feeder:
    """Keeps at least `backlog` records waiting unread in the source topic.

    "Read" is estimated from the output topic's end offsets, which lag by up to one producer
    batch per partition on the embedded broker: the backlog is then a little larger, never
    smaller. The embedded broker keeps every record in memory (it supports neither retention
    nor DeleteRecords), so the feeder stops when the machine runs low: `starved` says so,
    and `lowest_unread` shows whether the worker then ran dry.
    """

    def __init__(self, producer: Any, topic: str, watch: OutputWatch, backlog: int) -> None:
        self._producer = producer
        self._topic = topic
        self._watch = watch
        self._backlog = backlog
        self._pairs = plaintext_pairs()
        self.produced = 0
        #: the fewest records found waiting at a top-up (0: the worker ran dry)
        self.lowest_unread = math.inf
        self.starved = False

    async def warm_up(self) -> None:
        """One record, to see the worker is running before the load starts."""
        await produce(self._producer, self._topic, self._pairs, 1, partitions=1)
        self.produced += 1

    async def top_up(self) -> None:
        """Produce what is missing from the backlog (and wait for the broker to have it)."""
        unread = self.produced - await self._watch.count()
        self.lowest_unread = min(self.lowest_unread, unread)
        missing = self._backlog - unread
        if missing > 0 and available_bytes() < MIN_AVAILABLE_BYTES:
            self.starved = True
        elif missing > 0:
            await produce(self._producer, self._topic, self._pairs, missing, partitions=PARTITIONS)
            self.produced += missing

    async def run(self) -> None:
        """Top up every `_FEED_SECONDS` until cancelled."""
        while True:
            await self.top_up()
            await asyncio.sleep(_FEED_SECONDS)


def available_bytes() -> float:
    """MemAvailable from /proc/meminfo (infinite where there is none)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def plaintext_pairs() -> list[Pair]:
    """Keyed 1 KiB values, incompressible and the same every run."""
    rng = random.Random(5)
    return [
        (f"key-{index:04d}".encode(), rng.randbytes(VALUE_SIZE))
        for index in range(_DISTINCT_RECORDS)
    ]


def rss_mib(pid: int) -> float | None:
    """A process's resident set now (VmRSS), in MiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class RssSampler:
    """Samples a process's RSS every `SAMPLE_SECONDS` in the background: (seconds, MiB)."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._started = time.monotonic()
        self.samples: list[tuple[float, float]] = []
        self._task = asyncio.create_task(self._sample())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    async def _sample(self) -> None:
        next_at = time.monotonic()
        while (mib := rss_mib(self._pid)) is not None:
            self.samples.append((round(self.elapsed, 3), round(mib, 2)))
            next_at += SAMPLE_SECONDS
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def median_slope_per_minute(samples: Sequence[tuple[float, float]]) -> float:
    """The Theil-Sen slope of (seconds, MiB) samples, in MiB per minute: robust to steps."""
    slopes = [
        (m2 - m1) / (t2 - t1)
        for index, (t1, m1) in enumerate(samples)
        for t2, m2 in samples[index + 1 :]
        if t2 > t1
    ]
    return 60 * median(slopes) if slopes else 0.0


def slope_per_minute(samples: Sequence[tuple[float, float]]) -> float:
    """The least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    count = len(samples)
    if count < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / count
    mean_m = sum(m for _, m in samples) / count
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    if spread == 0:
        return 0.0
    return 60 * sum((t - mean_t) * (m - mean_m) for t, m in samples) / spread
