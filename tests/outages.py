"""Taking a test's cryptography service away and bringing it back, for every provider.

aws and vault lose theirs in the HTTP path (a fault proxy, `benchmarks.rigs.kms_proxy`);
pkcs11 loses its HSM: the token served by `p11-kit server` is stopped and started again on the
same socket (`workers.dev.softhsm.NetworkToken`), as a network HSM's client sees it.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import cast

import pytest

from benchmarks.rigs.kms_proxy import Mode
from tests.kit import Proc, fault_proxy, through
from workers.dev import DevEnv, softhsm

#: The p11-kit installation the HSM outage tests serve the token with (default Debian's).
#: Workers need p11-kit 0.25 or later there: 0.24's wire cannot carry CKM_AES_GCM.
P11KIT_PREFIX = Path(os.environ.get("P11KIT_PREFIX", "/usr"))
#: The calls a fault proxy counts, per provider and envpipe operation.
_PROXIED_CALLS = {"aws": {"unwrap": "Decrypt"}, "vault": {"unwrap": "/decrypt/"}}
#: How a worker logs a KMS call that failed: the retry of a call, or of minting a DEK.
_FAILED_CALL = re.compile(r"KMS (\w+) failed with |minting a data key failed")


def network_token(env: DevEnv, tmp_path: Path) -> softhsm.NetworkToken:
    """`env`'s SoftHSM2 token behind p11-kit server, with its socket and log in `tmp_path`."""
    conf, token = Path(env.variables["SOFTHSM2_CONF"]), env.variables["ENVPIPE_PKCS11_TOKEN"]
    socket, log = tmp_path / "hsm.sock", tmp_path / "p11-kit.log"
    return softhsm.NetworkToken(conf, token, socket, log, P11KIT_PREFIX)


class KmsOutage:
    """Takes `env`'s cryptography service away and back, the way each provider loses it.

    aws and vault: a fault proxy in the HTTP path, with its modes. pkcs11: the token served
    by p11-kit server (`network_token`), stopped and started again on the same socket, one
    mode, "down". Point workers at `variables`; `secret` must never appear in their logs.
    """

    def __init__(self, env: DevEnv, tmp_path: Path) -> None:
        self._env = env
        self._proxy = None if env.provider == "pkcs11" else fault_proxy(env)
        self._token = network_token(env, tmp_path) if self._proxy is None else None
        self.variables: dict[str, str] = {}
        pin_file = env.variables.get("ENVPIPE_PKCS11_PIN_FILE")
        self.secret = Path(pin_file).read_text(encoding="utf-8").strip() if pin_file else ""

    async def __aenter__(self) -> KmsOutage:
        if self._proxy is not None:
            await self._proxy.start()
            self.variables = through(self._env, self._proxy)
            return self
        assert self._token is not None
        await asyncio.to_thread(self._token.start)
        if not await asyncio.to_thread(self._token.carries_aes_gcm, self.secret):
            await asyncio.to_thread(self._token.stop)
            pytest.skip(
                f"the p11-kit under {P11KIT_PREFIX} cannot carry CKM_AES_GCM (0.24 cannot): "
                "set P11KIT_PREFIX to a p11-kit 0.25 or later"
            )
        self.variables = self._token.variables
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._proxy is not None:
            await self._proxy.close()
        elif self._token is not None:
            await asyncio.to_thread(self._token.stop)

    def modes(self, *proxy_modes: tuple[str, float]) -> tuple[tuple[str, float], ...]:
        """The outage modes to go through, each with how long to watch it."""
        if self._proxy is not None:
            return proxy_modes
        return (("down", max(seconds for _mode, seconds in proxy_modes)),)

    async def begin(self, mode: str = "internal") -> None:
        """The service fails as `mode` says (pkcs11: the HSM is down, whatever the mode)."""
        if self._proxy is not None:
            await self._proxy.set_mode(cast(Mode, mode))
        elif self._token is not None:
            await asyncio.to_thread(self._token.stop)

    async def end(self) -> None:
        """The service answers again."""
        if self._proxy is not None:
            await self._proxy.set_mode("pass")
        elif self._token is not None:
            await asyncio.to_thread(self._token.start)

    def failed_calls(self, worker: Proc, mode: str, operation: str | None = None) -> int:
        """Calls the worker made that met the outage: the proxy's count, or the HSM's log."""
        if self._proxy is not None:
            path = _PROXIED_CALLS[self._env.provider][operation] if operation else None
            return self._proxy.count(cast(Mode, mode), path)
        found = _FAILED_CALL.finditer(worker.log.read_text(errors="replace"))
        names = [call[1] or "generate_data_key" for call in found]
        return sum(1 for name in names if operation in (None, name))
