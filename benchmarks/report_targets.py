"""The targets a run is read against: issue 4's, and the compact-v2 / encrypt-CPU issue's goals.

Each is (what, what was measured, met?), with None where nothing could be measured. They are
goals to read a run against, never assertions: the test suite checks no timing.
"""

from __future__ import annotations

import math
from typing import Any

SIZES = ("256", "1024", "16384")
Target = tuple[str, str, bool | None]
#: the workers whose light-load p99 is compared with the passthrough's
LIGHT_IMPLS = ("envpipe_encrypt", "envpipe_encrypt_v2", "envpipe_decrypt", "envpipe_decrypt_v2")


def get(tree: Any, *path: str) -> float | None:
    """A number deep in the results, or None where a peer failed or nothing was measured."""
    for name in path:
        if not isinstance(tree, dict) or name not in tree:
            return None
        tree = tree[name]
    return float(tree) if isinstance(tree, int | float) and math.isfinite(tree) else None


def ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f} µs"


def fmt_ratio(value: float | None, context: str, suffix: str = "x") -> str:
    if value is None:
        return "n/a (not measured)"
    return f"{value:.2f}{suffix}" + (f" ({context})" if context else "")


def _verdict(value: float | None, ok: bool) -> bool | None:
    return None if value is None else ok


def goals(results: dict[str, Any]) -> list[Target]:
    """The compact-v2 and encrypt-CPU issue's goals, each with its measured value."""
    pipeline = results["pipeline"]
    rows: list[Target] = []
    overhead = get(results, "envelope_overhead_bytes_v2")
    rows.append(
        (
            "v2 envelope overhead ≤ 48 B (1 KiB value)",
            "n/a"
            if overhead is None
            else f"{overhead:g} B (v1: {results.get('envelope_overhead_bytes')} B)",
            _verdict(overhead, (overhead or 0) <= 48),
        )
    )
    base_cpu = get(pipeline, "passthrough", "cpu_us_per_record")
    for impl in ("envpipe_encrypt", "envpipe_encrypt_v2"):
        cpu = get(pipeline, impl, "cpu_us_per_record")
        added = None if cpu is None or base_cpu is None else cpu - base_cpu
        rows.append(
            (
                f"{impl} CPU per record ≤ passthrough + 2.5 µs",
                "n/a" if added is None else f"{added:+.2f} µs ({cpu:.2f} vs {base_cpu:.2f} µs)",
                _verdict(added, (added or 0) <= 2.5),
            )
        )
    base = get(pipeline, "passthrough", "records_per_s")
    for impl, goal in (
        ("envpipe_encrypt_v2", 0.85),
        ("envpipe_encrypt", 0.80),
        ("envpipe_decrypt", 0.85),
        ("envpipe_decrypt_v2", 0.85),
    ):
        rate = get(pipeline, impl, "records_per_s")
        value = ratio(rate, base)
        context = "" if rate is None or base is None else f"{rate:,.0f} vs {base:,.0f} records/s"
        rows.append(
            (
                f"{impl} throughput ≥ {goal:.2f}x passthrough",
                fmt_ratio(value, context),
                _verdict(value, (value or 0) >= goal),
            )
        )
    rows += [
        (name, shown, _verdict(added, (added or 0) <= 5)) for name, shown, added in _light(results)
    ]
    batch = results.get("crypto_batch", {})
    per = batch.get("us_per_record", {})
    times = get(batch, "seal_many_x_aead_only")
    rows.append(
        (
            "Encryptor.seal_many per record ≤ 2x aead_only (1 KiB, one batch call)",
            fmt_ratio(times, f"{us(get(per, 'envpipe'))} vs {us(get(per, 'aead_only'))}"),
            _verdict(times, (times or 0) <= 2),
        )
    )
    return rows


