"""The demo's summary: every figure beside the source it comes from."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.demo.samples import PARTITIONS, Topics
from workers.demo.verify import Verification

__all__ = ["Produced", "Report", "render"]

_BROKERS = {"tansu": "embedded Tansu broker", "kafka": "Apache Kafka (KRaft)"}
_PROVIDERS = {
    "aws": "AWS KMS (moto)",
    "vault": "Vault transit (OpenBao)",
    "pkcs11": "PKCS#11 HSM (SoftHSM2)",
}


@dataclass
class Produced:
    """What the demo's producer sent."""

    records: int = 0
    tombstones: int = 0
    null_keys: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Report:
    """Everything the summary shows. `in_process` is `benchmarks.inprocess.InProcess`, or None
    where the benchmarks are not installed (a wheel without the source checkout)."""

    folder: Path
    topics: Topics
    provider: str
    format: str
    produced: Produced
    encrypt_stats: dict[str, Any] | None
    decrypt_stats: dict[str, Any] | None
    in_process: Any
    verification: Verification
    kept: bool = True
    wall_seconds: float = 0.0
    broker: str = "tansu"


_SOURCES = {
    "producer": "the demo's producer: records sent to the source topic and acknowledged "
    "(acks=all). Production starts once both workers hold their partitions and runs while "
    "they work.",
    "encrypt stats": "the encrypt worker's stats file, written as it exits. Throughput = "
    "records read / active seconds (first fetch to last acknowledgement); while records are "
    "still being produced it cannot exceed the producer's rate. Latency = wall clock when "
    "the output batch was acknowledged minus the record's timestamp, set by the producer.",
    "decrypt stats": "the decrypt worker's stats file, same definitions. The record "
    "timestamp passes through the encrypt worker unchanged, so this latency is end to end: "
    "source produce to decrypted write.",
    "in-process": "timed in a process of its own (benchmarks.inprocess) with the workers' "
    "settings, one call at a time: Encryptor.seal, then Decryptor.open, against the same "
    "service. The first call of each includes the service round trips for the DEK.",
    "read-back": "after the workers exited, the demo read every topic from the start: "
    "decrypted vs source as multisets of (key, value, headers); every encrypted value an "
    "envelope with no plaintext in it; overhead = mean encrypted minus plaintext size.",
}
_WRAP = 100


def render(report: Report) -> str:
    """The summary table (figure, source, value), then what each source means."""
    produced, check = report.produced, report.verification
    enc, dec = report.encrypt_stats or {}, report.decrypt_stats or {}
    timing = report.in_process
    overhead = check.overhead
    provider = _PROVIDERS.get(report.provider, report.provider)
    rows = [
        (
            "records",
            "producer",
            f"{produced.records:,} ({produced.null_keys:,} null keys, "
            f"{produced.tombstones:,} tombstones)",
        ),
        ("cryptography service", "dev.env", provider),
        ("wire format", "encrypt stats", report.format),
        ("producer rate", "producer", f"{produced.rate:,.0f} records/s"),
        ("encrypt worker throughput", "encrypt stats", _rate(enc)),
        ("decrypt worker throughput", "decrypt stats", _rate(dec)),
        ("latency produce→encrypted", "encrypt stats", _latency(enc)),
        ("latency produce→decrypted", "decrypt stats", _latency(dec)),
        ("seal, per record", "in-process", _micros(timing, "seal_us")),
        ("open, per record", "in-process", _micros(timing, "open_us")),
        ("KMS calls, encrypt worker", "encrypt stats", _calls(enc.get("kms_calls"))),
        ("KMS calls, decrypt worker", "decrypt stats", _calls(dec.get("kms_calls"))),
        ("KMS calls, in-process", "in-process", _calls(timing.kms_calls if timing else None)),
        ("DEK cache hit ratio, encrypt", "encrypt stats", _hit_ratio(enc.get("cache"))),
        ("DEK cache hit ratio, decrypt", "decrypt stats", _hit_ratio(dec.get("cache"))),
        (
            "envelope overhead",
            "read-back",
            "n/a" if overhead is None else f"{overhead:,.1f} B/record ({check.breakdown()})",
        ),
        ("DEKs used", "read-back", f"{len(check.dek_ids):,} (distinct dek_id in the topic)"),
        (
            "dead-lettered",
            "decrypt stats",
            f"{dec.get('dlq', 'n/a')} (read-back: the DLQ topic holds {check.dlq:,})",
        ),
        ("verification", "read-back", check.describe()),
    ]
    if report.format == "v2":
        rows.insert(
            -1,
            (
                "keys topic",
                "read-back",
                f"{check.keys_topic_headers:,} headers in {report.topics.keys}",
            ),
        )
    width = max(len(figure) for figure, _, _ in rows)
    source_width = max(len(name) for name in _SOURCES)
    lines = [
        "",
        f"envpipe demo: {produced.records:,} records through encrypt and decrypt workers, "
        f"{PARTITIONS} partitions, {_BROKERS.get(report.broker, report.broker)} + {provider}, "
        f"format {report.format}",
        f"topics: {' -> '.join(report.topics.all[:3])}, dead letters to {report.topics.dlq}",
        f"{os.cpu_count()} CPUs shared by the broker, the service, both workers and the "
        "demo's producer",
        "",
        f"  {'figure':<{width}}  {'source':<{source_width}}  value",
        f"  {'-' * width}  {'-' * source_width}  {'-' * 40}",
    ]
    lines += [f"  {fig:<{width}}  {src:<{source_width}}  {value}" for fig, src, value in rows]
    lines += ["", "sources:"]
    for name, text in _SOURCES.items():
        lines += textwrap.wrap(
            text,
            _WRAP,
            initial_indent=f"  {name:<{source_width}}  ",
            subsequent_indent=" " * (source_width + 4),
        )
    lines += [
        "",
        f"stats files and worker logs: {report.folder}"
        + (
            ""
            if report.kept
            else " (a temporary folder, removed at exit; keep it with --state-dir)"
        ),
        f"wall time: {report.wall_seconds:.1f} s (start services, run, verify, in-process stage)",
        "",
    ]
    return "\n".join(lines)


def _rate(stats: Mapping[str, Any]) -> str:
    if not stats:
        return "n/a (no stats file)"
    return (
        f"{stats['records_per_s']:,.0f} records/s ({stats['records_in']:,} records in "
        f"{stats['active_seconds']:.2f} s)"
    )


def _latency(stats: Mapping[str, Any]) -> str:
    latency = stats.get("latency_ms")
    if not latency:
        return "n/a"
    return "  ".join(f"{name} {_ms(latency.get(name))}" for name in ("p50", "p99", "p999"))


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} ms" if value < 10 else f"{value:,.0f} ms"


def _micros(timing: Any, which: str) -> str:
    if timing is None:
        return "n/a (the benchmarks are not installed: run from a source checkout)"
    if timing.error:
        return f"n/a ({timing.error.splitlines()[0]})"
    figures = getattr(timing, which)
    return (
        f"p50 {figures['p50']:,.1f} µs  p99 {figures['p99']:,.1f} µs  ({timing.records:,} records)"
    )


def _calls(calls: Mapping[str, int] | None) -> str:
    if calls is None:
        return "n/a"
    return ", ".join(f"{op} {n}" for op, n in sorted(calls.items())) or "none"


def _hit_ratio(cache: Mapping[str, int] | None) -> str:
    if not cache:
        return "n/a"
    hits, misses = cache.get("hit", 0), cache.get("miss", 0)
    if not hits + misses:
        return "n/a (no lookups)"
    return f"{hits / (hits + misses):.4%} (hit {hits:,}, miss {misses:,})"
