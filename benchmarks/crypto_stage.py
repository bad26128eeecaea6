"""Stage 1: per-record seal/open latency in process, caches warm, implementations side by side.

Each implementation lives in its own process (so its imports, threads and memory are its
own, and its peak RSS is measurable), driven over a pipe by the parent. The parent runs them
one at a time and interleaves them in rounds (the order rotates each round), so a noisy
moment on this shared machine hits every implementation rather than one. Within a round an
implementation seals records for up to a time budget, then opens exactly what it sealed and
checks each plaintext; every call is timed on its own with `perf_counter_ns`.

A fresh instance is built for every payload size, so `kms_calls` counts everything that
instance needed, warm-up included: the DEK fetch, the header signature, the unwrap.
"""

from __future__ import annotations

import array
import contextlib
import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from benchmarks.crypto_child import child_main
from benchmarks.crypto_impls import ImplContext
from benchmarks.measure import Progress, cdf_points, median, percentiles

IMPLS = ("aead_only", "floor", "envpipe", "aws_esdk", "confluent_csfle")
SIZES = (256, 1024, 16384)
#: the payload size whose whole-batch seal is timed too (`seal_batch`, a worker's batch)
BATCH_SIZE = 1024
_CHILD_START_TIMEOUT = 120.0
_CHILD_RUN_TIMEOUT = 300.0


@dataclass(frozen=True)
class CryptoPlan:
    """How much to measure: rounds, and per round a time budget and a record cap per run."""

    rounds: int
    budget_seconds: float
    max_records: int
    warmup_records: int
    #: records per timed `seal_batch` call, and calls per round
    batch_records: int = 2000
    batch_repeats: int = 10


# --- the parent -------------------------------------------------------------------------------


@dataclass
class _Cell:
    """What one implementation measured at one payload size, over all rounds."""

    seal_ns: list[int] = field(default_factory=list)
    open_ns: list[int] = field(default_factory=list)
    count: int = 0
    envelope_bytes: int = 0
    kms_calls: int = 0
    #: per round, the median µs per record of a whole `seal_batch` call (BATCH_SIZE only)
    batch_us: list[float] = field(default_factory=list)
    error: str | None = None


class _Remote:
    """The parent's handle on one implementation process."""

    def __init__(
        self,
        name: str,
        environ: dict[str, str],
        context: ImplContext,
        mp: multiprocessing.context.SpawnContext,
    ) -> None:
        self.name = name
        self.note = ""
        self.peak_rss_mib: float | None = None
        self._conn, child_conn = mp.Pipe()
        self._process = mp.Process(
            target=child_main, args=(name, environ, context, child_conn), name=f"bench-{name}"
        )
        self._process.start()
        child_conn.close()

    def call(self, timeout: float, *message: object) -> Any:
        """Send a command and wait for its answer; a dead or stuck child raises."""
        self._conn.send(message)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"{self.name} did not answer {message[0]!r} in {timeout:g}s")
        status, payload = self._conn.recv()
        if status != "ok":
            raise RuntimeError(str(payload))
        return payload

    def close(self) -> None:
        """Ask for the peak RSS and let the child exit; terminate it if it will not."""
        with contextlib.suppress(Exception):
            self.peak_rss_mib = cast(float | None, self.call(30.0, "exit"))
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


_REMOTE_ERRORS = (RuntimeError, TimeoutError, EOFError, OSError)


@dataclass
class CryptoResults:
    """The stage's figures for results.json, plus what the report shows beside them."""

    results: dict[str, Any]
    details: dict[str, Any]
    peak_rss_mib: dict[str, float | None]
    #: results.json's `crypto_batch`: µs per record of one batch call, by implementation
    batch: dict[str, Any] = field(default_factory=dict)


