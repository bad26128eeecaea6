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
import asyncio
import contextlib
import multiprocessing
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

from benchmarks import crypto_impls
from benchmarks.crypto_impls import AsyncImpl, ImplContext, SyncImpl
from benchmarks.measure import Progress, cdf_points, peak_rss_mib, percentiles

IMPLS = ("floor", "envpipe", "aws_esdk", "confluent_csfle")
SIZES = (256, 1024, 16384)
_DISTINCT_PAYLOADS = 64
_CHUNK = 128
_MIN_RECORDS = 100
_ERROR_CHARS = 300
_CHILD_START_TIMEOUT = 120.0
_CHILD_RUN_TIMEOUT = 300.0


@dataclass(frozen=True)
class CryptoPlan:
    """How much to measure: rounds, and per round a time budget and a record cap per run."""

    rounds: int
    budget_seconds: float
    max_records: int
    warmup_records: int


# --- the child process ------------------------------------------------------------------------


def payloads(size: int, seed: int = 4) -> list[bytes]:
    """The same distinct payloads for every implementation (deterministic, incompressible)."""
    rng = random.Random(f"{seed}:{size}")
    return [rng.randbytes(size) for _ in range(_DISTINCT_PAYLOADS)]


async def _timed_sync(
    fn: Callable[[bytes], bytes], inputs: Sequence[bytes], out: list[bytes], ns: array.array[int]
) -> None:
    clock = time.perf_counter_ns
    append, record = out.append, ns.append
    for item in inputs:
        start = clock()
        result = fn(item)
        record(clock() - start)
        append(result)


async def _timed_async(
    fn: Callable[[bytes], Awaitable[bytes]],
    inputs: Sequence[bytes],
    out: list[bytes],
    ns: array.array[int],
) -> None:
    clock = time.perf_counter_ns
    append, record = out.append, ns.append
    for item in inputs:
        start = clock()
        result = await fn(item)
        record(clock() - start)
        append(result)


async def _measure(
    impl: SyncImpl | AsyncImpl, inputs: list[bytes], budget: float, cap: int
) -> dict[str, Any]:
    """Seal and open chunks for up to `budget` seconds (at least `_MIN_RECORDS` records).

    Each chunk is sealed, then opened and checked, then dropped: memory stays flat, so the
    process's peak RSS is the implementation's, not the harness's.
    """
    timed: Any = _timed_async if impl.asynchronous else _timed_sync
    seal_ns: array.array[int] = array.array("q")
    open_ns: array.array[int] = array.array("q")
    count = 0
    envelope_bytes = 0
    start = time.perf_counter()
    while count < cap and (count < _MIN_RECORDS or time.perf_counter() - start < budget):
        chunk = [inputs[(count + i) % len(inputs)] for i in range(min(_CHUNK, cap - count))]
        sealed: list[bytes] = []
        opened: list[bytes] = []
        await timed(impl.seal, chunk, sealed, seal_ns)
        await timed(impl.open, sealed, opened, open_ns)
        if opened != chunk:
            raise RuntimeError("a record did not round-trip")
        envelope_bytes += sum(map(len, sealed))
        count += len(chunk)
    return {
        "seal_ns": seal_ns.tobytes(),
        "open_ns": open_ns.tobytes(),
        "count": count,
        "envelope_bytes": envelope_bytes,
    }


async def _serve(name: str, context: ImplContext, conn: Connection) -> None:
    """Answer the parent's commands until told to exit: start SIZE, run, stop, exit."""
    loop = asyncio.get_running_loop()
    impl: SyncImpl | AsyncImpl | None = None
    inputs: list[bytes] = []
    while True:
        # A thread waits on the pipe, so DEK refreshes can run meanwhile.
        command, *args = await loop.run_in_executor(None, conn.recv)
        try:
            if command == "start":
                size, warmup = args
                if impl is not None:
                    await impl.close()
                impl = await crypto_impls.create(name, context)
                inputs = payloads(size)
                await _measure(impl, inputs, 0.0, warmup)  # warm every cache and code path
                conn.send(("ok", impl.note))
            elif command == "run":
                budget, cap = args
                conn.send(("ok", await _measure(_started(impl), inputs, budget, cap)))
            elif command == "stop":
                calls = _started(impl).kms_calls()
                await _started(impl).close()
                impl = None
                conn.send(("ok", calls))
            else:  # exit
                conn.send(("ok", peak_rss_mib()))
                return
        except Exception as exc:
            hint = " (install the peers: pip install 'envpipe[bench]')"
            why = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
            conn.send(("error", why + (hint if isinstance(exc, ImportError) else "")))


def _started(impl: SyncImpl | AsyncImpl | None) -> SyncImpl | AsyncImpl:
    if impl is None:
        raise RuntimeError("no implementation started (its start failed)")
    return impl


def child_main(name: str, environ: dict[str, str], context: ImplContext, conn: Connection) -> None:
    """Entry point of an implementation's process (spawned, so it shares nothing with us)."""
    os.environ.update(environ)
    import uvloop  # noqa: PLC0415 - the stack's event loop, as in the workers

    uvloop.run(_serve(name, context, conn))


# --- the parent -------------------------------------------------------------------------------


@dataclass
class _Cell:
    """What one implementation measured at one payload size, over all rounds."""

    seal_ns: list[int] = field(default_factory=list)
    open_ns: list[int] = field(default_factory=list)
    count: int = 0
    envelope_bytes: int = 0
    kms_calls: int = 0
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
    return CryptoResults(results, details, peak)


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
