"""A bounded-memory histogram: log buckets (the DDSketch idea), percentiles within ~1%.

Bucket `i` holds values in `(gamma**(i-1), gamma**i]`, and a percentile is reported as the
point of its bucket whose relative distance to either edge is the same, so every answer is
within `relative_accuracy` of a value that was really recorded. Memory is a fixed list of
counts, whatever the traffic, so a worker can record every record's latency for days, and a
metrics scrape can turn the counts into Prometheus buckets without touching the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["Histogram"]


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

    def add_repeated(self, value: float, times: int) -> None:
        """Record `value` `times` times (a batch's per-record average, once per record)."""
        if times <= 0:
            return
        low = self._min_value
        if value <= low:
            index = 0
        else:
            index = min(
                math.ceil(math.log(value) * self._inv_log_gamma) - self._offset,
                len(self._counts) - 1,
            )
        self._counts[index] += times
        self.count += times
        self.total += value * times
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def cumulative(self, bounds: Sequence[float]) -> list[int]:
        """How many values fall at or below each of `bounds` (ascending), for Prometheus.

        A log bucket counts under a bound when its upper edge is at or below it, so each
        figure is exact to within the histogram's relative accuracy.
        """
        gamma, offset = self._gamma, self._offset
        result = []
        running = 0
        index = 0
        counts = self._counts
        for bound in bounds:
            while index < len(counts) and gamma ** (index + offset) <= bound * (1 + 1e-9):
                running += counts[index]
                index += 1
            result.append(running)
        return result

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
