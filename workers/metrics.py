"""Prometheus metrics for the stream workers.

The family names below are a contract: dashboards and alerts use them.
"""

from __future__ import annotations

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
