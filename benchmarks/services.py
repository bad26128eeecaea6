"""The embedded broker and KMS for a benchmark run, and the worker processes it starts.

Everything started here is stopped here, whatever happens: `dev_services` always calls
`dev.down`, and `Child.stop` ends a worker by its own PID (never by name). A child's peak RSS
is its VmHWM, the kernel's high-water mark of its memory, read while it runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.measure import peak_rss_mib
from workers import dev, supervisor

#: The repository root, so children import `benchmarks` whatever the caller's cwd.
REPO_ROOT = Path(__file__).resolve().parent.parent
_STOP_GRACE_SECONDS = 10.0


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
    """One worker process (`python -m MODULE ARGS`), its log in a file, its peak RSS noted.

    `prefix` runs it under another program (a profiler: `py-spy record ... --`).

    Spawning, waiting and stopping are the supervisor's (`workers.supervisor.Child`); this
    adds the memory high-water mark, read on every poll while the child runs.
    """

    def __init__(
        self,
        module: str,
        args: Sequence[str],
        environ: dict[str, str],
        log: Path,
        *,
        prefix: Sequence[str] = (),
    ):
        self.log = log
        self._child = supervisor.Child.spawn(
            [*prefix, sys.executable, "-m", module, *args],
            name=f"the {module} process",
            log=log,
            env=environ,
            cwd=REPO_ROOT,
        )
        self._child.on_poll = self._note_rss
        self.pid = self._child.pid
        self._peak_rss_mib = 0.0

    def _note_rss(self, pid: int) -> None:
        self._peak_rss_mib = max(self._peak_rss_mib, peak_rss_mib(pid) or 0.0)

    def _exit(self, code: int | None) -> Exit | None:
        return None if code is None else Exit(code, self._peak_rss_mib)

    def exited(self) -> bool:
        """Whether the child has ended (and been reaped)."""
        return self._child.poll() is not None

    async def wait(self, within: float) -> Exit:
        """Wait for the child to exit by itself; stop it (TERM, then KILL) after `within` s."""
        return self._exit(await self._child.wait(within)) or await self.stop()

    async def stop(self) -> Exit:
        """SIGTERM, a grace period, then SIGKILL; returns how it ended."""
        return Exit(await self._child.stop(_STOP_GRACE_SECONDS), self._peak_rss_mib)

    def tail(self, lines: int = 15) -> str:
        """The end of the child's log, for an error message."""
        return self._child.tail(lines)
