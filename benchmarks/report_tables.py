"""results.md's tables, one function per table, each a list of Markdown lines from results.json.

A cell shows `n/a` where nothing was measured and `error: why` where a run failed, so a
partial run still reads. Ratios are always against the row measured beside it in the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.pipeline_stage import IMPLS
from benchmarks.report_targets import SIZES, get, ratio

CRYPTO_IMPLS = ("aead_only", "floor", "envpipe", "aws_esdk", "confluent_csfle")
PIPELINE_IMPLS = IMPLS
PERCENTILES = ("p50", "p99", "p999")
#: the v1/v2 trade-off rows: (label, implementation, codec)
TRADE_ROWS = (
    ("v1, none", "envpipe_encrypt", "none"),
    ("v1, lz4", "envpipe_encrypt", "lz4"),
    ("v1, zstd", "envpipe_encrypt", "zstd"),
    ("v2, none", "envpipe_encrypt_v2", "none"),
    ("v2, lz4", "envpipe_encrypt_v2", "lz4"),
    ("v2, zstd", "envpipe_encrypt_v2", "zstd"),
)


def cell(tree: Any, *path: str, fmt: Callable[[float], str] = "{:,.1f}".format) -> str:
    value = get(tree, *path)
    return "n/a" if value is None else fmt(value)


def error_of(tree: Any) -> str | None:
    return tree.get("error") if isinstance(tree, dict) else None


def whole(value: float) -> str:
    return f"{value:,.0f}"


def triple(summary: Any) -> str:
    if not isinstance(summary, dict) or "p50" not in summary:
        return f"error: {error_of(summary)}" if error_of(summary) else "n/a"
    return " / ".join(f"{summary[name]:,.1f}" for name in PERCENTILES)


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def crypto_table(results: dict[str, Any], details: dict[str, Any]) -> list[str]:
    """Per size and implementation: seal and open percentiles, rate, KMS calls; then batches."""
    lines = ["", "## Crypto stage: per record, in process, caches warm", ""]
    lines += [
        "| size | implementation | seal p50 / p99 / p999 µs | open p50 / p99 / p999 µs "
        "| records/s | seal x floor | KMS calls | samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    crypto = results["crypto"]
    samples = details.get("crypto", {}).get("samples", {})
    for size in SIZES:
        for impl in CRYPTO_IMPLS:
            entry = crypto.get(impl, {}).get(size, {})
            error = error_of(entry) if "seal_us" not in entry else None
            if error:
                lines.append(f"| {size} | {impl} | error: {error} | | | | | |")
                continue
            times = ratio(
                get(entry, "seal_us", "p50"), get(crypto, "floor", size, "seal_us", "p50")
            )
            lines.append(
                f"| {size} | {impl} | {triple(entry.get('seal_us'))} | "
                f"{triple(entry.get('open_us'))} | {cell(entry, 'records_per_s', fmt=whole)} | "
                f"{_times(times)} | {entry.get('kms_calls')} | "
                f"{samples.get(impl, {}).get(size, 'n/a')} |"
            )
    batch = results.get("crypto_batch", {})
    per = batch.get("us_per_record", {})
    lines += [
        "",
        f"One batch call of {batch.get('records_per_call', 'n/a')} records of "
        f"{batch.get('value_bytes', 'n/a')} B, per record (median over rounds): "
        + ", ".join(f"{impl} {value:.2f} µs" for impl, value in per.items())
        + f"; `Encryptor.seal_many` = {_times(get(batch, 'seal_many_x_aead_only'))} aead_only.",
    ]
    return lines


def pipeline_table(
    results: dict[str, Any], details: dict[str, Any], key: str = "pipeline"
) -> list[str]:
    """One row per worker: drain rate and CPU, x passthrough, the three latency kinds, RSS."""
    pipeline = results[key] if key == "pipeline" else results.get("kafka", {}).get("pipeline", {})
    rss = results["peak_rss_mib"] if key == "pipeline" else {}
    run_details = details.get(key, {})
    base = get(pipeline, "passthrough", "records_per_s")
    base_cpu = get(pipeline, "passthrough", "cpu_us_per_record")
    rate, light = run_details.get("paced_rate"), run_details.get("light_rate")
    lines = [
        "| implementation | drain records/s | range over rounds | x passthrough "
        "| CPU µs/record (+ over passthrough) | burst latency p50 / p99 / p999 ms "
        f"| paced latency p50 / p99 / p999 ms (at {whole(rate) if rate else 'n/a'} records/s) "
        f"| light-load latency p50 / p99 / p999 ms (at {whole(light) if light else 'n/a'}"
        " records/s) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    runs = run_details.get("runs", [])
    for impl in PIPELINE_IMPLS:
        if impl not in pipeline:
            continue
        entry = pipeline[impl]
        if "records_per_s" not in entry:
            lines.append(f"| {impl} | error: {error_of(entry)} | | | | | | | |")
            continue
        rates = [
            run["records_per_s"]
            for run in runs
            if run["impl"] == impl and run["kind"] == "drain" and run["records_per_s"]
        ]
        spread = f"{whole(min(rates))} - {whole(max(rates))}" if len(rates) > 1 else "one round"
        cpu = get(entry, "cpu_us_per_record")
        added = "" if cpu is None or base_cpu is None else f" ({cpu - base_cpu:+.2f})"
        lines.append(
            f"| {impl} | {cell(entry, 'records_per_s', fmt=whole)} | {spread} | "
            f"{_times(ratio(get(entry, 'records_per_s'), base))} "
            f"| {cell(entry, 'cpu_us_per_record', fmt='{:.2f}'.format)}{added} "
            f"| {triple(entry.get('latency_ms'))} | {triple(entry.get('paced_latency_ms'))} "
            f"| {triple(entry.get('light_latency_ms'))} | {cell(rss, impl)} |"
        )
    return lines


def overhead_table(results: dict[str, Any]) -> list[str]:
    """Envelope bytes minus value bytes, per format and value size (exact)."""
    sizes = results.get("overhead_bytes", {})
    columns = sorted({size for by_size in sizes.values() for size in by_size}, key=int)
    lines = [
        "",
        "## Envelope overhead in bytes (exact, from real envelopes, aws provider)",
        "",
        "| format | " + " | ".join(f"{size} B value" for size in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for fmt, by_size in sizes.items():
        lines.append(f"| {fmt} | " + " | ".join(str(by_size.get(s, "n/a")) for s in columns) + " |")
    return lines


def codec_table(results: dict[str, Any]) -> list[str]:
    """Per codec: bytes at the broker, CPU and rate, passthrough beside envpipe v1 and v2."""
    codecs = results.get("codecs", {})
    lines = [
        "",
        "## Compression: bytes per record that reach the broker (JSON values ≤ 1 KiB)",
        "",
        "| worker | codec | broker B/record | CPU µs/record | records/s "
        "| x passthrough (same codec) |",
        "|---|---|---|---|---|---|",
    ]
    for impl, by_codec in codecs.items():
        for codec, entry in by_codec.items():
            if error_of(entry):
                lines.append(f"| {impl} | {codec} | error: {error_of(entry)} | | | |")
                continue
            lines.append(
                f"| {impl} | {codec} | {cell(entry, 'broker_bytes_per_record', fmt=whole)} "
                f"| {cell(entry, 'cpu_us_per_record', fmt='{:.2f}'.format)} "
                f"| {cell(entry, 'records_per_s', fmt=whole)} "
                f"| {cell(entry, 'x_passthrough', fmt='{:.2f}x'.format)} |"
            )
    return lines


def trade_table(results: dict[str, Any]) -> list[str]:
    """v1 against v2, each with and without compression: bytes, CPU, rate."""
    codecs = results.get("codecs", {})
    lines = [
        "",
        "## v1 / v2 trade-off (same JSON values, through the same proxy)",
        "",
        "| format, codec | broker B/record | x passthrough bytes (same codec) | CPU µs/record "
        "| records/s | x passthrough rate (same codec) |",
        "|---|---|---|---|---|---|",
    ]
    for label, impl, codec in TRADE_ROWS:
        entry = codecs.get(impl, {}).get(codec)
        if entry is None:
            continue
        if error_of(entry):
            lines.append(f"| {label} | error: {error_of(entry)} | | | | |")
            continue
        plain = get(codecs, "passthrough", codec, "broker_bytes_per_record")
        lines.append(
            f"| {label} | {cell(entry, 'broker_bytes_per_record', fmt=whole)} "
            f"| {_times(ratio(get(entry, 'broker_bytes_per_record'), plain))} "
            f"| {cell(entry, 'cpu_us_per_record', fmt='{:.2f}'.format)} "
            f"| {cell(entry, 'records_per_s', fmt=whole)} "
            f"| {cell(entry, 'x_passthrough', fmt='{:.2f}x'.format)} |"
        )
    compression = results.get("json_compression", {})
    codecs_shown = [name for name in ("zstd", "lz4") if name in compression]
    lines += [
        "",
        f"How the demo's JSON orders compress ({compression.get('records', 'n/a')} records, mean "
        f"{compression.get('mean_value_bytes', 'n/a')} B, Kafka batches of "
        f"{compression.get('records_per_batch', 'n/a')}; ratio = uncompressed / compressed):",
        "",
        "| codec | plaintext | v1 sealed | v2 sealed |",
        "|---|---|---|---|",
    ]
    for codec in codecs_shown:
        ratios = compression[codec]
        lines.append(
            f"| {codec} | "
            + " | ".join(f"{ratios.get(form, 0):.2f}x" for form in ("plaintext", "v1", "v2"))
            + " |"
        )
    return lines


def provider_table(results: dict[str, Any]) -> list[str]:
    """Per provider: wrap, unwrap, sign latency, calls per DEK, and the worker's rate."""
    providers = results.get("providers", {})
    lines = [
        "",
        "## Cryptography services (each on its own broker; the service is off the record path)",
        "",
        "| provider | wrap p50 / p99 ms | unwrap p50 / p99 ms | sign p50 / p99 ms | calls "
        "| calls per DEK | v1 / v2 overhead B | encrypt records/s | x aws | CPU µs/record |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in providers.items():
        if error_of(entry):
            lines.append(f"| {name} | error: {error_of(entry)} |" + " |" * 8)
            continue
        overhead = entry.get("overhead_bytes_1024", {})
        ops = " | ".join(
            f"{cell(entry, f'{op}_ms', 'p50', fmt='{:.2f}'.format)} / "
            f"{cell(entry, f'{op}_ms', 'p99', fmt='{:.2f}'.format)}"
            for op in ("wrap", "unwrap", "sign")
        )
        failed = error_of(entry.get("encrypt_records_per_s"))
        rate = f"error: {failed}" if failed else cell(entry, "encrypt_records_per_s", fmt=whole)
        per_dek = cell(entry, "calls_per_dek", fmt="{:g}".format)
        lines.append(
            f"| {name} | {ops} | {entry.get('calls')} | {per_dek} "
            f"| {overhead.get('v1', 'n/a')} / {overhead.get('v2', 'n/a')} | {rate} "
            f"| {cell(entry, 'encrypt_x_aws', fmt='{:.2f}x'.format)} "
            f"| {cell(entry, 'encrypt_cpu_us_per_record', fmt='{:.2f}'.format)} |"
        )
    return lines


def kafka_section(results: dict[str, Any], details: dict[str, Any]) -> list[str]:
    """The pipeline stage on Apache Kafka, and its rates over Tansu's; or why it was skipped."""
    kafka = results.get("kafka", {})
    lines = ["", "## Pipeline stage on Apache Kafka", ""]
    if "skipped" in kafka:
        return [*lines, f"Skipped: {kafka['skipped']}."]
    lines += [f"{kafka.get('broker', 'Apache Kafka')}, 1 KiB records, 3 partitions.", ""]
    lines += pipeline_table(results, details, key="kafka")
    tansu = results["pipeline"]
    lines += ["", "| implementation | Kafka records/s | Tansu records/s | Kafka / Tansu |"]
    lines += ["|---|---|---|---|"]
    for impl, entry in kafka.get("pipeline", {}).items():
        ours, theirs = get(entry, "records_per_s"), get(tansu, impl, "records_per_s")
        lines.append(
            f"| {impl} | {cell(entry, 'records_per_s', fmt=whole)} "
            f"| {cell(tansu, impl, 'records_per_s', fmt=whole)} | {_times(ratio(ours, theirs))} |"
        )
    return lines
