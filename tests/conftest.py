"""Shared fixtures: one broker and every cryptography service per session, started on demand.

Tests need nothing running: the session's Tansu broker and moto KMS start with the first test
that asks for `dev_env`; OpenBao and the SoftHSM2 token join on the same broker when a test
asks for `vault_env` or `pkcs11_env`; `provider_env` runs a test once per provider.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.kit import Workers
from tests.providers import BROKER, PROVIDERS, Hsm, beside, start_hsm, start_vault
from workers import dev


def pytest_configure(config: pytest.Config) -> None:
    """Against Apache Kafka, fail at once, naming what to install, if Java or Maven is missing."""
    if BROKER == "kafka":
        from workers.dev import kafka_jars

        kafka_jars.java_binary()
        kafka_jars.maven_binary()
    elif BROKER != "tansu":
        raise pytest.UsageError(f"ENVPIPE_TEST_BROKER={BROKER!r}: must be tansu or kafka")


@pytest.fixture(autouse=True)
def _own_loggers_restored() -> Iterator[None]:
    """A test that runs a command in process (`inspect.run`, say) reconfigures envpipe's
    loggers; put them back, so the next test's caplog sees what it expects."""
    names = ("envpipe", "pipeline", "workers", "")
    saved = {
        name: (logging.getLogger(name).level, logging.getLogger(name).handlers[:]) for name in names
    }
    yield
    for name, (level, handlers) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).handlers[:] = handlers


@pytest.fixture(scope="session")
def dev_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state directory of the session's dev services (dev.env, logs, state.json)."""
    return tmp_path_factory.mktemp("dev-services")


@pytest.fixture(scope="session")
def dev_env(dev_state_dir: Path) -> Iterator[dev.DevEnv]:
    """The session's broker (Tansu, or Apache Kafka under `make test-kafka`) and moto KMS,
    started once and stopped at the end."""
    env = dev.up(dev_state_dir, broker=BROKER, ready_timeout=120)
    try:
        yield env
    finally:
        dev.down(dev_state_dir)


@pytest.fixture(scope="session")
def vault_env(
    dev_env: dev.DevEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dev.DevEnv]:
    """OpenBao's transit engine with the dev keys, beside the session's broker."""
    started, launcher = start_vault(tmp_path_factory.mktemp("openbao"))
    try:
        yield beside(dev_env, started, {"kms": launcher.records[0].pid})
    finally:
        for record in launcher.records:
            record.stop()


@pytest.fixture(scope="session")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Hsm:
    """The session's one SoftHSM2 configuration: the dev token and a PIN-test token."""
    try:
        return start_hsm(tmp_path_factory.mktemp("softhsm"))
    except Exception as exc:
        pytest.fail(f"SoftHSM2 is needed (apt-get install softhsm2): {exc}")


@pytest.fixture(scope="session")
def pkcs11_env(dev_env: dev.DevEnv, hsm: Hsm) -> dev.DevEnv:
    """The session's SoftHSM2 dev token, beside the session's broker."""
    return beside(dev_env, hsm.started)


@pytest.fixture(params=PROVIDERS)
def provider_env(request: pytest.FixtureRequest) -> dev.DevEnv:
    """Each provider's environment in turn: the test runs once per provider."""
    name = "dev_env" if request.param == "aws" else f"{request.param}_env"
    env: dev.DevEnv = request.getfixturevalue(name)
    return env


@pytest.fixture
def aws_env(dev_env: dev.DevEnv) -> dict[str, str]:
    """dev.env's variables, to pass as a subprocess's environment (os.environ is left alone)."""
    return dev_env.as_environ()


@pytest.fixture
async def workers(dev_env: dev.DevEnv, tmp_path: Path) -> AsyncIterator[Workers]:
    """Worker subprocesses against the session's services; any left running are killed."""
    pool = Workers(dev_env, tmp_path)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def provider_workers(provider_env: dev.DevEnv, tmp_path: Path) -> AsyncIterator[Workers]:
    """`workers`, against `provider_env`'s service."""
    pool = Workers(provider_env, tmp_path)
    try:
        yield pool
    finally:
        await pool.close()
