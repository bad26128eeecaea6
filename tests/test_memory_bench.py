"""`python -m benchmarks.memory` in smoke mode: every scenario runs, memory.json has its shape.

Three-second windows measure nothing, so this checks only that every key is there and that
every number is finite, never a memory figure or a speed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.kit import REPO

SCENARIOS = {"baseline", "slow_kms", "slow_destination", "slow_destination_small_bound"}
TOP_KEYS = {"machine", "quick", "plan", "scenarios"}
PLAN_KEYS = {
    "seconds",
    "warmup_seconds",
    "backlog_records",
    "value_bytes",
    "partitions",
    "sample_seconds",
    "flat_slope_mib_per_min",
}
SCENARIO_KEYS = {
    "what",
    "settings",
    "kms_delay_ms",
    "destination_bytes_per_s",
    "rss_mib",
    "slope_mib_per_min",
    "median_slope_mib_per_min",
    "ceiling_mib",
    "records_per_s",
    "window_seconds",
    "lowest_backlog_records",
    "saturated",
    "broker_rss_mib",
    "worker",
    "flat",
    "verdict",
    "samples",
}
SETTINGS = {
    "ENVPIPE_MAX_INFLIGHT_BYTES",
    "ENVPIPE_MAX_INFLIGHT_RECORDS",
    "ENVPIPE_BATCH_MAX_RECORDS",
    "ENVPIPE_DEK_MAX_RECORDS",
}
NUMBERS = (
    "slope_mib_per_min",
    "median_slope_mib_per_min",
    "ceiling_mib",
    "records_per_s",
    "broker_rss_mib",
)
RSS_KEYS = {"idle", "start", "p50", "max", "end", "peak_vmhwm"}
WORKER_KEYS = {"exit_code", "records_in", "records_out", "records_per_s", "pauses", "kms_calls"}


def _refuse_constant(name: str) -> Any:
    raise AssertionError(f"memory.json contains {name}")


def _check_numbers(value: Any, where: str) -> None:
    """Every number anywhere below `value` is a real, finite number."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_numbers(item, f"{where}[{index}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        assert math.isfinite(value), f"{where} is {value!r}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_memory_json_has_every_key_and_finite_numbers(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--seconds", "3", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| scenario |" in completed.stdout  # the result table
    text = (tmp_path / "memory.json").read_text(encoding="utf-8")
    document = json.loads(text, parse_constant=_refuse_constant)

    assert set(document) == TOP_KEYS
    assert document["quick"] is True
    assert set(document["plan"]) == PLAN_KEYS
    assert set(document["scenarios"]) == SCENARIOS
    for name, entry in document["scenarios"].items():
        assert set(entry) == SCENARIO_KEYS, f"{name}: {entry.get('error', sorted(entry))}"
        assert set(entry["settings"]) == SETTINGS, name
        assert set(entry["rss_mib"]) == RSS_KEYS, name
        assert set(entry["worker"]) == WORKER_KEYS, name
        assert set(entry["worker"]["pauses"]) == {"backpressure", "kms"}, name
        assert isinstance(entry["flat"], bool), name
        assert isinstance(entry["saturated"], bool), name
        assert isinstance(entry["verdict"], str), name
        assert entry["samples"], f"{name} has no RSS samples"
        assert all(len(sample) == 2 for sample in entry["samples"]), name
        for key in NUMBERS:
            assert _is_number(entry[key]), f"{name}.{key} is {entry[key]!r}"
        for key, value in entry["rss_mib"].items():
            assert _is_number(value), f"{name}.rss_mib.{key} is {value!r}"
    _check_numbers(document, "memory.json")
