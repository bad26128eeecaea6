"""Writing a run's results: results.json, details.json, results.md and the PNG plots.

results.json carries the names tools read (`benchmarks.assemble`); results.md puts the
targets first (`benchmarks.report_targets`), then every table (`benchmarks.report_tables`),
then how each figure was measured. The plots are `benchmarks.report_plots`'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import report_tables as tables
from benchmarks.report_plots import write_plots
from benchmarks.report_targets import Target, goals, targets


def write_all(out: Path, results: dict[str, Any], details: dict[str, Any]) -> list[Path]:
    """Write every output file into `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "details.json", out / "results.md"]
    written[0].write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", "utf-8")
    written[1].write_text(json.dumps(details, indent=2, allow_nan=False) + "\n", "utf-8")
    plots = write_plots(out, results, details)
    written[2].write_text(markdown(results, details, [p.name for p in plots]), "utf-8")
    return written + plots


def _met(flag: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[flag]


def _target_table(title: str, rows: list[Target]) -> list[str]:
    lines = ["", f"## {title}", "", "| target | measured | |", "|---|---|---|"]
    return lines + [f"| {name} | {got} | {_met(ok)} |" for name, got, ok in rows]


def markdown(results: dict[str, Any], details: dict[str, Any], plots: list[str]) -> str:
    """The human-readable report: targets first, then every stage, then how it was measured."""
    machine = results["machine"]
    lines = [
        f"# envpipe benchmarks ({machine.get('bench_mode', 'full')} run)",
        "",
        f"{machine.get('cpus')} CPUs ({machine.get('cpu')}), Python {machine.get('python')}, "
        f"{machine.get('platform')}; load average at start "
        f"{machine.get('load_average_at_start')}; {machine.get('seconds', 'n/a')} s in all. "
        "Shared, noisy machine: compare ratios, which were measured side by side in one run.",
    ]
    lines += _target_table(
        "Targets (compact v2 and the encrypt worker's CPU; goals, not assertions)",
        goals(results),
    )
    lines += _target_table("Targets (issue 4)", targets(results, details))
    lines += tables.crypto_table(results, details)
    lines += [
        "",
        "## Pipeline stage: through the embedded broker (Tansu), 1 KiB records, 3 partitions",
        "",
    ]
    lines += tables.pipeline_table(results, details)
    if details.get("pipeline", {}).get("rounds", 1) == 1:
        lines += [
            "",
            "One round only (quick): on this shared 2-core machine a single drain varies by "
            "tens of percent from run to run, so read these ratios as rough; the full run "
            "takes medians over three interleaved rounds.",
        ]
    rss = results["peak_rss_mib"]
    lines += ["", "Crypto-stage processes' peak RSS (MiB): "]
    lines[-1] += ", ".join(f"{impl} {tables.cell(rss, impl)}" for impl in tables.CRYPTO_IMPLS)
    lines += tables.overhead_table(results)
    lines += tables.codec_table(results)
    lines += tables.trade_table(results)
    lines += tables.provider_table(results)
    lines += tables.kafka_section(results, details)
    lines += _notes(results, details, plots)
    return "\n".join(lines) + "\n"


def _notes(results: dict[str, Any], details: dict[str, Any], plots: list[str]) -> list[str]:
    budget = details.get("kms_budget", {})
    pipeline = details.get("pipeline", {})
    notes = [
        "",
        "## How these were measured",
        "",
        "- **Crypto stage**: each implementation in its own process, a fresh one per payload "
        "size; rounds interleave the implementations (rotating order). Each call is timed "
        "alone (`perf_counter_ns`); records/s is one core's rate, 1 / mean seal time. "
        "KMS calls are everything the instance asked for that size, warm-up included. The "
        "batch figures time one call over a whole worker-sized batch (no clock per record): "
        "`Encryptor.seal_many` for envpipe, a list comprehension of `AESGCM.encrypt` for "
        "aead_only.",
        "- **aead_only**: `AESGCM.encrypt` with one precomputed nonce and AAD, no framing: the "
        "limit of any Python sealer. **floor**: AES-256-GCM, fresh `os.urandom` nonce, fastavro "
        "encoding of the whole envelope per record (real-size header), no KMS, no cache.",
    ]
    for impl, note in details.get("crypto", {}).get("notes", {}).items():
        if impl not in ("floor", "aead_only") and note:
            notes.append(f"- **{impl}**: {note}.")
    notes += [
        "- **Pipeline stage**: every worker is its own process with default settings, fed "
        "the same 1 KiB random values with keys over 3 partitions (decrypt: the same values "
        "sealed by envpipe in v1 or v2, the v2 headers put in the source's keys topic first), "
        "fresh topics and group per run, after one unmeasured passthrough drain. *Drain*: the "
        "records are produced before the worker starts; records/s is the output's growth "
        "between 10% and 90% of them, from end offsets; CPU µs/record is the worker's stats "
        "file's `cpu_seconds / records_in` (process CPU from its first fetch to its last "
        "acknowledgement). *Burst*: after a warm-up record (timestamped an hour ahead) shows "
        "the worker is up, the records come as fast as the harness can produce them, so this "
        "latency is mostly queueing. *Paced*: records at half the passthrough's drain rate. "
        "*Light*: at an eighth of it, where nothing queues, so the difference is the worker's "
        "own. Latency = acknowledgement time minus the source record's timestamp, as each "
        f"worker records it. Medians over {pipeline.get('rounds', 1)} round(s) "
        "(burst and paced may have fewer); every run is in details.json.",
        "- **passthrough / passthrough_padded**: `workers.stream`'s own loop with a copying "
        f"transform; padded appends {results.get('envelope_overhead_bytes')} bytes "
        "(envpipe's v1 envelope overhead at 1 KiB).",
        "- **faust_encrypt**: envpipe's ready Faust app, `faust -A workers.faust_app worker` "
        "with only its encrypt agent, configured through `ENVPIPE_FAUST_*`.",
        "- **Compression**: a fresh embedded broker advertising a `KafkaProxy` in front of it; "
        "each worker's Produce requests are counted by client id (request and batch framing, "
        "and v2's keys topic, included) and divided by the records it wrote. The proxy runs "
        "in the harness, so rates there are lower than in the pipeline stage: compare within "
        "the table. The JSON compression ratios come from aiokafka's own batch builder.",
        "- **Cryptography services**: each provider on its own broker (`dev.up(kms=...)`); "
        "latency timed call by call in a child process (SoftHSM2 reads one configuration per "
        "process); calls per DEK counted while an Encryptor seals through ten DEKs of 1,000 "
        "records; the encrypt worker's drains interleave over the providers.",
        f"- **KMS budget**: {budget.get('records', 0):,} records of 1 KiB sealed through one "
        f"Encryptor at default limits: {budget.get('calls', {})} → {budget.get('deks')} DEKs; "
        f"calls at checkpoints {budget.get('checkpoints')}.",
        f"- Sample counts, every run and configurations: `details.json`. Plots: "
        f"{', '.join(plots) or 'none (matplotlib not installed)'}.",
    ]
    return notes
