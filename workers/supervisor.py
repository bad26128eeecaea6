"""The one process supervisor: every child envpipe starts is spawned, watched and stopped here.

The dev services (brokers, KMS emulators, Vault), the demo's workers, the benchmarks' workers
and the tests' workers are all `Child` processes: a log file holds their stdout and stderr,
`tail()` quotes its end in error messages, `wait`/`stop` reap them (no zombies, a real exit
code), and `stop` ends them with SIGTERM, a grace period, then SIGKILL.

A *detached* child runs in a session of its own, so it outlives the caller (`envpipe dev up`
returns while the services keep running) and its whole process group can be signalled. Such a
child is recorded as a `ProcessRecord`: its PID plus its start time, which a recycled PID cannot
share, so a later `envpipe dev down` never signals a process that is not ours.

`wait_until` and `until` are the poll-until loops (sync and async); process exits set no
event, so polling is the honest way to wait for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ServiceError

__all__ = [
    "POLL_SECONDS",
    "Child",
    "ProcessRecord",
    "log_tail",
    "until",
    "wait_until",
]

POLL_SECONDS = 0.05
STOP_GRACE_SECONDS = 10.0
_TAIL_LINES = 20
_HAVE_PROC = Path("/proc/self/stat").is_file()


def wait_until(
    condition: Callable[[], bool], timeout: float, interval: float = POLL_SECONDS
) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    within: float,
    interval: float = POLL_SECONDS,
) -> bool:
    """`wait_until` for the event loop; `condition` may be a coroutine function."""
    deadline = time.monotonic() + within
    while True:
        held = condition()
        if not isinstance(held, bool):
            held = await held
        if held:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


def log_tail(log: Path | str, lines: int = _TAIL_LINES) -> str:
    """The last lines of a log, indented, for an error message."""
    try:
        text = Path(log).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"its log {log} is unreadable"
    if not text:
        return f"its log {log} is empty"
    return f"last lines of {log}:\n" + "\n".join(f"    {line}" for line in text)


def _identity(pid: int) -> str | None:
    """The start time of a live process (None if gone or a zombie): with the PID, unique."""
    if _HAVE_PROC:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        # Fields after "(comm)": state is field 3, starttime field 22.
        fields = stat.rpartition(")")[2].split()
        return None if fields[0] in ("Z", "X") else fields[19]
    result = subprocess.run(
        ["ps", "-o", "stat=", "-o", "lstart=", "-p", str(pid)],
        capture_output=True,
        text=True,
        check=False,
    )
    state, _, started = result.stdout.strip().partition(" ")
    return None if result.returncode != 0 or state.startswith("Z") else started.strip()


@dataclass(frozen=True)
class ProcessRecord:
    """A detached child as written to a state file: enough to find it again, and only it."""

    name: str
    pid: int
    identity: str
    argv: tuple[str, ...]
    log: str
    port: int = 0

    def is_alive(self) -> bool:
        """Whether `pid` is still the process we started, leading its own process group."""
        child = _CHILDREN.get(self.pid)
        if child is not None and child.poll() is not None:
            return False  # our own child, ended (and now reaped)
        if not self.identity or _identity(self.pid) != self.identity:
            return False
        try:
            return os.getpgid(self.pid) == self.pid
        except ProcessLookupError:
            return False

    def stop(self, grace: float = 5.0) -> bool:
        """SIGTERM the process group, then SIGKILL; True if it was ours and running."""
        if not self.is_alive():
            return False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            if wait_until(lambda: not self.is_alive(), grace):
                break
        else:
            raise ServiceError(f"could not stop {self.name} (pid {self.pid})")
        child = _CHILDREN.pop(self.pid, None)
        if child is not None:
            child.poll()  # it is gone; collect its exit status so no zombie stays behind
        return True

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ProcessRecord:
        """The inverse of `dataclasses.asdict`; KeyError/TypeError on anything else."""
        return cls(**{**raw, "argv": tuple(raw["argv"])})


#: Every child this interpreter started and has not reaped, by PID: `ProcessRecord.stop`
#: reaps through it, so a detached child stopped by record leaves no zombie either.
_CHILDREN: dict[int, Child] = {}


class Child:
    """One process started by envpipe, its output in a log file."""

    def __init__(self, popen: subprocess.Popen[bytes], name: str, log: Path, detached: bool):
        self.name = name
        self.log = log
        self.pid = popen.pid
        self.detached = detached
        self._popen = popen
        self._code: int | None = None
        #: called with the PID on every poll while the child runs (peak-memory sampling)
        self.on_poll: Callable[[int], None] | None = None
        _CHILDREN[self.pid] = self

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        name: str,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        detached: bool = False,
        append: bool = False,
    ) -> Child:
        """Start `argv` with stdin closed and stdout+stderr in `log`; ServiceError if it cannot."""
        with log.open("ab" if append else "wb") as out:
            try:
                popen = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=dict(env) if env is not None else None,
                    cwd=cwd,
                    start_new_session=detached,
                )
            except OSError as exc:
                raise ServiceError(f"cannot start {name} ({argv[0]}): {exc}") from exc
        return cls(popen, name, log, detached)

    # -- state --

    def poll(self) -> int | None:
        """The exit code once the child has ended (reaping it), else None."""
        if self._code is None:
            if self.on_poll is not None:
                self.on_poll(self.pid)
            self._code = self._popen.poll()
            if self._code is not None:
                _CHILDREN.pop(self.pid, None)
        return self._code

    @property
    def running(self) -> bool:
        return self.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code if the child has ended (without polling again)."""
        return self._code

    def record(self, port: int = 0, *, name: str | None = None) -> ProcessRecord:
        """What a state file keeps of a detached child (ServiceError if it already ended)."""
        identity = _identity(self.pid)
        if identity is None or self.poll() is not None:
            raise self.exited_error("while starting")
        argv = tuple(str(arg) for arg in self._popen.args)  # type: ignore[union-attr]
        return ProcessRecord(name or self.name, self.pid, identity, argv, str(self.log), port)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def logged(self, text: str) -> bool:
        """Whether the child's log contains `text` (tools wait for markers this way)."""
        return text in self.log_text()

    def tail(self, lines: int = _TAIL_LINES) -> str:
        """The end of the child's log, for an error message."""
        return log_tail(self.log, lines)

    def exited_error(self, when: str) -> ServiceError:
        """The error for a child that ended unexpectedly, with its exit code and log tail."""
        code = self.poll()
        status = f" with code {code}" if code is not None else ""
        return ServiceError(f"{self.name} exited{status} {when}; {self.tail()}")

    # -- waiting and stopping --

    def signal(self, sig: int) -> None:
        """Send `sig` to the child (its whole group if detached); nothing if it has ended."""
        if self.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.detached:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)

    def wait_sync(self, within: float) -> int | None:
        """Block until the child ends or `within` seconds pass; its exit code, or None."""
        wait_until(lambda: self.poll() is not None, within)
        return self.poll()

    async def wait(self, within: float) -> int | None:
        """Wait until the child ends or `within` seconds pass; its exit code, or None."""
        await until(lambda: self.poll() is not None, within)
        return self.poll()

    def stop_sync(self, grace: float = STOP_GRACE_SECONDS) -> int:
        """SIGTERM, up to `grace` seconds, then SIGKILL; returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            self.signal(sig)
            if (code := self.wait_sync(grace)) is not None:
                return code
        raise ServiceError(f"{self.name} (pid {self.pid}) did not end after SIGKILL")

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> int:
        """`stop_sync` without blocking the event loop."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            self.signal(sig)
            if (code := await self.wait(grace)) is not None:
                return code
        raise ServiceError(f"{self.name} (pid {self.pid}) did not end after SIGKILL")

    def kill(self) -> None:
        """SIGKILL at once (tests of crash recovery)."""
        self.signal(signal.SIGKILL)
