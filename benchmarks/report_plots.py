"""The PNG plots of a run: crypto latency CDFs, throughput bars, pipeline latency bars.

matplotlib comes from the optional `bench` extra; without it no plot is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.report_tables import CRYPTO_IMPLS, PERCENTILES, PIPELINE_IMPLS
from benchmarks.report_targets import SIZES, get


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
    names = [impl for impl in PIPELINE_IMPLS if get(pipeline, impl, "records_per_s")]
    rates = [get(pipeline, impl, "records_per_s") or 0.0 for impl in names]
    bars = axes[0][0].bar(names, rates, color="tab:blue")
    axes[0][0].bar_label(bars, labels=[f"{rate:,.0f}" for rate in rates], fontsize="small")
    axes[0][0].set_title("Pipeline throughput (records/s, 1 KiB)")
    axes[0][0].tick_params(axis="x", rotation=20)
    crypto = results["crypto"]
    width = 0.8 / len(CRYPTO_IMPLS)
    for index, impl in enumerate(CRYPTO_IMPLS):
        values = [get(crypto, impl, size, "records_per_s") or 0.0 for size in SIZES]
        axes[0][1].bar([x + index * width for x in range(len(SIZES))], values, width, label=impl)
    middle = (len(CRYPTO_IMPLS) - 1) / 2 * width
    axes[0][1].set_xticks([x + middle for x in range(len(SIZES))], [f"{s} B" for s in SIZES])
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
            values = [get(pipeline, impl, key, name) or 0.0 for impl in names]
            axis.bar([x + index * 0.27 for x in range(len(names))], values, 0.27, label=name)
        axis.set_xticks([x + 0.27 for x in range(len(names))], names, rotation=20)
        if any(get(pipeline, impl, key, "p50") for impl in names):
            axis.set_yscale("log")
        axis.set_ylabel("ms (log)")
        axis.set_title(f"Pipeline end-to-end latency, {title}")
        axis.legend(fontsize="small")
    figure.tight_layout()
    paths.append(out / "pipeline_latency.png")
    figure.savefig(paths[-1], dpi=100)
    pyplot.close(figure)
    return paths
