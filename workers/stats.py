"""Worker statistics: counters and a bounded-memory latency histogram.

The histogram is log-bucketed (the DDSketch idea): bucket `i` holds values in
`(gamma**(i-1), gamma**i]`, and a percentile is reported as the point of its bucket whose
relative distance to either edge is the same, so every answer is within `relative_accuracy`
of a value that was really recorded. Memory is a fixed list of counts, whatever the traffic,
so a worker can record every record's latency for days.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Histogram", "WorkerStats"]


class Histogram:
    """Counts of positive values in logarithmic buckets; percentiles within ~1%.

    Values at or below `min_value` (including zero and negatives, e.g. clock skew between
    producer and worker) share the lowest bucket; values above `max_value` the highest.
    """

    __slots__ = (
        "_counts",
        "_gamma",
        "_inv_log_gamma",
        "_max_value",
        "_min_value",
        "_offset",
        "count",
        "max",
        "min",
        "total",
    )

    def __init__(
        self,
        relative_accuracy: float = 0.01,
        *,
        min_value: float = 0.01,
        max_value: float = 1e9,
    ) -> None:
        if not 0 < relative_accuracy < 1:
            raise ValueError("relative_accuracy must be between 0 and 1")
        if not 0 < min_value < max_value:
            raise ValueError("need 0 < min_value < max_value")
        self._gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._inv_log_gamma = 1 / math.log(self._gamma)
        self._min_value = min_value
        self._max_value = max_value
        self._offset = math.ceil(math.log(min_value) * self._inv_log_gamma)
        top = math.ceil(math.log(max_value) * self._inv_log_gamma) - self._offset
        self._counts = [0] * (top + 1)
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, value: float) -> None:
        """Record one value."""
        self.add_many((value,))

    def add_many(self, values: Iterable[float]) -> None:
        """Record many values; the loop is kept tight because it runs once per record."""
        batch = values if isinstance(values, list) else list(values)
        if not batch:
            return
        counts = self._counts
        top = len(counts) - 1
        low = self._min_value
        inv = self._inv_log_gamma
        offset = self._offset
        log = math.log
        ceil = math.ceil
        for value in batch:
            if value <= low:
                counts[0] += 1
            else:
                index = ceil(log(value) * inv) - offset
                counts[index if index < top else top] += 1
        self.count += len(batch)
        self.total += sum(batch)
        smallest, largest = min(batch), max(batch)
        self.min = min(self.min, smallest)
        self.max = max(self.max, largest)

    def percentile(self, p: float) -> float:
        """The value below which `p` percent of the recorded values fall (nan if empty)."""
        if not 0 <= p <= 100:
            raise ValueError("p must be between 0 and 100")
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(p / 100 * self.count))
        running = 0
        index = 0
        for index, bucket in enumerate(self._counts):  # noqa: B007 - the loop finds it
            running += bucket
            if running >= rank:
                break
        upper = self._gamma ** (index + self._offset)
        estimate = 2 * upper / (self._gamma + 1)
        return min(max(estimate, self.min), self.max)

    @property
    def mean(self) -> float:
        """The exact mean (nan if empty)."""
        return self.total / self.count if self.count else math.nan

    def merge(self, other: Histogram) -> None:
        """Add another histogram's counts (same accuracy and range), e.g. across workers."""
        if len(other._counts) != len(self._counts) or other._gamma != self._gamma:
            raise ValueError("histograms differ in accuracy or range")
        for index, bucket in enumerate(other._counts):
            self._counts[index] += bucket
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def summary(self, percentiles: Iterable[float] = (50, 99, 99.9)) -> dict[str, float | None]:
        """{"p50": .., "p99": .., "p999": ..}; None where nothing was recorded (valid JSON)."""
        return {
            "p" + f"{p:g}".replace(".", ""): (None if self.count == 0 else self.percentile(p))
            for p in percentiles
        }


@dataclass
class WorkerStats:
    """What one worker did, for the stats file, the exit summary and the progress line."""

    direction: str
    records_in: int = 0
    records_out: int = 0
    dlq: int = 0
    tombstones: int = 0
    #: bytes of (envelope - plaintext) over every sealed or opened value, and how many
    overhead_bytes: int = 0
    overhead_records: int = 0
    first_fetch: float | None = None
    last_ack: float | None = None
    #: process CPU time (all threads) at the first fetch and at the last acknowledgement
    first_cpu: float | None = None
    last_cpu: float | None = None
    latency_ms: Histogram = field(default_factory=Histogram)
    dlq_reasons: Counter[str] = field(default_factory=Counter)
    #: how often consumption was paused, by reason ("backpressure", "kms")
    pauses: Counter[str] = field(default_factory=Counter)
    records_in_by_partition: Counter[str] = field(default_factory=Counter)
    assigned_partitions: set[str] = field(default_factory=set)

    def fetched(self, count: int, now: float | None = None) -> None:
        """Count records read; the first fetch starts the active period."""
        if self.first_fetch is None:
            self.first_fetch = time.monotonic() if now is None else now
            self.first_cpu = time.process_time()
        self.records_in += count

    def acknowledged(self, now: float) -> None:
        """Note the time of the latest acknowledgement: the active period ends there."""
        self.last_ack = now
        self.last_cpu = time.process_time()

    @property
    def active_seconds(self) -> float:
        """From the first fetch to the last acknowledgement."""
        if self.first_fetch is None or self.last_ack is None:
            return 0.0
        return max(0.0, self.last_ack - self.first_fetch)

    @property
    def cpu_seconds(self) -> float:
        """CPU the worker process used during the active period."""
        if self.first_cpu is None or self.last_cpu is None:
            return 0.0
        return max(0.0, self.last_cpu - self.first_cpu)

    @property
    def records_per_s(self) -> float:
        """Records read per active second (0 before anything was acknowledged)."""
        active = self.active_seconds
        return self.records_in / active if active > 0 else 0.0

    def as_json(self, kms_calls: Counter[str], cache: Counter[str]) -> dict[str, Any]:
        """The stats file's content (see workers/stream.py for the format)."""
        overhead = self.overhead_bytes / self.overhead_records if self.overhead_records else None
        return {
            "direction": self.direction,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "dlq": self.dlq,
            "tombstones": self.tombstones,
            "active_seconds": round(self.active_seconds, 3),
            "records_per_s": round(self.records_per_s, 1),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "latency_ms": self.latency_ms.summary(),
            "kms_calls": dict(sorted(kms_calls.items())),
            "cache": dict(sorted(cache.items())),
            "envelope_overhead_bytes": overhead,
            "dlq_reasons": dict(sorted(self.dlq_reasons.items())),
            "pauses": dict(sorted(self.pauses.items())),
            "records_in_by_partition": dict(sorted(self.records_in_by_partition.items())),
            "assigned_partitions": sorted(self.assigned_partitions),
        }

    def write(self, path: Path, kms_calls: Counter[str], cache: Counter[str]) -> None:
        """Write `as_json` to `path` atomically (a temporary file, then a rename); OSError."""
        document = self.as_json(kms_calls, cache)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        temporary.replace(path)

    def summary_line(self) -> str:
        """One line for the log at exit."""
        latency = self.latency_ms.summary()
        shown = ", ".join(
            f"{name} {value:.1f}ms" for name, value in latency.items() if value is not None
        )
        return (
            f"{self.direction}: {self.records_in} in, {self.records_out} out, "
            f"{self.dlq} dead-lettered, {self.tombstones} tombstones in "
            f"{self.active_seconds:.2f}s ({self.records_per_s:,.0f} records/s); "
            f"latency {shown or 'n/a'}"
        )
