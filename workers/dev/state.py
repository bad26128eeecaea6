"""The files of a dev state directory: state.json, dev.env, and the lock around both.

    state.json   the detached processes (PID, start identity, port) and the DevEnv (mode 0600)
    dev.env      ``export NAME=value`` lines for a shell (mode 0600)
    NAME.log     each service's stdout and stderr

Both files hold the services' credentials (dummy ones, but still), so they are owner-only and
written atomically: a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ServiceError
from workers.supervisor import ProcessRecord

STATE_FORMAT = 2


@dataclass(frozen=True)
class State:
    """The contents of state.json; `env` is None until `up` has finished."""

    procs: tuple[ProcessRecord, ...]
    env: dict[str, Any] | None


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Serialise `up` and `down` on one state directory across processes."""
    with (state_dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_state(state_dir: Path) -> State | None:
    """Parse state.json; None if there is none."""
    path = state_dir / "state.json"
    try:
        return _parse(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ServiceError(
            f"{path} is unreadable ({exc}); stop any leftover service processes "
            "by hand and delete the file"
        ) from exc


def _parse(raw: dict[str, Any]) -> State:
    """The inverse of `write_state`; ValueError/KeyError/TypeError on anything else."""
    if raw["format"] != STATE_FORMAT:
        raise ValueError(f"unknown format {raw['format']!r}")
    procs = tuple(ProcessRecord.from_json(entry) for entry in raw["services"].values())
    return State(procs, raw["env"])


def write_state(state_dir: Path, state: State) -> None:
    """Record the state (it holds the dummy credentials, so owner-only)."""
    raw = {
        "format": STATE_FORMAT,
        "services": {proc.name: asdict(proc) for proc in state.procs},
        "env": state.env,
    }
    write_private(state_dir / "state.json", json.dumps(raw, indent=2) + "\n")


def write_env_file(state_dir: Path, variables: Mapping[str, str]) -> None:
    """dev.env: one shell-quoted `export NAME=value` line per variable."""
    lines = ["# envpipe dev services; load with: source dev.env"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
    write_private(state_dir / "dev.env", "\n".join(lines) + "\n")


def write_private(path: Path, text: str) -> None:
    """Write a mode-0600 file atomically, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)


def remove_state_files(state_dir: Path) -> None:
    """Forget the services: the state and the env file (logs stay, for post-mortems)."""
    for name in ("state.json", "dev.env"):
        (state_dir / name).unlink(missing_ok=True)
