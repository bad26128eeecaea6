"""The crypto stage's implementation process: it builds one implementation and times it.

The parent (`benchmarks.crypto_stage`) spawns one such process per implementation and payload
size and drives it over a pipe: `start SIZE WARMUP`, `run BUDGET CAP` (per-call timings),
`batch RECORDS REPEATS` (whole-batch timings), `stop`, `exit`. Per call, every seal and open
is timed on its own with `perf_counter_ns`. Per batch, one call seals `RECORDS` records
(`seal_batch`: `Encryptor.seal_many` for envpipe, a plain loop for the others), so a
per-record figure carries no clock overhead: it is what a worker's batch costs.
"""

from __future__ import annotations

import array
import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from benchmarks import crypto_impls
from benchmarks.crypto_impls import AsyncImpl, ImplContext, SyncImpl
from benchmarks.measure import median, peak_rss_mib

_DISTINCT_PAYLOADS = 64
_CHUNK = 128
_MIN_RECORDS = 100
_ERROR_CHARS = 300


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


async def _measure_batch(
    impl: SyncImpl | AsyncImpl, inputs: list[bytes], records: int, repeats: int
) -> float | None:
    """The median over `repeats` of one `seal_batch` call's time per record, in µs."""
    seal_batch = getattr(impl, "seal_batch", None)
    if seal_batch is None:
        return None
    batch = [inputs[index % len(inputs)] for index in range(records)]
    clock = time.perf_counter_ns
    per_record = []
    for _ in range(repeats):
        start = clock()
        sealed = await seal_batch(batch)
        per_record.append((clock() - start) / records / 1000)
        if len(sealed) != records:
            raise RuntimeError("a batch came back short")
    return round(median(per_record), 3)


async def _serve(name: str, context: ImplContext, conn: Connection) -> None:
    """Answer the parent's commands until told to exit: start, run, batch, stop, exit."""
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
            elif command == "batch":
                records, repeats = args
                conn.send(("ok", await _measure_batch(_started(impl), inputs, records, repeats)))
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
