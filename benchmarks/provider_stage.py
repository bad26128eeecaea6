"""Stage 4: the three cryptography services side by side: their latency, and the worker's rate.

For each provider (`aws` on moto, `vault` on OpenBao, `pkcs11` on SoftHSM2) a broker and the
service are started with `dev.up(..., kms=provider)`, all three at once, so the encrypt
worker's drains can interleave over the providers in rounds. The service's own latency (wrap,
unwrap, sign) and its calls per DEK come from `benchmarks.provider_probe`, run as a child
process per provider (SoftHSM2 reads its configuration once per process). The worker's
throughput should not depend on the provider: the service is asked once per DEK, in the
background, never per record.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.envelopes import random_pairs
from benchmarks.load import open_producer
from benchmarks.measure import Progress, median
from benchmarks.services import REPO_ROOT, child_environ
from benchmarks.worker_run import Inputs, RunResult, WorkerRunner
from pipeline.errors import EnvpipeError
from workers import dev, supervisor

PROVIDERS = ("aws", "vault", "pkcs11")
_PROBE_TIMEOUT = 300.0
#: throughput this close to the aws row's counts as the same, on this noisy machine
_SAME_WITHIN = 0.10


@dataclass(frozen=True)
class ProviderPlan:
    """Calls per timed operation, records per drain, rounds, the workers' idle stop."""

    calls: int
    records: int
    rounds: int
    idle_seconds: float


@dataclass
class ProviderResults:
    """results.json's `providers`, and every drain for details.json."""

    results: dict[str, Any]
    runs: list[RunResult]


@contextlib.contextmanager
def _all_services(progress: Progress) -> Iterator[dict[str, dev.DevEnv | str]]:
    """Each provider's services, or why they could not start; all stopped afterwards."""
    root = Path(tempfile.mkdtemp(prefix="envpipe-bench-providers-"))
    started: dict[str, dev.DevEnv | str] = {}
    try:
        for provider in PROVIDERS:
            try:
                started[provider] = dev.up(root / provider, kms=provider)
            except EnvpipeError as exc:
                started[provider] = f"could not start: {exc}"
                progress(f"providers: {provider}: {started[provider]}")
        yield started
    finally:
        for provider, env in started.items():
            if isinstance(env, dev.DevEnv):
                dev.down(root / provider)
        shutil.rmtree(root, ignore_errors=True)


def _probe(env: dev.DevEnv, plan: ProviderPlan, workdir: Path) -> dict[str, Any]:
    """The provider's latency and calls per DEK, from `benchmarks.provider_probe`."""
    out, log = workdir / f"probe-{env.provider}.json", workdir / f"probe-{env.provider}.log"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.provider_probe"]
    command += ["--calls", str(plan.calls), "--out", str(out)]
    child = supervisor.Child.spawn(
        command, name="the provider probe", log=log, env=child_environ(env), cwd=REPO_ROOT
    )
    code = child.wait_sync(_PROBE_TIMEOUT)
    if code is None:
        child.stop_sync()
    if code != 0 or not out.is_file():
        return {"error": f"the probe failed (exit {code}): {child.tail(3)}"}
    figures: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return figures


async def run_provider_stage(
    plan: ProviderPlan, workdir: Path, progress: Progress
) -> ProviderResults:
    """Probe every provider, then drain the encrypt worker against each, in rounds."""
    results: dict[str, Any] = {}
    runs: list[RunResult] = []
    with _all_services(progress) as started:
        envs = {name: env for name, env in started.items() if isinstance(env, dev.DevEnv)}
        for name, env in started.items():
            if isinstance(env, str):
                results[name] = {"error": env}
                continue
            results[name] = _probe(env, plan, workdir)
            progress(f"providers: {name}: {_probe_line(results[name])}")
        runs = await _drains(envs, plan, workdir, progress)
    for name, entry in results.items():
        if "error" not in entry:
            entry.update(_worker_figures([run for run in runs if run.variant == name]))
    _compare(results)
    return ProviderResults(results, runs)


async def _drains(
    envs: dict[str, dev.DevEnv], plan: ProviderPlan, workdir: Path, progress: Progress
) -> list[RunResult]:
    """The encrypt worker's drains, the providers interleaved over rounds (rotating order)."""
    inputs = Inputs(random_pairs())
    runners: dict[str, WorkerRunner] = {}
    producers = []
    try:
        for name, env in envs.items():
            producer = await open_producer(env.bootstrap_servers)
            producers.append(producer)
            runners[name] = WorkerRunner(
                env,
                inputs,
                workdir,
                progress,
                producer=producer,
                idle_seconds=plan.idle_seconds,
                prefix=f"providers-{name}",
            )
        names = list(runners)
        runs: list[RunResult] = []
        for round_index in range(plan.rounds if names else 0):
            shift = round_index % len(names)
            label = f"providers round {round_index + 1}/{plan.rounds}"
            for name in names[shift:] + names[:shift]:
                runs.append(
                    await runners[name].run(
                        "envpipe_encrypt", "drain", plan.records, label=label, variant=name
                    )
                )
    finally:
        for producer in producers:
            await producer.stop()
    return runs


def _worker_figures(runs: Sequence[RunResult]) -> dict[str, Any]:
    good = [run for run in runs if run.error is None and run.records_per_s]
    if not good:
        why = "; ".join(sorted({run.error or "no rate" for run in runs})) or "did not run"
        return {"encrypt_records_per_s": {"error": why}}
    cpu = [run.cpu_us_per_record for run in good if run.cpu_us_per_record is not None]
    return {
        "encrypt_records_per_s": round(median([run.records_per_s or 0.0 for run in good]), 1),
        "encrypt_cpu_us_per_record": round(median(cpu), 2) if cpu else None,
        "kms_calls_in_drain": median(
            [sum(run.stats.get("kms_calls", {}).values()) for run in good]
        ),
    }


def _compare(results: dict[str, Any]) -> None:
    """Each provider's worker rate over aws's, and whether it is the same within noise."""
    base = results.get("aws", {}).get("encrypt_records_per_s")
    for entry in results.values():
        rate = entry.get("encrypt_records_per_s")
        if isinstance(rate, int | float) and isinstance(base, int | float) and base:
            entry["encrypt_x_aws"] = round(rate / base, 3)
            entry["same_as_aws"] = abs(rate / base - 1) <= _SAME_WITHIN


def _probe_line(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"FAILED: {entry['error']}"
    parts = [
        f"{op} p50 {entry[f'{op}_ms']['p50']:.2f} p99 {entry[f'{op}_ms']['p99']:.2f} ms"
        for op in ("wrap", "unwrap", "sign")
    ]
    return ", ".join(parts) + f"; {entry['calls_per_dek']} calls per DEK"
