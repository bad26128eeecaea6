"""The embedded default: a broker and a cryptography service on loopback, for development.

`up` starts them as background processes that outlive the caller, so a shell can run
`envpipe dev up`, source ``DIR/dev.env`` and start workers against them. It creates the dev
keys (`envpipe-dev` wraps, `envpipe-dev-signing` signs) and records the processes in
``DIR/state.json`` (`workers.dev.state`); `down` stops exactly those processes, checking each
PID's start time first so that a recycled PID is never signalled.

One module per service, each built on `workers.dev.service` and `workers.supervisor`:

    tansu          the embedded broker (default)
    apache_kafka   Apache Kafka in KRaft mode, from its jars on Maven Central (needs Java 17)
    moto           AWS KMS (default)
    openbao        Vault transit, OpenBao's dev server
    softhsm        a PKCS#11 token in SoftHSM2 (a library, not a process)

`up` refuses to start a second set while the recorded one is still running; a stale record
(the processes died) is cleaned up and replaced. POSIX only (process groups, flock).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ServiceError
from workers.dev import state
from workers.dev.ports import choose_ports, wait_port_free
from workers.dev.service import BrokerStarted, KmsStarted, Launcher

__all__ = ["BROKERS", "PROVIDERS", "DevEnv", "down", "load", "up"]

#: `--kms` choices and the module that starts each.
PROVIDERS = {"aws": "moto", "vault": "openbao", "pkcs11": "softhsm"}
#: `--broker` choices and the module that starts each.
BROKERS = {"tansu": "tansu", "kafka": "apache_kafka"}
#: What each port option starts, for messages.
_PORT_LABELS = {"broker_port": "broker", "kms_port": "cryptography service"}

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevEnv:
    """Where the running dev services are, and how to reach them."""

    provider: str
    broker: str
    bootstrap_servers: str
    kms_key_id: str  # configured name (ENVPIPE_KMS_KEY_ID)
    signing_key_id: str
    kms_key_canonical: str  # what envelopes carry, and readers allow
    signing_key_canonical: str
    #: the provider's variables in dev.env (endpoints, credentials): never printed
    variables: dict[str, str] = field(repr=False)
    pids: dict[str, int] = field(default_factory=dict)

    def as_environ(self) -> dict[str, str]:
        """The variables of dev.env, for a subprocess's environment or a shell."""
        return {
            "ENVPIPE_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "ENVPIPE_KMS_KEY_ID": self.kms_key_id,
            "ENVPIPE_SIGNING_KEY_ID": self.signing_key_id,
            # Envelopes carry canonical ids, never aliases, so readers must allow those.
            "ENVPIPE_ALLOWED_KMS_KEYS": self.kms_key_canonical,
            "ENVPIPE_ALLOWED_SIGNING_KEYS": self.signing_key_canonical,
            **self.variables,
        }

    # The AWS-specific fields tests and tools reach for; empty for other providers.
    @property
    def kms_endpoint(self) -> str:
        return self.variables.get("ENVPIPE_KMS_ENDPOINT", "")

    @property
    def region(self) -> str:
        return self.variables.get("AWS_DEFAULT_REGION", "")

    @property
    def access_key_id(self) -> str:
        return self.variables.get("AWS_ACCESS_KEY_ID", "")

    @property
    def secret_access_key(self) -> str:
        return self.variables.get("AWS_SECRET_ACCESS_KEY", "")

    @property
    def broker_pid(self) -> int:
        return self.pids.get("broker", 0)

    @property
    def kms_pid(self) -> int:
        return self.pids.get("kms", 0)


