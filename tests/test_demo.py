"""`envpipe demo` end to end, as a user runs it, and the checks it relies on.

The demo starts its own broker and KMS, so the end-to-end tests run it as a subprocess and
then look for anything it left running: the services (whose working directory is the state
directory) and the two workers (whose PIDs it prints).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from pipeline.envelope import VERSION_HEADER
from tests import kit
from tests.providers import BROKER
from workers import topics
from workers.demo import samples
from workers.demo.verify import verify
from workers.dev import DevEnv
from workers.supervisor import wait_until

pytestmark = pytest.mark.broker  # the same tests against Tansu and Apache Kafka

REPO = Path(__file__).resolve().parents[1]


def _processes_in(folder: Path) -> list[int]:
    """PIDs of live processes whose working directory is `folder` (the dev services')."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if Path(cwd) == folder and kit.running(int(entry.name)):
            found.append(int(entry.name))
    return found


def _started_pids(stderr: str) -> list[int]:
    """The broker, KMS and worker PIDs the demo announced."""
    services = re.search(r"\(broker pid (\d+), kms pid (\d+)\)", stderr)
    workers = re.search(r"workers \(pids (\d+), (\d+);", stderr)
    assert services, stderr
    assert workers, stderr
    return [int(pid) for pid in services.groups() + workers.groups()]


def _command_of(pid: int) -> str:
    """A process's command line, for the message of a test that finds it still running."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


def _demo_command(records: int, state_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "workers.cli",
        "demo",
        "--records",
        str(records),
        "--state-dir",
        str(state_dir),
        "--broker",
        BROKER,
    ]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_passes_and_leaves_nothing_running(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    started = time.monotonic()
    done = subprocess.run(
        _demo_command(3_000, state_dir),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    elapsed = time.monotonic() - started

    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "PASSED: all 3,000 records identical (key, value, headers)" in out
    assert "3,000 (30 null keys, 3 tombstones)" in out
    rows = {line.split("  ")[1].strip(): line for line in out.splitlines() if line.startswith("  ")}
    for figure, source in [
        ("records", "producer"),
        ("encrypt worker throughput", "encrypt stats"),
        ("decrypt worker throughput", "decrypt stats"),
        ("latency produce→encrypted", "encrypt stats"),
        ("latency produce→decrypted", "decrypt stats"),
        ("seal, per record", "in-process"),
        ("open, per record", "in-process"),
        ("KMS calls, encrypt worker", "encrypt stats"),
        ("KMS calls, decrypt worker", "decrypt stats"),
        ("KMS calls, in-process", "in-process"),
        ("DEK cache hit ratio, encrypt", "encrypt stats"),
        ("DEK cache hit ratio, decrypt", "decrypt stats"),
        ("envelope overhead", "read-back"),
        ("dead-lettered", "decrypt stats"),
        ("verification", "read-back"),
    ]:
        assert f"  {source}  " in rows[figure], rows[figure]
        assert "n/a" not in rows[figure], rows[figure]
    assert re.search(
        r"p50 [\d.,]+ ms  p99 [\d.,]+ ms  p999 [\d.,]+ ms", rows["latency produce→decrypted"]
    )
    assert re.search(r"p50 [\d.,]+ µs  p99 [\d.,]+ µs", rows["seal, per record"])
    # One generate and one sign per DEK to seal, one unwrap per DEK to open: 3,000 records,
    # one DEK (resolving the configured aliases, at start and per DEK, is counted apart).
    assert "generate_data_key 1" in rows["KMS calls, encrypt worker"]
    assert "sign 1" in rows["KMS calls, encrypt worker"]
    assert "unwrap 1" in rows["KMS calls, decrypt worker"]
    assert rows["dead-lettered"].endswith("0 (read-back: the DLQ topic holds 0)")
    assert "sources:" in out
    assert "AWS_SECRET_ACCESS_KEY" not in out + done.stderr
    assert "envpipe-dev-not-a-secret" not in out + done.stderr  # the dev credentials

    assert not any(kit.running(pid) for pid in _started_pids(done.stderr))
    assert _processes_in(state_dir) == []
    assert not (state_dir / "state.json").exists()
    stats = orjson.loads((state_dir / "decrypt-stats.json").read_bytes())
    assert stats["records_out"] == 3_000
    assert elapsed < 120


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_stops_everything(tmp_path: Path, sig: signal.Signals) -> None:
    state_dir = tmp_path / "state"
    # A shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored
    # across exec: run from `make test &`, the demo could never see Ctrl-C. A Python handler
    # here becomes the default action in the child, as in a terminal.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            _demo_command(1_000_000, state_dir),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert process.stderr is not None
    seen = []
    for line in process.stderr:  # wait until it is producing, with everything running
        seen.append(line)
        if "started the encrypt and decrypt workers" in line:
            break
    time.sleep(3)
    pids = _started_pids("".join(seen))
    assert all(kit.running(pid) for pid in pids)

    process.send_signal(sig)
    _, rest = process.communicate(timeout=90)

    assert process.returncode == 128 + sig, "".join(seen) + rest
    assert "interrupted; the embedded services are stopped" in rest
    # A SIGKILLed JVM can take a moment to leave the process table while its memory is
    # unmapped; anything still there after that is a process the demo left behind.
    wait_until(lambda: not any(kit.running(pid) for pid in pids), 5)
    left = {pid: _command_of(pid) for pid in pids if kit.running(pid)}
    assert not left, left
    assert _processes_in(state_dir) == []


def test_sample_records_are_deterministic_and_varied() -> None:
    records = list(samples.sample_records(2_000))

    assert records == list(samples.sample_records(2_000))
    assert sum(value is None for _, value, _ in records) == 2  # tombstones, keyed
    assert sum(key is None for key, _, _ in records) == 20
    assert all(key is not None for key, value, _ in records if value is None)
    assert Counter(len(headers) for _, _, headers in records) == {2: 1_800, 0: 200}
    for _, value, _ in records:
        if value is not None:
            assert samples.PLAINTEXT_MARKER in value
            order = orjson.loads(value)
            assert order["total_cents"] == sum(i["qty"] * i["price_cents"] for i in order["items"])


async def test_verification_catches_changes_and_leaks(dev_env: DevEnv) -> None:
    """The verifier must fail on a changed header, a lost record and plaintext in the
    encrypted topic, or its PASSED would mean nothing."""
    prefix = f"verify-{uuid.uuid4().hex[:8]}"
    names = samples.Topics(
        source=f"{prefix}.src",
        encrypted=f"{prefix}.enc",
        decrypted=f"{prefix}.dec",
        dlq=f"{prefix}.dlq",
    )
    await topics.create_topics(dev_env.bootstrap_servers, names.all, partitions=1)
    source = list(samples.sample_records(5))
    decrypted = list(source)
    decrypted[1] = (decrypted[1][0], decrypted[1][1], (("content-type", b"text/plain"),))
    del decrypted[2]
    producer = AIOKafkaProducer(bootstrap_servers=dev_env.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for topic, records in ((names.source, source), (names.decrypted, decrypted)):
            for key, value, headers in records:
                await producer.send_and_wait(topic, value, key=key, headers=list(headers))
        leak = source[0][1]
        await producer.send_and_wait(names.encrypted, leak, headers=[VERSION_HEADER])
    finally:
        await producer.stop()

    result = await verify(dev_env.bootstrap_servers, names, expected=5)

    assert not result.passed
    assert (result.source, result.encrypted, result.decrypted) == (5, 1, 4)
    assert (result.missing, result.unexpected) == (2, 1)
    assert result.plaintext_in_encrypted == 1
    assert result.not_envelopes == 1
    assert result.describe().startswith("FAILED: expected 5; source 5, encrypted 1, decrypted 4")
