"""`envpipe bench --smoke`: every code path of the benchmark runs, and results.json has its shape.

Smoke mode uses tiny counts and overlapping pipeline runs, so its figures mean nothing: this
test checks only that every key of the documented shape is there and that no number is NaN
or infinite, never a speed. Our own implementations must produce numbers; a peer
(`aws_esdk`, `confluent_csfle`, `faust_encrypt`) may instead be `{"error": "why"}`, since the
peers come from the optional `bench` extra and may not be installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TOP_KEYS = {
    "machine",
    "quick",
    "crypto",
    "pipeline",
    "kms_calls_per_million_records",
    "envelope_overhead_bytes",
    "peak_rss_mib",
}
CRYPTO_IMPLS = {"floor", "envpipe", "aws_esdk", "confluent_csfle"}
PIPELINE_IMPLS = {
    "passthrough",
    "passthrough_padded",
    "envpipe_encrypt",
    "envpipe_decrypt",
    "faust_encrypt",
}
PEERS = {"aws_esdk", "confluent_csfle", "faust_encrypt"}
SIZES = {"256", "1024", "16384"}
PERCENTILES = {"p50", "p99", "p999"}


def _refuse_constant(name: str) -> Any:
    raise AssertionError(f"results.json contains {name}")


def _is_error(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"error"} and isinstance(value["error"], str)


def _check_number(value: Any, where: str) -> None:
    assert isinstance(value, int | float), f"{where} is {value!r}, not a number"
    assert not isinstance(value, bool), f"{where} is a bool"


def _check_percentiles(value: Any, where: str, *, may_fail: bool) -> None:
    if may_fail and _is_error(value):
        return
    assert isinstance(value, dict), f"{where} is {value!r}"
    assert set(value) == PERCENTILES, f"{where} has keys {sorted(value)}"
    for name in PERCENTILES:
        _check_number(value[name], f"{where}.{name}")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """Run `envpipe bench --smoke` once, as a user would, and load what it wrote."""
    out = tmp_path_factory.mktemp("bench-smoke")
    completed = subprocess.run(
        [sys.executable, "-m", "workers.cli", "bench", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = (out / "results.json").read_text(encoding="utf-8")
    return json.loads(text, parse_constant=_refuse_constant), out


@pytest.mark.timeout(180)
def test_results_json_has_the_documented_shape(smoke_results: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke_results
    assert set(results) == TOP_KEYS
    assert isinstance(results["machine"], dict)
    assert results["quick"] is True
    _check_number(results["kms_calls_per_million_records"], "kms_calls_per_million_records")
    _check_number(results["envelope_overhead_bytes"], "envelope_overhead_bytes")

    assert set(results["crypto"]) == CRYPTO_IMPLS
    for impl, by_size in results["crypto"].items():
        assert set(by_size) == SIZES, f"crypto.{impl} has sizes {sorted(by_size)}"
        for size, cell in by_size.items():
            where = f"crypto.{impl}.{size}"
            if impl in PEERS and _is_error(cell):
                continue
            assert set(cell) == {"seal_us", "open_us", "records_per_s", "kms_calls"}, where
            _check_percentiles(cell["seal_us"], f"{where}.seal_us", may_fail=False)
            _check_percentiles(cell["open_us"], f"{where}.open_us", may_fail=False)
            _check_number(cell["records_per_s"], f"{where}.records_per_s")
            assert isinstance(cell["kms_calls"], int), where

    assert set(results["pipeline"]) == PIPELINE_IMPLS
    for impl, entry in results["pipeline"].items():
        where = f"pipeline.{impl}"
        if impl in PEERS and _is_error(entry):
            continue
        assert set(entry) == {"records_per_s", "latency_ms", "paced_latency_ms"}, where
        _check_number(entry["records_per_s"], f"{where}.records_per_s")
        _check_percentiles(entry["latency_ms"], f"{where}.latency_ms", may_fail=impl in PEERS)
        _check_percentiles(
            entry["paced_latency_ms"], f"{where}.paced_latency_ms", may_fail=impl in PEERS
        )

    assert set(results["peak_rss_mib"]) == CRYPTO_IMPLS | PIPELINE_IMPLS
    for impl, mib in results["peak_rss_mib"].items():
        if impl in PEERS and _is_error(mib):
            continue
        _check_number(mib, f"peak_rss_mib.{impl}")


@pytest.mark.timeout(180)
def test_writes_the_human_table(smoke_results: tuple[dict[str, Any], Path]) -> None:
    _, out = smoke_results
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "## Targets (issue 4)" in table
    assert "light-load p99 added over passthrough" in table  # context for the paced target
    for impl in CRYPTO_IMPLS | PIPELINE_IMPLS:
        assert impl in table
    json.loads((out / "details.json").read_text(encoding="utf-8"), parse_constant=_refuse_constant)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sweep_writes_every_configuration_and_a_recommendation(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "bench",
            "--sweep",
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "best for this machine" in completed.stdout
    sweep = json.loads((tmp_path / "sweep.json").read_text(), parse_constant=_refuse_constant)
    grid = {(row["batch_max_records"], row["processes"]) for row in sweep["configurations"]}
    assert grid == {(50, 1), (200, 1)}
    for row in sweep["configurations"]:
        for name in ("records_per_s", "latency_p50_ms", "latency_p99_ms", "cpu_us_per_record"):
            _check_number(row[name], f"sweep {row['batch_max_records']}.{name}")
    assert sweep["best"] in sweep["configurations"]