def up(
    state_dir: Path,
    *,
    kms: str = "aws",
    broker: str = "tansu",
    broker_port: int | None = None,
    kms_port: int | None = None,
    ready_timeout: float = 30.0,
    advertised_port: int | None = None,
) -> DevEnv:
    """Start the broker and the cryptography service, create the dev keys, write dev.env.

    Returns when both are ready. Ports left as None (or 0) are chosen free. Raises ServiceError
    if the services recorded in `state_dir` are still running, if a port is taken, if a
    binary is missing, or if a service does not answer within `ready_timeout` seconds. On any
    failure nothing is left running. `advertised_port`: see `workers.dev.tansu.start`.
    """
    broker_module, kms_module = _module(BROKERS, broker, "broker"), _module(PROVIDERS, kms, "kms")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with state.locked(state_dir):
        _clear_stale(state_dir)
        ports = choose_ports(
            {"broker_port": broker_port, "kms_port": kms_port}, labels=_PORT_LABELS
        )
        launcher = Launcher(
            state_dir, lambda procs: state.write_state(state_dir, state.State(procs, None))
        )
        try:
            started_broker: BrokerStarted = broker_module.start(
                launcher, ports["broker_port"], ready_timeout, advertised_port
            )
            started_kms: KmsStarted = kms_module.start(launcher, ports["kms_port"], ready_timeout)
            env = DevEnv(
                provider=started_kms.provider,
                broker=broker,
                bootstrap_servers=started_broker.bootstrap_servers,
                kms_key_id=started_kms.kms_key_id,
                signing_key_id=started_kms.signing_key_id,
                kms_key_canonical=started_kms.kms_key_canonical,
                signing_key_canonical=started_kms.signing_key_canonical,
                variables=started_kms.variables,
                pids={record.name: record.pid for record in launcher.records},
            )
            state.write_env_file(state_dir, env.as_environ())
            state.write_state(state_dir, state.State(tuple(launcher.records), asdict(env)))
        except BaseException:
            if _stop_all(launcher.records):
                state.remove_state_files(state_dir)  # else keep the record, for `down` to retry
            raise
    _log.info("dev services ready: broker %s, %s", env.bootstrap_servers, env.provider)
    return env


def down(state_dir: Path) -> bool:
    """Stop the services recorded in `state_dir` and remove its state; True if any was running.

    Safe to call twice or on a directory that never saw `up`. A PID whose start time no longer
    matches the record belongs to someone else now and is left alone.
    """
    if not (state_dir / "state.json").is_file():
        return False
    with state.locked(state_dir):
        recorded = state.read_state(state_dir)
        if recorded is None:
            return False
        stopped = [proc for proc in recorded.procs if proc.stop()]
        state.remove_state_files(state_dir)
    held = [proc for proc in stopped if proc.port and not wait_port_free(proc.port)]
    if held:
        ports = ", ".join(f"{proc.port} ({proc.name})" for proc in held)
        raise ServiceError(f"stopped the dev services, but port(s) {ports} are still in use")
    return bool(stopped)


def load(state_dir: Path) -> DevEnv:
    """The running dev environment recorded in `state_dir`, for commands started after `up`."""
    recorded = state.read_state(state_dir)
    if recorded is None:
        raise ServiceError(
            f"no dev services recorded in {state_dir}; "
            f"start them with `envpipe dev up --state-dir {state_dir}`"
        )
    restart = f"run `envpipe dev down --state-dir {state_dir}`, then `envpipe dev up` again"
    if recorded.env is None:
        raise ServiceError(f"the dev services in {state_dir} never finished starting; {restart}")
    dead = [proc.name for proc in recorded.procs if not proc.is_alive()]
    if dead:
        raise ServiceError(f"the {' and '.join(dead)} in {state_dir} stopped running; {restart}")
    return DevEnv(**recorded.env)


def _module(choices: dict[str, str], choice: str, option: str) -> Any:
    """The service module for `--option choice`, imported only when chosen."""
    if choice not in choices:
        raise ServiceError(f"--{option} {choice!r}: must be one of {', '.join(choices)}")
    return importlib.import_module(f"workers.dev.{choices[choice]}")


def _clear_stale(state_dir: Path) -> None:
    """Refuse if the recorded services still run; otherwise clean up whatever is left."""
    recorded = state.read_state(state_dir)
    if recorded is None:
        return
    if recorded.env is not None and all(proc.is_alive() for proc in recorded.procs):
        raise ServiceError(
            f"dev services are already running for {state_dir} "
            f"(broker {recorded.env['bootstrap_servers']}, {recorded.env['provider']}); "
            f"use them, or stop them first with `envpipe dev down --state-dir {state_dir}`"
        )
    for proc in recorded.procs:
        proc.stop()
    state.remove_state_files(state_dir)


def _stop_all(records: list[Any]) -> bool:
    """Best-effort cleanup after a failed `up`; True if nothing is left running.

    Failures are logged, not raised: the error that made `up` fail is the one to report.
    """
    clean = True
    for record in records:
        try:
            record.stop()
        except ServiceError as exc:
            _log.warning("%s", exc)
            clean = False
    return clean
