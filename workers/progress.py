"""What a running worker says about itself: the progress line and the metrics snapshot.

Both read the worker's existing state (`WorkerStats`, the flow control, the service client's
counters), never anything per record beyond one histogram update per batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from pipeline.histogram import Histogram
from workers.metrics import Snapshot

if TYPE_CHECKING:
    from workers.loop import StreamWorker

__all__ = ["Progress"]

log = logging.getLogger("envpipe.stream")

PROGRESS_SECONDS = 5.0


class Progress:
    """The progress line every few seconds, and the state a metrics scrape reads."""

    def __init__(self, worker: StreamWorker) -> None:
        self._worker = worker
        #: per-record processing time (a batch's time over its records), in seconds
        self.record_seconds = Histogram(min_value=1e-7, max_value=3600)

    def processed(self, records: int, seconds: float) -> None:
        """A batch of `records` took `seconds` from fetch to hand-off."""
        if records:
            self.record_seconds.add_repeated(seconds / records, records)

    async def report(self) -> None:
        worker = self._worker
        stats = worker.stats
        last_in, last_time = stats.records_in, time.monotonic()
        while True:
            await asyncio.sleep(PROGRESS_SECONDS)
            now = time.monotonic()
            rate = (stats.records_in - last_in) / (now - last_time)
            last_in, last_time = stats.records_in, now
            log.info(
                "%s: %.0f records/s; %d in, %d out, %d dead-lettered; in flight %d records "
                "(%d bytes); %d partitions paused%s",
                stats.direction,
                rate,
                stats.records_in,
                stats.records_out,
                stats.dlq,
                worker.flow.inflight_records,
                worker.flow.inflight_bytes,
                len(worker.consumer.paused()),
                worker.flow.describe(),
            )

    def snapshot(self) -> Snapshot:
        """The worker's state for a metrics scrape (runs on the event loop, never per record)."""
        worker = self._worker
        stats, kms, consumer = worker.stats, worker.transform.kms, worker.consumer
        lag: dict[tuple[str, int], int] = {}
        if consumer is not None:
            for tp, base in worker.lag_base.items():
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    lag[(tp.topic, tp.partition)] = max(0, highwater - base)
        return Snapshot(
            direction=stats.direction,
            provider=kms.provider if kms is not None else "",
            records_ok=stats.records_out,
            records_dlq=stats.dlq,
            record_seconds=self.record_seconds,
            end_to_end_ms=stats.latency_ms,
            kms_calls=dict(kms.calls) if kms else {},
            kms_failures=dict(kms.failures) if kms else {},
            kms_latency=dict(kms.latency) if kms else {},
            cache_events=dict(worker.transform.cache_stats),
            inflight_bytes=worker.flow.inflight_bytes,
            paused_partitions=len(consumer.paused()) if consumer is not None else 0,
            lag=lag,
        )
