"""Prometheus metrics for the stream workers, read from their state at scrape time.

Nothing here runs per record: the worker already keeps counters and bounded log-bucket
histograms (`pipeline.histogram`) for its stats file, and a scrape turns a snapshot of them
into Prometheus families. The endpoint is served from the worker's own event loop (a small
asyncio HTTP server), so a scrape never reads state that another thread is changing.

The family names in METRIC_FAMILIES are a contract: dashboards and alerts use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from pipeline.errors import ConfigError
from pipeline.histogram import Histogram

log = logging.getLogger("envpipe.metrics")

#: Every metric family a worker exports, with its Prometheus type.
METRIC_FAMILIES: dict[str, str] = {
    "envpipe_records_total": "counter",
    "envpipe_record_seconds": "histogram",
    "envpipe_end_to_end_seconds": "histogram",
    "envpipe_kms_requests_total": "counter",
    "envpipe_kms_request_seconds": "histogram",
    "envpipe_dek_cache_events_total": "counter",
    "envpipe_inflight_bytes": "gauge",
    "envpipe_paused_partitions": "gauge",
    "envpipe_consumer_lag": "gauge",
}

#: Per-record processing time: a warm seal or open takes a few microseconds.
RECORD_BUCKETS = (
    *(1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4),
    *(1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0),
)
#: Source timestamp to output acknowledgement: milliseconds when keeping up, more when not.
END_TO_END_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: One KMS request: ~10 ms in-region, seconds when throttled or failing over.
KMS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Snapshot:
    """What a worker reports at one scrape (the worker builds it; see workers/stream.py)."""

    direction: str
    #: the cryptography service ("aws", "vault", "pkcs11"; "" for the passthrough)
    provider: str = ""
    records_ok: int = 0
    records_dlq: int = 0
    #: per-record processing time in seconds, and source-to-ack time in milliseconds
    record_seconds: Histogram | None = None
    end_to_end_ms: Histogram | None = None
    kms_calls: Mapping[str, int] = field(default_factory=dict)
    kms_failures: Mapping[str, int] = field(default_factory=dict)
    kms_latency: Mapping[str, Histogram] = field(default_factory=dict)
    cache_events: Mapping[str, int] = field(default_factory=dict)
    inflight_bytes: int = 0
    paused_partitions: int = 0
    #: (topic, partition) -> records behind the partition's high watermark
    lag: Mapping[tuple[str, int], int] = field(default_factory=dict)


class WorkerCollector(Collector):
    """Turns the worker's snapshot into the families of METRIC_FAMILIES."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        shot = self._snapshot()
        direction = shot.direction
        records = CounterMetricFamily(
            "envpipe_records", "Records handled, by outcome", labels=["direction", "outcome"]
        )
        records.add_metric([direction, "ok"], shot.records_ok)
        records.add_metric([direction, "dlq"], shot.records_dlq)
        yield records
        yield _histogram(
            "envpipe_record_seconds",
            "Per-record processing time in the worker (transform and hand-off to the producer)",
            [([direction], shot.record_seconds, 1.0)],
            ["direction"],
            RECORD_BUCKETS,
        )
        yield _histogram(
            "envpipe_end_to_end_seconds",
            "From the source record's timestamp to the output's acknowledgement",
            [([direction], shot.end_to_end_ms, 1e-3)],
            ["direction"],
            END_TO_END_BUCKETS,
        )
        provider = shot.provider
        requests = CounterMetricFamily(
            "envpipe_kms_requests",
            "Cryptography-service requests, by provider, operation and outcome",
            labels=["provider", "operation", "outcome"],
        )
        for operation, calls in sorted(shot.kms_calls.items()):
            failed = shot.kms_failures.get(operation, 0)
            requests.add_metric([provider, operation, "ok"], calls - failed)
            requests.add_metric([provider, operation, "error"], failed)
        yield requests
        yield _histogram(
            "envpipe_kms_request_seconds",
            "Cryptography-service request latency, failures included",
            [([provider, op], hist, 1.0) for op, hist in sorted(shot.kms_latency.items())],
            ["provider", "operation"],
            KMS_BUCKETS,
        )
        events = CounterMetricFamily(
            "envpipe_dek_cache_events", "DEK cache events", labels=["cache", "event"]
        )
        for event, count in sorted(shot.cache_events.items()):
            cache, _, name = event.rpartition("_") if "_" in event else ("", "", event)
            events.add_metric([cache or _cache_of(direction), name], count)
        yield events
        yield GaugeMetricFamily(
            "envpipe_inflight_bytes",
            "Bytes read but not yet acknowledged (bounded by ENVPIPE_MAX_INFLIGHT_BYTES)",
            value=shot.inflight_bytes,
        )
        yield GaugeMetricFamily(
            "envpipe_paused_partitions",
            "Partitions paused for backpressure or a KMS outage",
            value=shot.paused_partitions,
        )
        lag = GaugeMetricFamily(
            "envpipe_consumer_lag",
            "Records between the group's committed offset and the high watermark",
            labels=["topic", "partition"],
        )
        for (topic, partition), behind in sorted(shot.lag.items()):
            lag.add_metric([topic, str(partition)], behind)
        yield lag


def _cache_of(direction: str) -> str:
    """Which cache a worker's unprefixed cache events come from (a rewrap prefixes its own)."""
    return "encrypt" if direction == "encrypt" else "decrypt"


def _histogram(
    name: str,
    documentation: str,
    series: list[tuple[list[str], Histogram | None, float]],
    labels: list[str],
    bounds: tuple[float, ...],
) -> HistogramMetricFamily:
    """Prometheus buckets from log-bucket histograms; `scale` converts their unit to seconds."""
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for label_values, histogram, scale in series:
        if histogram is None:
            continue
        counts = histogram.cumulative([bound / scale for bound in bounds])
        buckets: list[tuple[str, float]] = [
            (_bound(bound), count) for bound, count in zip(bounds, counts, strict=True)
        ]
        buckets.append(("+Inf", histogram.count))
        family.add_metric(label_values, buckets, sum_value=histogram.total * scale)
    return family


def _bound(value: float) -> str:
    return f"{value:g}"


class MetricsServer:
    """`GET /metrics` on the worker's event loop; anything else is a 404."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(WorkerCollector(snapshot))
        self._server: asyncio.Server | None = None
        self.scrapes: Counter[int] = Counter()

    async def start(self, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 - a scrape target
        """Listen on `port`; a taken port is a ConfigError naming ENVPIPE_METRICS_PORT."""
        try:
            self._server = await asyncio.start_server(self._serve, host, port)
        except OSError as exc:
            raise ConfigError(
                "ENVPIPE_METRICS_PORT", f"cannot serve metrics on port {port}: {exc.strerror}"
            ) from exc
        log.info("metrics on http://%s:%d/metrics", host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            method, _, rest = request.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method in (b"GET", b"HEAD") and path in (b"/metrics", b"/"):
                status, body, kind = 200, generate_latest(self.registry), CONTENT_TYPE_LATEST
            else:
                status, body, kind = 404, b"not found: try /metrics\n", "text/plain"
            self.scrapes[status] += 1
            head = (
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}\r\n"
                f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head if method == b"HEAD" else head + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that never finished its request
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
