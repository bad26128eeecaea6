"""`workers.stats`: what a worker's stats file and exit line say."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from workers.stats import WorkerStats


def test_the_stats_file_has_every_field_with_its_meaning(tmp_path: Path) -> None:
    stats = WorkerStats("encrypt")
    stats.fetched(10, now=100.0)
    stats.records_out, stats.dlq, stats.tombstones = 9, 1, 2
    stats.overhead_bytes, stats.overhead_records = 47 * 7, 7
    stats.dlq_reasons["key_unresolved"] += 1
    stats.latency_ms.add_many([1.0, 2.0, 3.0])
    stats.acknowledged(102.0)
    path = tmp_path / "stats.json"
    stats.write(path, Counter({"sign": 1, "generate_data_key": 1}), Counter({"hit": 9}))

    written = json.loads(path.read_text())
    assert written["direction"] == "encrypt"
    assert (written["records_in"], written["records_out"], written["dlq"]) == (10, 9, 1)
    assert written["active_seconds"] == 2.0
    assert written["records_per_s"] == 5.0
    assert written["envelope_overhead_bytes"] == 47
    assert written["dlq_reasons"] == {"key_unresolved": 1}
    assert written["kms_calls"] == {"generate_data_key": 1, "sign": 1}
    assert written["cache"] == {"hit": 9}
    assert written["latency_ms"]["p50"] is not None
    assert not path.with_name("stats.json.tmp").exists()  # written atomically


def test_an_idle_worker_reports_zeros_not_errors() -> None:
    stats = WorkerStats("decrypt")
    document = stats.as_json(Counter(), Counter())
    assert (document["records_in"], document["active_seconds"], document["records_per_s"]) == (
        0,
        0.0,
        0.0,
    )
    assert document["envelope_overhead_bytes"] is None
    assert "0 in, 0 out" in stats.summary_line()