def run_crypto_stage(
    environ: dict[str, str],
    context: ImplContext,
    plan: CryptoPlan,
    progress: Progress,
    *,
    impls: Sequence[str] = IMPLS,
    sizes: Sequence[int] = SIZES,
) -> CryptoResults:
    """Measure every implementation at every size, a fresh process per (implementation, size).

    Fresh processes keep one size's warm caches (and the peers' process-wide registries) out
    of the next size's KMS counts.
    """
    mp = multiprocessing.get_context("spawn")
    cells: dict[str, dict[int, _Cell]] = {name: {} for name in impls}
    notes: dict[str, str] = {}
    peak: dict[str, float | None] = dict.fromkeys(impls)
    for size in sizes:
        remotes = [_Remote(name, environ, context, mp) for name in impls]
        try:
            _measure_size(remotes, cells, size, plan, progress)
        finally:
            for remote in remotes:
                remote.close()
                notes[remote.name] = notes.get(remote.name) or remote.note
                if remote.peak_rss_mib is not None:
                    peak[remote.name] = max(peak[remote.name] or 0.0, remote.peak_rss_mib)
    details = {
        "plan": plan.__dict__,
        "notes": notes,
        "samples": {
            name: {str(size): cell.count for size, cell in by_size.items()}
            for name, by_size in cells.items()
        },
        "envelope_bytes": {
            name: {
                str(size): round(cell.envelope_bytes / cell.count, 1)
                for size, cell in by_size.items()
                if cell.count
            }
            for name, by_size in cells.items()
        },
        "cdf_us": {
            name: {
                str(size): {
                    "seal": cdf_points([ns / 1000 for ns in cell.seal_ns]),
                    "open": cdf_points([ns / 1000 for ns in cell.open_ns]),
                }
                for size, cell in by_size.items()
                if cell.error is None and cell.count
            }
            for name, by_size in cells.items()
        },
    }
    results = {name: _results_of(cells[name]) for name in impls}
    return CryptoResults(results, details, peak, _batch_of(cells, plan))


def _measure_size(
    remotes: list[_Remote],
    cells: dict[str, dict[int, _Cell]],
    size: int,
    plan: CryptoPlan,
    progress: Progress,
) -> None:
    for remote in remotes:
        cell = cells[remote.name][size] = _Cell()
        try:
            remote.note = remote.call(_CHILD_START_TIMEOUT, "start", size, plan.warmup_records)
        except _REMOTE_ERRORS as exc:
            cell.error = f"could not start: {exc}"
            progress(f"crypto {remote.name} {size} B: {cell.error}")
    for round_index in range(plan.rounds):
        shift = round_index % len(remotes)
        for remote in remotes[shift:] + remotes[:shift]:
            cell = cells[remote.name][size]
            if cell.error is not None:
                continue
            try:
                run = remote.call(_CHILD_RUN_TIMEOUT, "run", plan.budget_seconds, plan.max_records)
            except _REMOTE_ERRORS as exc:
                cell.error = f"failed while measuring: {exc}"
                progress(f"crypto {remote.name} {size} B: {cell.error}")
                continue
            if size == BATCH_SIZE:
                try:
                    batch = remote.call(
                        _CHILD_RUN_TIMEOUT, "batch", plan.batch_records, plan.batch_repeats
                    )
                except _REMOTE_ERRORS as exc:
                    progress(f"crypto {remote.name} {size} B: batch timing failed: {exc}")
                    batch = None
                if batch is not None:
                    cell.batch_us.append(batch)
            cell.seal_ns.extend(array.array("q", run["seal_ns"]))
            cell.open_ns.extend(array.array("q", run["open_ns"]))
            cell.count += run["count"]
            cell.envelope_bytes += run["envelope_bytes"]
        progress(f"crypto {size:>5} B: round {round_index + 1}/{plan.rounds} done")
    for remote in remotes:
        cell = cells[remote.name][size]
        if cell.error is not None:
            continue
        try:
            cell.kms_calls = remote.call(_CHILD_START_TIMEOUT, "stop")
        except _REMOTE_ERRORS as exc:
            cell.error = f"failed to stop: {exc}"


def _results_of(by_size: dict[int, _Cell]) -> dict[str, Any]:
    """results.json's cells; records/s is one core's rate, 1 / mean seal time."""
    out: dict[str, Any] = {}
    for size, cell in by_size.items():
        if cell.error is not None or not cell.count:
            out[str(size)] = {"error": cell.error or "no records measured"}
            continue
        out[str(size)] = {
            "seal_us": _rounded(percentiles([ns / 1000 for ns in cell.seal_ns])),
            "open_us": _rounded(percentiles([ns / 1000 for ns in cell.open_ns])),
            "records_per_s": round(cell.count * 1e9 / sum(cell.seal_ns), 1),
            "kms_calls": cell.kms_calls,
        }
    return out


def _rounded(summary: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 2) for name, value in summary.items()}


def _batch_of(cells: dict[str, dict[int, _Cell]], plan: CryptoPlan) -> dict[str, Any]:
    """`seal_batch` per record (median over rounds), and envpipe's `seal_many` over aead_only."""
    per_record = {
        name: round(median(by_size[BATCH_SIZE].batch_us), 3)
        for name, by_size in cells.items()
        if BATCH_SIZE in by_size and by_size[BATCH_SIZE].batch_us
    }
    ours, floor = per_record.get("envpipe"), per_record.get("aead_only")
    return {
        "value_bytes": BATCH_SIZE,
        "records_per_call": plan.batch_records,
        "us_per_record": per_record,
        "seal_many_x_aead_only": round(ours / floor, 2) if ours and floor else None,
    }
