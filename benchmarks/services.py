"""The embedded broker and KMS for a benchmark run, and the worker processes it starts.

Everything started here is stopped here, whatever happens: `dev_services` always calls
`dev.down`, and `Child.stop` ends a worker by its own PID (never by name). A child's peak RSS
is its VmHWM, the kernel's high-water mark of its memory, read while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.measure import peak_rss_mib
from workers import dev

#: The repository root, so children import `benchmarks` whatever the caller's cwd.
REPO_ROOT = Path(__file__).resolve().parent.parent
_STOP_GRACE_SECONDS = 10.0
_POLL_SECONDS = 0.05


@contextlib.contextmanager
def dev_services(state_dir: Path | None = None) -> Iterator[dev.DevEnv]:
    """Start Tansu + moto on free loopback ports for the run; always stop them afterwards."""
    owned = state_dir is None
    folder = Path(tempfile.mkdtemp(prefix="envpipe-bench-")) if state_dir is None else state_dir
    try:
        env = dev.up(folder)
        try:
            yield env
        finally:
            dev.down(folder)
    finally:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)


def child_environ(env: dev.DevEnv, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A child's environment: ours, the dev services' variables, and `benchmarks` importable."""
    environ = dict(os.environ)
    environ.update(env.as_environ())
    environ["AWS_ENDPOINT_URL_KMS"] = env.kms_endpoint  # for boto3-based peers
    path = environ.get("PYTHONPATH")
    environ["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    environ.update(extra or {})
    return environ


@dataclass
class Exit:
    """How a child ended: its exit code and its peak resident memory."""

    code: int
    peak_rss_mib: float


class Child:
    """One worker process (`python -m MODULE ARGS`), its log in a file."""

    def __init__(self, module: str, args: Sequence[str], environ: dict[str, str], log: Path):
        self.log = log
        with log.open("wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=environ,
                cwd=REPO_ROOT,
            )
        self.pid = self._proc.pid
        self._peak_rss_mib = 0.0
        self._exit: Exit | None = None

    def _reap(self) -> Exit | None:
        """Note the memory high-water mark, then reap the child if it has exited."""
        if self._exit is None:
            self._peak_rss_mib = max(self._peak_rss_mib, peak_rss_mib(self.pid) or 0.0)
            code = self._proc.poll()
            if code is None:
                return None
            self._exit = Exit(code, self._peak_rss_mib)
        return self._exit

    def exited(self) -> bool:
        """Whether the child has ended (and been reaped)."""
        return self._reap() is not None

    async def _exit_within(self, seconds: float) -> Exit | None:
        """How the child ended, if it does within `seconds`; else None."""
        deadline = time.monotonic() + seconds
        while (done := self._reap()) is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_POLL_SECONDS)  # a process exit sets no asyncio event
        return done

    async def wait(self, within: float) -> Exit:
        """Wait for the child to exit by itself; stop it (TERM, then KILL) after `within` s."""
        return await self._exit_within(within) or await self.stop()

    async def stop(self) -> Exit:
        """SIGTERM, a grace period, then SIGKILL; returns how it ended."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if (done := self._reap()) is not None:
                return done
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            if (done := await self._exit_within(_STOP_GRACE_SECONDS)) is not None:
                return done
        raise RuntimeError(f"worker {self.pid} did not die after SIGKILL")

    def tail(self, lines: int = 15) -> str:
        """The end of the child's log, for an error message."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
