"""The embedded HSM: a SoftHSM2 token in the state directory, reached through PKCS#11.

SoftHSM2 is a library, not a process: `start` spawns nothing to keep running (the `port` and
the launcher's process list go unused), it creates a token under STATE_DIR/softhsm with its
own `softhsm2.conf` (never the user's global one) and the dev keys on it:

- `envpipe-dev`: AES-256, a token object, sensitive and non-extractable, ENCRYPT/DECRYPT;
- `envpipe-dev-signing`: an EC P-256 pair, the private half SIGN (sensitive,
  non-extractable), the public half VERIFY, both with that label.

The keys are made in a child interpreter (`python -m workers.dev.softhsm`): SoftHSM2 reads
SOFTHSM2_CONF only when the library is first initialised in a process, so creating them
in-process would tie the caller (a test run, say) to this token's configuration. The user
PIN reaches the child on stdin and lands in a mode-0600 file; the SO PIN is random and kept
nowhere (`up` makes a fresh token every time, as moto and OpenBao start empty).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pkcs11
import pkcs11.exceptions
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.mechanisms import GCMParams
from pkcs11.types import EncryptMixin
from pkcs11.util.ec import encode_named_curve_parameters

from pipeline.errors import ServiceError
from pipeline.kms.pkcs11_uri import canonical_key_uri
from workers.dev.service import KmsStarted, Launcher
from workers.supervisor import Child, wait_until

TOKEN_LABEL = "envpipe-dev"  # noqa: S105 - a label, not a secret
KMS_KEY_LABEL = "envpipe-dev"
SIGNING_KEY_LABEL = "envpipe-dev-signing"

#: Where Debian, Ubuntu (multiarch) and a source build put the module.
MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
INSTALL_HINT = "install Debian's softhsm2 package: apt-get install softhsm2"
INSTALL_P11KIT = "apt-get install p11-kit p11-kit-modules"

_PIN_HEX_BYTES = 16


def find_module() -> str:
    """The SoftHSM2 PKCS#11 module, or ServiceError saying how to install it."""
    for path in MODULE_PATHS:
        if Path(path).is_file():
            return path
    raise ServiceError(
        f"the SoftHSM2 module is not in any of {', '.join(MODULE_PATHS)}; {INSTALL_HINT}"
    )


def find_util() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise ServiceError(f"softhsm2-util is not on PATH; {INSTALL_HINT}")
    return util


def write_config(root: Path) -> Path:
    """A fresh softhsm2.conf and empty token directory under `root` (any old token removed)."""
    if root.exists():
        shutil.rmtree(root)
    tokens = root / "tokens"
    root.mkdir(parents=True, mode=0o700)
    tokens.mkdir(mode=0o700)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n",
        encoding="utf-8",
    )
    return conf


