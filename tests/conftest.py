"""Shared fixtures: one embedded broker and KMS per session, so tests need nothing running."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.kit import Workers
from workers import dev


@pytest.fixture(scope="session")
def dev_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state directory of the session's dev services (dev.env, logs, state.json)."""
    return tmp_path_factory.mktemp("dev-services")


@pytest.fixture(scope="session")
def dev_env(dev_state_dir: Path) -> Iterator[dev.DevEnv]:
    """The session's Tansu broker and moto KMS, started once and stopped at the end."""
    env = dev.up(dev_state_dir)
    try:
        yield env
    finally:
        dev.down(dev_state_dir)


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
