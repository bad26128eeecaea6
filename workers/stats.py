"""Worker statistics: counters and bounded-memory histograms (`pipeline.histogram`)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.histogram import Histogram

__all__ = ["Histogram", "WorkerStats"]


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

    def summary_line(self, kms_calls: Mapping[str, int] | None = None) -> str:
        """One line for the log at exit: counts, dead letters by reason, service calls."""
        latency = self.latency_ms.summary()
        shown = ", ".join(
            f"{name} {value:.1f}ms" for name, value in latency.items() if value is not None
        )
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.dlq_reasons.items()))
        calls = ", ".join(f"{op} {n}" for op, n in sorted((kms_calls or {}).items()) if n)
        return (
            f"{self.direction}: {self.records_in} in, {self.records_out} out, "
            f"{self.dlq} dead-lettered{f' ({reasons})' if reasons else ''}, "
            f"{self.tombstones} tombstones in "
            f"{self.active_seconds:.2f}s ({self.records_per_s:,.0f} records/s); "
            f"KMS calls {sum((kms_calls or {}).values())}{f' ({calls})' if calls else ''}; "
            f"latency {shown or 'n/a'}"
        )