def _run(
    argv: list[str],
    env: dict[str, str],
    timeout: float,
    what: str,
    stdin: str = "",
    *,
    expected: tuple[int, ...] = (0,),
) -> int:
    """Run a one-shot tool; its exit code, which must be one of `expected`."""
    try:
        done = subprocess.run(
            argv, env=env, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ServiceError(f"{what} did not finish within {timeout:g} s") from exc
    if done.returncode not in expected:
        output = (done.stderr or done.stdout).strip()[-500:]
        raise ServiceError(f"{what} failed (exit {done.returncode}): {output}")
    return done.returncode


def init_token(
    conf: Path, label: str, pin: str, timeout: float, *, util: str | None = None
) -> None:
    """`softhsm2-util --init-token --free` under `conf`, with a random SO PIN."""
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    so_pin = secrets.token_hex(_PIN_HEX_BYTES)
    argv = [util or find_util(), "--init-token", "--free", "--label", label]
    argv += ["--so-pin", so_pin, "--pin", pin]
    _run(argv, env, timeout, f"initialising the SoftHSM2 token {label!r}")


def create_keys(conf: Path, module: str, token: str, pin: str, timeout: float) -> None:
    """Create the dev keys on `token` in a child interpreter (see the module docstring)."""
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    argv = [sys.executable, "-P", "-m", "workers.dev.softhsm", module, token]
    _run(argv, env, timeout, f"creating the dev keys on {token!r}", stdin=pin + "\n")


def start(launcher: Launcher, port: int, timeout: float) -> KmsStarted:
    """Create the dev token and its keys in STATE_DIR/softhsm; nothing keeps running."""
    del port  # a library, not a server
    module, util = find_module(), find_util()
    root = launcher.state_dir / "softhsm"
    conf = write_config(root)
    pin = secrets.token_hex(_PIN_HEX_BYTES)
    init_token(conf, TOKEN_LABEL, pin, timeout, util=util)
    pin_file = root / "user-pin"
    descriptor = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(pin + "\n")
    create_keys(conf, module, TOKEN_LABEL, pin, timeout)
    # The configured names are the canonical ids themselves.
    kms_key = canonical_key_uri(TOKEN_LABEL, KMS_KEY_LABEL, "secret-key")
    signing_key = canonical_key_uri(TOKEN_LABEL, SIGNING_KEY_LABEL, "private-key")
    variables = {
        "ENVPIPE_KMS_PROVIDER": "pkcs11",
        "SOFTHSM2_CONF": str(conf),
        "ENVPIPE_PKCS11_MODULE": module,
        "ENVPIPE_PKCS11_TOKEN": TOKEN_LABEL,
        "ENVPIPE_PKCS11_PIN_FILE": str(pin_file),
    }
    return KmsStarted(
        provider="pkcs11",
        variables=variables,
        kms_key_id=kms_key,
        signing_key_id=signing_key,
        kms_key_canonical=kms_key,
        signing_key_canonical=signing_key,
        summary=(
            ("kms", f"SoftHSM2 token {TOKEN_LABEL!r} ({module})"),
            ("softhsm2.conf", str(conf)),
            ("user PIN file", str(pin_file)),
        ),
    )


def _create_keys_in_this_process(module: str, token_label: str, pin: str) -> None:
    """The child's work: the KEK and the signing pair, with the attributes the docs promise."""
    lib = pkcs11.lib(module)
    token = lib.get_token(token_label=token_label)
    with token.open(rw=True, user_pin=pin) as session:
        session.generate_key(
            KeyType.AES,
            256,
            label=KMS_KEY_LABEL,
            store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
                Attribute.WRAP: False,
                Attribute.UNWRAP: False,
                Attribute.SIGN: False,
                Attribute.VERIFY: False,
            },
        )
        curve = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        curve.generate_keypair(
            mechanism=Mechanism.EC_KEY_PAIR_GEN,
            store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            label=SIGNING_KEY_LABEL,
            public_template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.VERIFY: True,
                Attribute.ENCRYPT: False,
                Attribute.WRAP: False,
                Attribute.DERIVE: False,
            },
            private_template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: False,
            },
        )
        for label, object_class in (
            (KMS_KEY_LABEL, ObjectClass.SECRET_KEY),
            (SIGNING_KEY_LABEL, ObjectClass.PRIVATE_KEY),
            (SIGNING_KEY_LABEL, ObjectClass.PUBLIC_KEY),
        ):
            template = {Attribute.LABEL: label, Attribute.CLASS: object_class}
            count = len(list(session.get_objects(template)))
            if count != 1:
                raise SystemExit(f"expected one {object_class.name} {label!r}, found {count}")


#: Where p11-kit keeps its server and client module, under a prefix (Debian's is /usr).
_P11KIT_SERVER = "libexec/p11-kit/p11-kit-server"
_P11KIT_CLIENT = "lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
_P11KIT_LIBS = "lib/x86_64-linux-gnu"
#: The child's exit code when the transport refuses CKM_AES_GCM's parameters.
_NO_GCM = 3


