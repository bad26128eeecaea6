"""The three cryptography services for the tests: AWS KMS (moto), Vault (OpenBao), SoftHSM2.

The session shares one Tansu broker (from the aws `dev_env`); the vault and pkcs11
environments add their service beside it, so a test parametrized over providers runs the
same workers against each. SoftHSM2 reads SOFTHSM2_CONF once per process, so the session
has exactly one SoftHSM2 configuration (`start_hsm`), which every pkcs11 test uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pkcs11

from workers.dev import DevEnv, openbao, softhsm
from workers.dev.ports import free_port
from workers.dev.service import KmsStarted, Launcher

#: The broker the session's tests run against: Tansu (`make test`) or Apache Kafka
#: (`make test-kafka`, which sets ENVPIPE_TEST_BROKER=kafka). Tests marked `broker` are the
#: broker-facing ones: the same tests, run against each.
BROKER = os.environ.get("ENVPIPE_TEST_BROKER", "tansu")
#: Every provider against Tansu; against Apache Kafka the broker is what is under test.
PROVIDERS = ("aws", "vault", "pkcs11") if BROKER == "tansu" else ("aws",)
#: a second token on the session's SoftHSM2, never logged in by a fixture (PIN tests)
PIN_TOKEN = "envpipe-pin-test"
PIN_TOKEN_PIN = "pin-test-4321"


@dataclass(frozen=True)
class Hsm:
    """The session's SoftHSM2: its module, config, and the dev token's PIN."""

    module: str
    conf: str
    pin: str
    pin_file: str
    started: KmsStarted

    def token(self, label: str = softhsm.TOKEN_LABEL) -> pkcs11.Token:
        return pkcs11.lib(self.module).get_token(token_label=label)


def start_hsm(state: Path) -> Hsm:
    """The dev token (`workers.dev.softhsm`) and a PIN-test token under one SOFTHSM2_CONF,
    which this process then uses for good (set before the first `pkcs11.lib()`)."""
    module = softhsm.find_module()
    softhsm.find_util()
    started = softhsm.start(Launcher(state, lambda _records: None), 0, 30.0)
    conf = started.variables["SOFTHSM2_CONF"]
    softhsm.init_token(Path(conf), PIN_TOKEN, PIN_TOKEN_PIN, 30.0)
    if module in pkcs11._loaded and os.environ.get("SOFTHSM2_CONF") != conf:
        raise RuntimeError("libsofthsm2 was initialised earlier in this process")
    os.environ["SOFTHSM2_CONF"] = conf
    pin_file = started.variables["ENVPIPE_PKCS11_PIN_FILE"]
    pin = Path(pin_file).read_text(encoding="utf-8").rstrip("\n")
    return Hsm(module, conf, pin, pin_file, started)


def start_vault(state: Path) -> tuple[KmsStarted, Launcher]:
    """An OpenBao dev server with the dev keys; stop it with the launcher's records."""
    launcher = Launcher(state, lambda _records: None)
    return openbao.start(launcher, free_port(), 30.0), launcher


def beside(broker: DevEnv, started: KmsStarted, pids: dict[str, int] | None = None) -> DevEnv:
    """A dev environment of `started`'s provider on `broker`'s broker."""
    return DevEnv(
        provider=started.provider,
        broker=broker.broker,
        bootstrap_servers=broker.bootstrap_servers,
        kms_key_id=started.kms_key_id,
        signing_key_id=started.signing_key_id,
        kms_key_canonical=started.kms_key_canonical,
        signing_key_canonical=started.signing_key_canonical,
        variables=started.variables,
        pids={"broker": broker.broker_pid, **(pids or {})},
    )
