"""`envpipe demo`: the whole path on the embedded default, then a summary with sources.

    samples   the sample orders and the topics
    run       the worker processes, the producer, the progress line
    verify    reading every topic back
    report    the summary

The workers run as separate processes, started exactly as a user would start them, so the
throughput and latency figures are the workers' own (from their stats files), not the
demo's estimate. The demo itself only produces sample orders, watches progress, reads every
topic back to verify, and (from a source checkout) times the library in a process of its
own (`benchmarks.inprocess`). Every figure in the summary names its source.

The embedded services are stopped whatever happens: on success, on failure, on Ctrl-C and
on SIGTERM (which is treated as Ctrl-C).
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from pipeline.errors import DemoError, EnvpipeError
from workers import dev, runtime, topics
from workers.demo.report import Report, render
from workers.demo.run import run_pipeline, say, start_workers, worker_environ
from workers.demo.samples import PARTITIONS, Topics, sample_records
from workers.demo.verify import Verification, verify

__all__ = ["DemoError", "Report", "Verification", "render", "run", "sample_records"]

#: Records timed one by one through Encryptor.seal / Decryptor.open in a process of their own.
IN_PROCESS_RECORDS = 5_000

_interrupted_by: list[int] = []  # the signals `_as_interrupt` saw during this run


def run(
    *,
    records: int,
    state_dir: Path | None,
    kms: str = "aws",
    format: str = "v1",
    broker: str = "tansu",
) -> int:
    """The `demo` command: 0 only if every record came back intact; 128 + N on signal N."""
    runtime.configure_logging("WARNING")
    started = time.monotonic()
    _interrupted_by.clear()
    folder = state_dir or Path(tempfile.mkdtemp(prefix="envpipe-demo-"))
    previous = signal.signal(signal.SIGTERM, _as_interrupt)
    passed = False
    try:
        say(f"starting the embedded broker ({broker}) and the {kms} service; state in {folder}")
        env = dev.up(folder, kms=kms, broker=broker, ready_timeout=120)
        try:
            pids = ", ".join(f"{name} pid {pid}" for name, pid in env.pids.items())
            say(f"broker {env.bootstrap_servers}, {env.provider} ({pids or 'in process'})")
            report = runtime.run(_demo(env, folder, records, format))
            report.wall_seconds = time.monotonic() - started
            report.kept = state_dir is not None or not report.verification.passed
            print(render(report), flush=True)
            passed = report.verification.passed
        finally:
            _stop_services(folder)
    except KeyboardInterrupt:
        say("interrupted; the embedded services are stopped")
        return 128 + _interrupted_by[-1] if _interrupted_by else 128 + signal.SIGINT
    except EnvpipeError as exc:
        print(f"envpipe: error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        if passed and state_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
        elif not passed:
            say(f"logs and stats kept in {folder}")
    return 0 if passed else 1


def _as_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM acts as Ctrl-C, so the `finally` that stops the services always runs."""
    _interrupted_by.append(signum)
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        raise KeyboardInterrupt
    signal.raise_signal(signal.SIGINT)  # inside the event loop: cancels the demo task


def _stop_services(folder: Path) -> None:
    """`dev.down`, shielded from a second Ctrl-C so the services cannot be left behind."""
    say("stopping the embedded services")
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        dev.down(folder)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


async def _demo(env: dev.DevEnv, folder: Path, count: int, format_name: str) -> Report:
    names = Topics()
    say(f"creating topics {', '.join(names.all)} ({PARTITIONS} partitions each)")
    await topics.create_topics(env.bootstrap_servers, names.all, PARTITIONS)
    environ = worker_environ({**env.as_environ(), "ENVPIPE_FORMAT": format_name})
    workers = start_workers(names, environ, folder)
    say(
        "started the encrypt and decrypt workers (pids "
        + ", ".join(str(worker.child.pid) for worker in workers)
        + f"; format {format_name}; logs in {folder})"
    )
    try:
        produced = await run_pipeline(env.bootstrap_servers, names, count, workers)
    finally:
        for worker in workers:
            await worker.stop()
    for worker in workers:
        worker.check()
    say("reading every topic back to verify")
    verification = await verify(env.bootstrap_servers, names, count, format_name)
    timing = _in_process(environ, folder)
    if timing is not None:
        verification.in_process_mismatches = timing.mismatches
    return Report(
        folder=folder,
        topics=names,
        provider=env.provider,
        format=format_name,
        produced=produced,
        encrypt_stats=workers[0].stats(),
        decrypt_stats=workers[1].stats(),
        in_process=timing,
        verification=verification,
        broker=env.broker,
    )


def _in_process(environ: dict[str, str], folder: Path) -> Any:
    """The in-process timing, if the benchmarks are here (they are not in the wheel)."""
    try:
        from benchmarks import inprocess  # noqa: PLC0415 - a source checkout only
    except ImportError:
        return None
    say(f"in-process stage: {IN_PROCESS_RECORDS:,} records through Encryptor / Decryptor")
    return inprocess.measure(environ, IN_PROCESS_RECORDS, folder)
