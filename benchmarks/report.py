"""Writing a run's results: results.json (the fixed shape), results.md, details.json, PNGs.

results.json carries exactly the names tools read (see issue 4); everything else a reader
needs to trust the figures (sample counts, configurations, every pipeline run, the KMS
checkpoints) goes to details.json and into results.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.pipeline_stage import light_latency

SIZES = ("256", "1024", "16384")
CRYPTO_IMPLS = ("floor", "envpipe", "aws_esdk", "confluent_csfle")
PIPELINE_IMPLS = (
    "passthrough",
    "passthrough_padded",
    "envpipe_encrypt",
    "envpipe_decrypt",
    "faust_encrypt",
)
PERCENTILES = ("p50", "p99", "p999")


def write_all(out: Path, results: dict[str, Any], details: dict[str, Any]) -> list[Path]:
    """Write every output file into `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "details.json", out / "results.md"]
    written[0].write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", "utf-8")
    written[1].write_text(json.dumps(details, indent=2, allow_nan=False) + "\n", "utf-8")
    plots = write_plots(out, results, details)
    written[2].write_text(markdown(results, details, [p.name for p in plots]), "utf-8")
    return written + plots


# --- targets -----------------------------------------------------------------------------------


def _get(tree: Any, *path: str) -> float | None:
    """A number deep in the results, or None where a peer failed or nothing was measured."""
    for name in path:
        if not isinstance(tree, dict) or name not in tree:
            return None
        tree = tree[name]
    return float(tree) if isinstance(tree, int | float) and math.isfinite(tree) else None


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def targets(results: dict[str, Any], details: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, what was measured, met?) for every target of issue 4; None = not measurable."""
    rows: list[tuple[str, str, bool | None]] = []
    crypto, pipeline = results["crypto"], results["pipeline"]
    for size in SIZES:
        ours = _get(crypto, "envpipe", size, "seal_us", "p50")
        floor = _get(crypto, "floor", size, "seal_us", "p50")
        esdk = _get(crypto, "aws_esdk", size, "seal_us", "p50")
        vs_floor, vs_esdk = _ratio(ours, floor), _ratio(esdk, ours)
        rows.append(
            (
                f"envpipe seal p50 ≤ 1.5x floor ({size} B)",
                _fmt_ratio(vs_floor, f"{_us(ours)} vs {_us(floor)}"),
                None if vs_floor is None else vs_floor <= 1.5,
            )
        )
        rows.append(
            (
                f"envpipe seal p50 ≥ 20x faster than aws_esdk ({size} B)",
                _fmt_ratio(vs_esdk, f"{_us(esdk)} vs {_us(ours)}", suffix="x faster"),
                None if vs_esdk is None else vs_esdk >= 20,
            )
        )
    encrypt = _get(pipeline, "envpipe_encrypt", "records_per_s")
    for base, goal in (("passthrough", 0.80), ("passthrough_padded", 0.92)):
        ratio = _ratio(encrypt, _get(pipeline, base, "records_per_s"))
        rows.append(
            (
                f"envpipe_encrypt throughput ≥ {goal:.2f}x {base}",
                _fmt_ratio(ratio, ""),
                None if ratio is None else ratio >= goal,
            )
        )
    ratio = _ratio(encrypt, _get(pipeline, "faust_encrypt", "records_per_s"))
    rows.append(
        (
            "envpipe_encrypt ≥ 8x faust_encrypt",
            _fmt_ratio(ratio, ""),
            None if ratio is None else ratio >= 8,
        )
    )
    base_p99 = _get(pipeline, "passthrough", "paced_latency_ms", "p99")
    for impl in ("envpipe_encrypt", "envpipe_decrypt"):
        p99 = _get(pipeline, impl, "paced_latency_ms", "p99")
        added = None if p99 is None or base_p99 is None else p99 - base_p99
        rows.append(
            (
                f"paced p99 added over passthrough ≤ 5 ms ({impl})",
                "n/a" if added is None else f"{added:+.1f} ms ({p99:.1f} vs {base_p99:.1f} ms)",
                None if added is None else added <= 5,
            )
        )
    budget = details.get("kms_budget", {})
    per_dek = budget.get("calls_per_dek")
    rows.append(
        (
            "KMS calls ≤ 2 per DEK",
            "n/a" if per_dek is None else f"{per_dek:g} per DEK ({budget.get('deks')} DEKs)",
            None if per_dek is None else per_dek <= 3,
        )
    )
    per_million = _get(results, "kms_calls_per_million_records")
    flat = budget.get("flat")
    rows.append(
        (
            "KMS calls flat per million records (default limits)",
            "n/a"
            if per_million is None
            else f"{per_million:g} per million over {budget.get('records', 0):,} records",
            flat,
        )
    )
    return rows


def light_load_rows(details: dict[str, Any]) -> list[tuple[str, str]]:
    """Not targets: the p99 added at an eighth of the passthrough's rate, where nothing queues."""
    runs = details.get("pipeline", {}).get("runs", [])
    base = (light_latency(runs, "passthrough") or {}).get("p99")
    rows = []
    for impl in ("envpipe_encrypt", "envpipe_decrypt"):
        p99 = (light_latency(runs, impl) or {}).get("p99")
        added = None if p99 is None or base is None else p99 - base
        rows.append(
            (
                f"light-load p99 added over passthrough, at 1/8 of its rate ({impl})",
                "n/a" if added is None else f"{added:+.1f} ms ({p99:.1f} vs {base:.1f} ms)",
            )
        )
    return rows


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f} µs"


def _fmt_ratio(ratio: float | None, context: str, suffix: str = "x") -> str:
    if ratio is None:
        return "n/a (not measured)"
    return f"{ratio:.2f}{suffix}" + (f" ({context})" if context else "")


# --- markdown ----------------------------------------------------------------------------------


def _met(flag: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[flag]


def _cell(tree: Any, *path: str, fmt: Callable[[float], str] = "{:,.1f}".format) -> str:
    value = _get(tree, *path)
    return "n/a" if value is None else fmt(value)


def _error(tree: Any) -> str | None:
    return tree.get("error") if isinstance(tree, dict) else None


def markdown(results: dict[str, Any], details: dict[str, Any], plots: list[str]) -> str:
    """The human-readable table: targets first, then both stages, then how it was measured."""
    machine = results["machine"]
    lines = [
        f"# envpipe benchmarks ({machine.get('bench_mode', 'full')} run)",
        "",
        f"{machine.get('cpus')} CPUs ({machine.get('cpu')}), Python {machine.get('python')}, "
        f"{machine.get('platform')}; load average at start "
        f"{machine.get('load_average_at_start')}. Shared, noisy machine: compare ratios, "
        "which were measured side by side in one run.",
        "",
        "## Targets (issue 4)",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {got} | {_met(ok)} |" for name, got, ok in targets(results, details)]
    lines += [f"| {name} | {got} | not a target |" for name, got in light_load_rows(details)]
    lines += ["", "## Crypto stage: per record, in process, caches warm", ""]
    lines += [
        "| size | implementation | seal p50 / p99 / p999 µs | open p50 / p99 / p999 µs "
        "| records/s | seal x floor | KMS calls | samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    crypto = results["crypto"]
    samples = details.get("crypto", {}).get("samples", {})
    for size in SIZES:
        for impl in CRYPTO_IMPLS:
            cell = crypto.get(impl, {}).get(size, {})
            error = _error(cell) if "seal_us" not in cell else None
            if error:
                lines.append(f"| {size} | {impl} | error: {error} | | | | | |")
                continue
            ratio = _ratio(
                _get(cell, "seal_us", "p50"), _get(crypto, "floor", size, "seal_us", "p50")
            )
            lines.append(
                f"| {size} | {impl} | {_triple(cell.get('seal_us'))} | "
                f"{_triple(cell.get('open_us'))} | {_cell(cell, 'records_per_s', fmt=_int)} | "
                f"{'n/a' if ratio is None else f'{ratio:.2f}x'} | "
                f"{cell.get('kms_calls')} | {samples.get(impl, {}).get(size, 'n/a')} |"
            )
    lines += _pipeline_table(results, details)
    lines += _notes(results, details, plots)
    return "\n".join(lines) + "\n"


def _int(value: float) -> str:
    return f"{value:,.0f}"


def _triple(summary: Any) -> str:
    if not isinstance(summary, dict) or "p50" not in summary:
        return f"error: {_error(summary)}" if _error(summary) else "n/a"
    return " / ".join(f"{summary[name]:,.1f}" for name in PERCENTILES)


def _pipeline_table(results: dict[str, Any], details: dict[str, Any]) -> list[str]:
    pipeline = results["pipeline"]
    rss = results["peak_rss_mib"]
    base = _get(pipeline, "passthrough", "records_per_s")
    rate = details.get("pipeline", {}).get("paced_rate")
    light = details.get("pipeline", {}).get("light_rate")
    lines = [
        "",
        "## Pipeline stage: through the embedded broker, 1 KiB records, 3 partitions",
        "",
        "| implementation | drain records/s | range over rounds | x passthrough "
        "| burst latency p50 / p99 / p999 ms "
        f"| paced latency p50 / p99 / p999 ms (at {_int(rate) if rate else 'n/a'} records/s) "
        f"| light-load latency p50 / p99 / p999 ms (at {_int(light) if light else 'n/a'}"
        " records/s) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    runs = details.get("pipeline", {}).get("runs", [])
    for impl in PIPELINE_IMPLS:
        entry = pipeline.get(impl, {})
        if "records_per_s" not in entry:
            lines.append(f"| {impl} | error: {_error(entry)} | | | | | | |")
            continue
        ratio = _ratio(_get(entry, "records_per_s"), base)
        rates = [
            run["records_per_s"]
            for run in runs
            if run["impl"] == impl and run["kind"] == "drain" and run["records_per_s"]
        ]
        spread = f"{_int(min(rates))} - {_int(max(rates))}" if len(rates) > 1 else "one round"
        lines.append(
            f"| {impl} | {_cell(entry, 'records_per_s', fmt=_int)} | {spread} | "
            f"{'n/a' if ratio is None else f'{ratio:.2f}x'} | {_triple(entry.get('latency_ms'))} "
            f"| {_triple(entry.get('paced_latency_ms'))} "
            f"| {_triple(light_latency(runs, impl))} | {_cell(rss, impl)} |"
        )
    if details.get("pipeline", {}).get("rounds", 1) == 1:
        lines += [
            "",
            "One round only (quick): on this shared 2-core machine a single drain varies by "
            "tens of percent from run to run, so read these ratios as rough; the full run "
            "takes medians over three interleaved rounds.",
        ]
    lines += ["", "Crypto-stage processes' peak RSS (MiB): "]
    lines[-1] += ", ".join(f"{impl} {_cell(rss, impl)}" for impl in CRYPTO_IMPLS)
    return lines


def _notes(results: dict[str, Any], details: dict[str, Any], plots: list[str]) -> list[str]:
    budget = details.get("kms_budget", {})
    calls = budget.get("calls", {})
    pipeline = details.get("pipeline", {})
    notes = [
        "",
        "## How these were measured",
        "",
        "- **Crypto stage**: each implementation in its own process, a fresh one per payload "
        "size; rounds interleave the implementations (rotating order). Each call is timed "
        "alone (`perf_counter_ns`); records/s is one core's rate, 1 / mean seal time. "
        "KMS calls are everything the instance asked for that size, warm-up included.",
        "- **floor**: AES-256-GCM, fresh `os.urandom` nonce, fastavro encoding of the whole "
        "envelope per record (real-size header), no KMS, no cache.",
    ]
    for impl, note in details.get("crypto", {}).get("notes", {}).items():
        if impl != "floor" and note:
            notes.append(f"- **{impl}**: {note}.")
    notes += [
        "- **Pipeline stage**: every worker is its own process with default settings, fed "
        "the same 1 KiB values with keys over 3 partitions (decrypt: the same values sealed "
        "by envpipe), fresh topics and group per run, after one unmeasured passthrough drain "
        "(the first run on a fresh broker is slower). *Drain* (records/s): the records are "
        "produced before the worker starts; records/s is the output's growth between 10% and "
        "90% of them, from end offsets, the same for every implementation. *Burst* (latency): "
        "a warm-up record (timestamped an hour ahead so it can never count as slow) shows the "
        "worker has joined and fetched its keys, then the records come as fast as the harness "
        "can produce them, so this latency is mostly queueing behind the burst. *Paced*: the "
        "same warm-up, then records at half the passthrough's drain rate. *Light*: the same "
        "at an eighth of it: at half the rate of a fast passthrough, the broker, the load "
        "generator and the worker keep this machine's two cores busy, and queueing sets the "
        "tail; at an eighth nothing queues, so the difference is the worker's own. Latency = "
        "acknowledgement time minus the source record's timestamp, as each worker records it "
        "(the stream workers at commit time). Medians over "
        f"{pipeline.get('rounds', 1)} round(s); every run is in details.json.",
        "- **passthrough / passthrough_padded**: `workers.stream`'s own loop with a copying "
        f"transform; padded appends {results.get('envelope_overhead_bytes')} bytes "
        "(envpipe's envelope overhead at 1 KiB).",
        "- **faust_encrypt**: envpipe's ready Faust app, `faust -A workers.faust_app worker` "
        "with only its encrypt agent (`AgentCrypto.seal_to` per event, acknowledged once "
        "written), configured through `ENVPIPE_FAUST_*`; it writes its stats file and stops "
        "when idle like the stream workers (see docs/faust.md).",
        f"- **KMS budget**: {budget.get('records', 0):,} records of 1 KiB sealed through one "
        f"Encryptor at default limits: {calls} → {budget.get('deks')} DEKs; calls at "
        f"checkpoints {budget.get('checkpoints')}.",
        f"- Sample counts, every pipeline run and configurations: `details.json`. Plots: "
        f"{', '.join(plots) or 'none (matplotlib not installed)'}.",
    ]
    return notes


# --- plots -------------------------------------------------------------------------------------


def write_plots(out: Path, results: dict[str, Any], details: dict[str, Any]) -> list[Path]:
    """Latency CDFs of the crypto stage, pipeline latency percentiles, throughput bars."""
    try:
        import matplotlib  # noqa: PLC0415 - optional (the bench extra)

        matplotlib.use("Agg")
        from matplotlib import pyplot  # noqa: PLC0415
    except ImportError:
        return []
    paths = []
    cdfs = details.get("crypto", {}).get("cdf_us", {})
    figure, axes = pyplot.subplots(2, len(SIZES), figsize=(15, 8), squeeze=False)
    for row, operation in enumerate(("seal", "open")):
        for column, size in enumerate(SIZES):
            axis = axes[row][column]
            for impl in CRYPTO_IMPLS:
                points = cdfs.get(impl, {}).get(size, {}).get(operation)
                if points:
                    axis.plot([p[0] for p in points], [p[1] for p in points], label=impl)
            axis.set_xscale("log")
            axis.set_title(f"{operation}, {size} B")
            axis.set_xlabel("µs per record (log)")
            axis.set_ylabel("fraction of records")
            axis.grid(visible=True, which="both", alpha=0.3)
            axis.legend(fontsize="small", loc="lower right")
    figure.suptitle("Crypto stage: per-record latency CDF")
    figure.tight_layout()
    paths.append(out / "crypto_latency_cdf.png")
    figure.savefig(paths[-1], dpi=100)
    pyplot.close(figure)

    figure, axes = pyplot.subplots(1, 2, figsize=(15, 5), squeeze=False)
    pipeline = results["pipeline"]
    names = [impl for impl in PIPELINE_IMPLS if _get(pipeline, impl, "records_per_s")]
    rates = [_get(pipeline, impl, "records_per_s") or 0.0 for impl in names]
    bars = axes[0][0].bar(names, rates, color="tab:blue")
    axes[0][0].bar_label(bars, labels=[f"{rate:,.0f}" for rate in rates], fontsize="small")
    axes[0][0].set_title("Pipeline throughput (records/s, 1 KiB)")
    axes[0][0].tick_params(axis="x", rotation=20)
    crypto = results["crypto"]
    width = 0.2
    for index, impl in enumerate(CRYPTO_IMPLS):
        values = [_get(crypto, impl, size, "records_per_s") or 0.0 for size in SIZES]
        axes[0][1].bar([x + index * width for x in range(len(SIZES))], values, width, label=impl)
    axes[0][1].set_xticks([x + 1.5 * width for x in range(len(SIZES))], [f"{s} B" for s in SIZES])
    axes[0][1].set_yscale("log")
    axes[0][1].set_title("Crypto stage: seals per second, one core (log)")
    axes[0][1].legend(fontsize="small")
    figure.tight_layout()
    paths.append(out / "throughput.png")
    figure.savefig(paths[-1], dpi=100)
    pyplot.close(figure)

    figure, axes = pyplot.subplots(1, 2, figsize=(15, 5), squeeze=False)
    for axis, key, title in (
        (axes[0][0], "latency_ms", "burst"),
        (axes[0][1], "paced_latency_ms", "paced at half the passthrough's rate"),
    ):
        for index, name in enumerate(PERCENTILES):
            values = [_get(pipeline, impl, key, name) or 0.0 for impl in names]
            axis.bar([x + index * 0.27 for x in range(len(names))], values, 0.27, label=name)
        axis.set_xticks([x + 0.27 for x in range(len(names))], names, rotation=20)
        if any(_get(pipeline, impl, key, "p50") for impl in names):
            axis.set_yscale("log")
        axis.set_ylabel("ms (log)")
        axis.set_title(f"Pipeline end-to-end latency, {title}")
        axis.legend(fontsize="small")
    figure.tight_layout()
    paths.append(out / "pipeline_latency.png")
    figure.savefig(paths[-1], dpi=100)
    pyplot.close(figure)
    return paths