class NetworkToken:
    """The dev token behind `p11-kit server` on a unix socket: an HSM reached over a wire.

    A worker loads `client_module` with `variables` and talks to the server process, as a
    network HSM's client library talks to its appliance; `stop` is the HSM going away (the
    server and its per-connection children: its own process group), `start` its return on
    the same socket. `prefix` is a p11-kit installation (default Debian's, /usr); the PIN
    never reaches the server, only the client's `C_Login`.
    """

    def __init__(
        self, conf: Path, token: str, socket: Path, log: Path, prefix: Path = Path("/usr")
    ) -> None:
        server = prefix / _P11KIT_SERVER
        self.client_module = str(prefix / _P11KIT_CLIENT)
        if not server.is_file() or not Path(self.client_module).is_file():
            raise ServiceError(
                f"no p11-kit server or client module under {prefix}: {INSTALL_P11KIT}"
            )
        self._argv = [str(server), "--foreground", "--name", str(socket)]
        self._argv += ["--provider", find_module(), f"pkcs11:token={token}"]
        self._env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
        if prefix != Path("/usr"):
            self._env["LD_LIBRARY_PATH"] = str(prefix / _P11KIT_LIBS)
        self._token = token
        self._socket = socket
        self._log = log
        self._child: Child | None = None

    @property
    def variables(self) -> dict[str, str]:
        """What points a worker at this token instead of the in-process SoftHSM2."""
        return {
            "ENVPIPE_PKCS11_MODULE": self.client_module,
            "P11_KIT_SERVER_ADDRESS": f"unix:path={self._socket}",
        }

    def start(self, timeout: float = 10.0) -> None:
        """Serve the token on the socket (again); returns once the server listens."""
        self._socket.unlink(missing_ok=True)
        child = Child.spawn(
            self._argv, name="p11-kit server", log=self._log, env=self._env, detached=True,
            append=True,
        )  # fmt: skip
        self._child = child
        if not wait_until(lambda: self._socket.exists() or not child.running, timeout):
            child.stop_sync()
            raise ServiceError(f"p11-kit server did not listen within {timeout:g} s")
        if not child.running:
            raise child.exited_error("while starting")

    def stop(self) -> None:
        """The HSM goes away: the server and every connection it serves end."""
        if self._child is not None:
            self._child.stop_sync()
            self._child = None

    def carries_aes_gcm(self, pin: str, timeout: float = 30.0) -> bool:
        """Whether the wire carries CKM_AES_GCM's parameters (p11-kit 0.25 on; 0.24 refuses).

        Asked in a child interpreter, so this process's module configuration stays its own.
        """
        argv = [sys.executable, "-P", "-m", "workers.dev.softhsm", "--probe-gcm"]
        argv += [self.client_module, self._token]
        env = {**os.environ, **self.variables}
        what = "probing p11-kit for AES-GCM"
        return _run(argv, env, timeout, what, stdin=pin + "\n", expected=(0, _NO_GCM)) == 0

    def __enter__(self) -> NetworkToken:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _probe_gcm(module: str, token_label: str, pin: str) -> int:
    """The child's work for `carries_aes_gcm`: one GCM encryption under the dev KEK."""
    token = pkcs11.lib(module).get_token(token_label=token_label)
    with token.open(user_pin=pin) as session:
        kek = session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, KMS_KEY_LABEL)
        if not isinstance(kek, EncryptMixin):
            raise SystemExit(f"{KMS_KEY_LABEL!r} is not an encryption key")
        try:
            kek.encrypt(
                bytes(32),
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(bytes(12), b"", 128),
            )
        except pkcs11.exceptions.MechanismInvalid:
            return _NO_GCM
    return 0


if __name__ == "__main__":
    # python -m workers.dev.softhsm [--probe-gcm] MODULE TOKEN_LABEL, the user PIN on stdin.
    if sys.argv[1] == "--probe-gcm":
        sys.exit(_probe_gcm(sys.argv[2], sys.argv[3], sys.stdin.readline().rstrip("\n")))
    _create_keys_in_this_process(sys.argv[1], sys.argv[2], sys.stdin.readline().rstrip("\n"))
