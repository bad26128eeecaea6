"""`envpipe bench --smoke`: every code path of the benchmark runs, and results.json has its shape.

Smoke mode uses tiny counts and overlapping runs, so its figures mean nothing: this test checks
only that every key of the documented shape is there with a sane type and that no number is
NaN or infinite, never a speed. Our own implementations must produce numbers; a peer
(`aws_esdk`, `confluent_csfle`, `faust_encrypt`) may instead be `{"error": "why"}`, since the
peers come from the optional `bench` extra and may not be installed. The smoke run starts
four brokers and three cryptography services (the codec stage's, one per provider) and takes
about two minutes; Apache Kafka is left to full runs, and says so.
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
    "envelope_overhead_bytes_v2",
    "overhead_bytes",
    "crypto_batch",
    "codecs",
    "json_compression",
    "providers",
    "kafka",
}
CRYPTO_IMPLS = {"aead_only", "floor", "envpipe", "aws_esdk", "confluent_csfle"}
PIPELINE_IMPLS = {
    "passthrough",
    "passthrough_padded",
    "envpipe_encrypt",
    "envpipe_encrypt_v2",
    "envpipe_decrypt",
    "envpipe_decrypt_v2",
    "faust_encrypt",
}
PIPELINE_KEYS = {
    "records_per_s",
    "cpu_us_per_record",
    "latency_ms",
    "paced_latency_ms",
    "light_latency_ms",
}
PEERS = {"aws_esdk", "confluent_csfle", "faust_encrypt"}
SIZES = {"256", "1024", "16384"}
PERCENTILES = {"p50", "p99", "p999"}
CODECS = {"none", "gzip", "snappy", "lz4", "zstd"}
CODEC_KEYS = {"broker_bytes_per_record", "cpu_us_per_record", "records_per_s", "x_passthrough"}
PROVIDERS = {"aws", "vault", "pkcs11"}
PROVIDER_LATENCIES = ("wrap_ms", "unwrap_ms", "sign_ms")


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
        timeout=230,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = (out / "results.json").read_text(encoding="utf-8")
    return json.loads(text, parse_constant=_refuse_constant), out


@pytest.mark.timeout(240)
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
        assert set(entry) == PIPELINE_KEYS, where
        _check_number(entry["records_per_s"], f"{where}.records_per_s")
        _check_number(entry["cpu_us_per_record"], f"{where}.cpu_us_per_record")
        for kind in ("latency_ms", "paced_latency_ms", "light_latency_ms"):
            _check_percentiles(entry[kind], f"{where}.{kind}", may_fail=impl in PEERS)

    assert set(results["peak_rss_mib"]) == CRYPTO_IMPLS | PIPELINE_IMPLS
    for impl, mib in results["peak_rss_mib"].items():
        if impl in PEERS and _is_error(mib):
            continue
        _check_number(mib, f"peak_rss_mib.{impl}")


@pytest.mark.timeout(240)
def test_results_json_has_the_envelope_sizes_and_the_batch_seal(
    smoke_results: tuple[dict[str, Any], Path],
) -> None:
    results, _ = smoke_results
    _check_number(results["envelope_overhead_bytes_v2"], "envelope_overhead_bytes_v2")
    overhead = results["overhead_bytes"]
    assert set(overhead) == {"v1", "v2"}
    for fmt, by_size in overhead.items():
        assert set(by_size) == {"100", "1024", "16384"}, fmt
        for size, value in by_size.items():
            assert isinstance(value, int), f"overhead_bytes.{fmt}.{size}"
            assert value > 0, f"overhead_bytes.{fmt}.{size}"
    # v2 carries only the dek_id: exact. v1 carries a header with a DER ECDSA signature, whose
    # length varies by a few bytes from one DEK to the next (70-72 B, rarely fewer).
    assert overhead["v2"]["1024"] == results["envelope_overhead_bytes_v2"]
    assert abs(overhead["v1"]["1024"] - results["envelope_overhead_bytes"]) <= 4
    assert overhead["v2"]["1024"] < overhead["v1"]["1024"]

    batch = results["crypto_batch"]
    assert set(batch) == {
        "value_bytes",
        "records_per_call",
        "us_per_record",
        "seal_many_x_aead_only",
    }
    assert set(batch["us_per_record"]) >= {"aead_only", "envpipe"}
    for impl, value in batch["us_per_record"].items():
        _check_number(value, f"crypto_batch.us_per_record.{impl}")
    _check_number(batch["seal_many_x_aead_only"], "crypto_batch.seal_many_x_aead_only")

    compression = results["json_compression"]
    for codec in ("zstd", "lz4"):
        assert set(compression[codec]) == {"plaintext", "v1", "v2"}, codec
        for form, value in compression[codec].items():
            _check_number(value, f"json_compression.{codec}.{form}")


@pytest.mark.timeout(240)
def test_results_json_has_the_codec_provider_and_kafka_tables(
    smoke_results: tuple[dict[str, Any], Path],
) -> None:
    results, _ = smoke_results
    codecs = results["codecs"]
    assert set(codecs) == {"passthrough", "envpipe_encrypt", "envpipe_encrypt_v2"}
    assert set(codecs["passthrough"]) == CODECS
    assert set(codecs["envpipe_encrypt"]) == CODECS
    assert set(codecs["envpipe_encrypt_v2"]) >= {"none", "lz4"}
    for impl, by_codec in codecs.items():
        for codec, entry in by_codec.items():
            where = f"codecs.{impl}.{codec}"
            assert set(entry) == CODEC_KEYS, f"{where}: {entry}"
            for name in CODEC_KEYS:
                _check_number(entry[name], f"{where}.{name}")

    providers = results["providers"]
    assert set(providers) == PROVIDERS
    for name, entry in providers.items():
        assert not _is_error(entry), f"providers.{name}: {entry}"
        assert entry["provider"] == name
        for latency in PROVIDER_LATENCIES:
            _check_percentiles(entry[latency], f"providers.{name}.{latency}", may_fail=False)
        _check_number(entry["calls_per_dek"], f"providers.{name}.calls_per_dek")
        assert isinstance(entry["deks"], int), name
        assert entry["deks"] > 0, name
        assert set(entry["overhead_bytes_1024"]) == {"v1", "v2"}, name
        _check_number(entry["encrypt_records_per_s"], f"providers.{name}.encrypt_records_per_s")
        _check_number(entry["encrypt_x_aws"], f"providers.{name}.encrypt_x_aws")
        assert isinstance(entry["same_as_aws"], bool), name

    kafka = results["kafka"]
    assert set(kafka) == {"skipped"}
    assert isinstance(kafka["skipped"], str)


@pytest.mark.timeout(240)
def test_writes_the_human_table(smoke_results: tuple[dict[str, Any], Path]) -> None:
    _, out = smoke_results
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "## Targets (issue 4)" in table
    assert "## Targets (compact v2" in table
    for goal in (
        "v2 envelope overhead ≤ 48 B",
        "CPU per record ≤ passthrough + 2.5 µs",
        "envpipe_encrypt_v2 throughput ≥ 0.85x passthrough",
        "envpipe_decrypt_v2 throughput ≥ 0.85x passthrough",
        "light-load p99 added over passthrough ≤ 5 ms",
        "seal_many per record ≤ 2x aead_only",
    ):
        assert goal in table, goal
    for section in ("## Compression", "## v1 / v2 trade-off", "## Cryptography services"):
        assert section in table, section
    assert "## Pipeline stage on Apache Kafka" in table
    for impl in CRYPTO_IMPLS | PIPELINE_IMPLS | PROVIDERS:
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