def _light(results: dict[str, Any]) -> list[tuple[str, str, float | None]]:
    """p99 added over the passthrough at an eighth of its rate (where nothing queues)."""
    pipeline = results["pipeline"]
    base = get(pipeline, "passthrough", "light_latency_ms", "p99")
    rows = []
    for impl in LIGHT_IMPLS:
        p99 = get(pipeline, impl, "light_latency_ms", "p99")
        added = None if p99 is None or base is None else p99 - base
        shown = "n/a" if added is None else f"{added:+.1f} ms ({p99:.1f} vs {base:.1f} ms)"
        rows.append((f"light-load p99 added over passthrough ≤ 5 ms ({impl})", shown, added))
    return rows


def light_load_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The light-load rows without a verdict, for beside issue 4's paced target."""
    return [(name, shown) for name, shown, _ in _light(results)]


def targets(results: dict[str, Any], details: dict[str, Any]) -> list[Target]:
    """(target, what was measured, met?) for every target of issue 4."""
    rows: list[Target] = []
    crypto, pipeline = results["crypto"], results["pipeline"]
    for size in SIZES:
        ours = get(crypto, "envpipe", size, "seal_us", "p50")
        floor = get(crypto, "floor", size, "seal_us", "p50")
        esdk = get(crypto, "aws_esdk", size, "seal_us", "p50")
        vs_floor, vs_esdk = ratio(ours, floor), ratio(esdk, ours)
        rows.append(
            (
                f"envpipe seal p50 ≤ 1.5x floor ({size} B)",
                fmt_ratio(vs_floor, f"{us(ours)} vs {us(floor)}"),
                _verdict(vs_floor, (vs_floor or 0) <= 1.5),
            )
        )
        rows.append(
            (
                f"envpipe seal p50 ≥ 20x faster than aws_esdk ({size} B)",
                fmt_ratio(vs_esdk, f"{us(esdk)} vs {us(ours)}", suffix="x faster"),
                _verdict(vs_esdk, (vs_esdk or 0) >= 20),
            )
        )
    encrypt = get(pipeline, "envpipe_encrypt", "records_per_s")
    for base, goal in (("passthrough", 0.80), ("passthrough_padded", 0.92)):
        value = ratio(encrypt, get(pipeline, base, "records_per_s"))
        rows.append(
            (
                f"envpipe_encrypt throughput ≥ {goal:.2f}x {base}",
                fmt_ratio(value, ""),
                _verdict(value, (value or 0) >= goal),
            )
        )
    value = ratio(encrypt, get(pipeline, "faust_encrypt", "records_per_s"))
    rows.append(
        (
            "envpipe_encrypt ≥ 8x faust_encrypt",
            fmt_ratio(value, ""),
            _verdict(value, (value or 0) >= 8),
        )
    )
    base_p99 = get(pipeline, "passthrough", "paced_latency_ms", "p99")
    for impl in ("envpipe_encrypt", "envpipe_decrypt"):
        p99 = get(pipeline, impl, "paced_latency_ms", "p99")
        added = None if p99 is None or base_p99 is None else p99 - base_p99
        rows.append(
            (
                f"paced p99 added over passthrough ≤ 5 ms ({impl})",
                "n/a" if added is None else f"{added:+.1f} ms ({p99:.1f} vs {base_p99:.1f} ms)",
                _verdict(added, (added or 0) <= 5),
            )
        )
    budget = details.get("kms_budget", {})
    per_dek = budget.get("calls_per_dek")
    rows.append(
        (
            "KMS calls ≤ 2 per DEK",
            "n/a" if per_dek is None else f"{per_dek:g} per DEK ({budget.get('deks')} DEKs)",
            None if per_dek is None else per_dek <= 2,
        )
    )
    per_million = get(results, "kms_calls_per_million_records")
    rows.append(
        (
            "KMS calls flat per million records (default limits)",
            "n/a"
            if per_million is None
            else f"{per_million:g} per million over {budget.get('records', 0):,} records",
            budget.get("flat"),
        )
    )
    return rows
