"""Apache Kafka 4 (KRaft) from Maven Central: fetching, one node with SASL, a failover cluster.

Runs only with ENVPIPE_TEST_BROKER=kafka (`make test-kafka`): it needs Java 17+, Maven and,
on first use, Maven Central. One node serves the whole module; the cluster test starts its
own three. Every test that starts Java checks that nothing of it is left running.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError

from pipeline.config import load_settings
from pipeline.errors import ConfigError, ServiceError
from workers import dev
from workers.broker_features import detect_features, supports_idempotence
from workers.dev import apache_kafka, kafka_jars
from workers.dev.apache_kafka import KafkaStarted, SaslUser
from workers.dev.apache_kafka_cluster import cluster
from workers.dev.ports import HOST, free_port
from workers.dev.service import Launcher
from workers.kafka_access import KafkaAccess, KafkaAuthorizationError

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(
        os.environ.get("ENVPIPE_TEST_BROKER") != "kafka",
        reason="Apache Kafka tests run with ENVPIPE_TEST_BROKER=kafka (make test-kafka)",
    ),
]

PASSWORD = "ENVPIPE_KAFKA_SASL_PASSWORD"
PASSWORD_FILE = "ENVPIPE_KAFKA_SASL_PASSWORD_FILE"
TOKEN_PROVIDER = "ENVPIPE_KAFKA_SASL_OAUTH_TOKEN_PROVIDER"


def java_processes(directory: Path) -> list[str]:
    """Command lines of Kafka JVMs started from `directory` (their properties file is in it)."""
    found = subprocess.run(
        ["pgrep", "-af", "kafka.Kafka"], capture_output=True, text=True, check=False
    )
    return [line for line in found.stdout.splitlines() if f"kafka.Kafka {directory}/" in line]


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """A measured figure, printed past pytest's capture (figures, not timed assertions)."""
    with capsys.disabled():
        print(f"\n    {line}", file=sys.stderr)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaStarted]:
    """The module's one Apache Kafka node (the jars are fetched into the user's cache once)."""
    directory = tmp_path_factory.mktemp("kafka-node")
    with apache_kafka.running(directory) as started:
        yield started
    assert java_processes(directory) == [], "the node's JVM outlived its fixture"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sasl_access(node: KafkaStarted, user: SaslUser, mechanism: str, **extra: str) -> KafkaAccess:
    environ = node.sasl.environ(user, mechanism) | extra
    return KafkaAccess.from_settings(load_settings(environ=environ))


async def round_trip(access: KafkaAccess, topic: str) -> list[bytes]:
    """Produce two records and read them back: what a login has to allow."""
    producer = AIOKafkaProducer(**access.client_kwargs(), acks="all")
    await producer.start()
    try:
        for value in (b"one", b"two"):
            await producer.send_and_wait(topic, value, partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, **access.client_kwargs(), auto_offset_reset="earliest")
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=10_000, max_records=2)
        return [record.value for records in batch.values() for record in records]
    finally:
        await consumer.stop()


# --- the jars ----------------------------------------------------------------------------------


def test_the_jars_are_cached_outside_the_checkout_and_verified(node: KafkaStarted) -> None:
    jars = kafka_jars.cache_dir(node.version)
    assert kafka_jars.verify(jars) is None
    assert not jars.is_relative_to(Path(__file__).parents[1])
    names = {path.name for path in jars.glob("*.jar")}
    assert f"kafka_2.13-{node.version}.jar" in names
    assert any(name.startswith("log4j-slf4j-impl-") for name in names)  # logs are not dropped
    listed = (jars / kafka_jars.MANIFEST).read_text().splitlines()
    assert len(listed) == len(names)


@pytest.fixture
def cache_copy(node: KafkaStarted, tmp_path: Path) -> Path:
    """A copy of the real cache under a temporary root, to damage at will."""
    shutil.copytree(
        kafka_jars.cache_dir(node.version), kafka_jars.cache_dir(node.version, tmp_path)
    )
    return tmp_path


def _corrupt(jars: Path) -> str:
    victim = next(iter(sorted(jars.glob("kafka-clients-*.jar"))))
    with victim.open("r+b") as jar:
        jar.seek(100)
        jar.write(b"\x00" * 16)
    return f"{victim.name} does not match its SHA-256"


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("corrupt", "does not match its SHA-256"),
        ("truncate", "does not match its SHA-256"),
        ("remove", "jar(s) missing"),
        ("extra", "not in SHA256SUMS"),
        ("no manifest", "SHA256SUMS is missing"),
    ],
)
def test_a_damaged_cache_is_detected(
    node: KafkaStarted, cache_copy: Path, damage: str, problem: str
) -> None:
    jars = kafka_jars.cache_dir(node.version, cache_copy)
    victim = jars / f"kafka-clients-{node.version}.jar"
    match damage:
        case "corrupt":
            _corrupt(jars)
        case "truncate":
            victim.write_bytes(victim.read_bytes()[:1000])  # a download cut short
        case "remove":
            victim.unlink()
        case "extra":
            (jars / "stray.jar").write_bytes(b"PK")
        case "no manifest":
            (jars / kafka_jars.MANIFEST).unlink()
    found = kafka_jars.verify(jars)
    assert found is not None
    assert problem in found


def test_a_corrupted_jar_is_fetched_again_not_used(
    node: KafkaStarted, cache_copy: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    jars = kafka_jars.cache_dir(node.version, cache_copy)
    original = (jars / kafka_jars.MANIFEST).read_text()
    problem = _corrupt(jars)
    assert kafka_jars.kafka_classpath(node.version, cache_copy) == jars
    assert kafka_jars.verify(jars) is None
    assert (jars / kafka_jars.MANIFEST).read_text() == original  # the same jars, intact
    err = capfd.readouterr().err
    assert problem in err
    assert "fetching Apache Kafka" in err
    assert [
        p.name for p in cache_copy.iterdir() if p.name.startswith(".kafka-") and p.is_dir()
    ] == []


def test_a_failed_fetch_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(ServiceError) as caught:
        kafka_jars.kafka_classpath("4.99.0", tmp_path)
    assert "could not fetch org.apache.kafka:kafka_2.13:4.99.0" in str(caught.value)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_without_java_the_start_fails_at_once_naming_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    launcher = Launcher(tmp_path, lambda _records: None)
    began = time.monotonic()
    with pytest.raises(ServiceError) as caught:
        apache_kafka.start(launcher, free_port(), 30.0)
    assert time.monotonic() - began < 1.0
    assert "no `java` on PATH" in str(caught.value)
    assert "apt-get install openjdk-17-jre-headless" in str(caught.value)
    assert launcher.children == []


def test_an_old_java_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin" / "java"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'openjdk version \"11.0.20\" 2023-07-18' >&2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    with pytest.raises(ServiceError) as caught:
        kafka_jars.java_binary()
    assert "needs Java 17+" in str(caught.value)
    assert "11.0.20" in str(caught.value)


def test_without_maven_a_fetch_fails_at_once_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    java = shutil.which("java")
    assert java is not None
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "java").symlink_to(java)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(ServiceError) as caught:
        kafka_jars.kafka_classpath(root=tmp_path / "cache")
    assert "apt-get install maven" in str(caught.value)


# --- one node ----------------------------------------------------------------------------------


def test_the_node_started_and_reports_how_long_it_took(
    node: KafkaStarted, capsys: pytest.CaptureFixture[str]
) -> None:
    assert node.version == apache_kafka.kafka_version()
    assert node.bootstrap_servers.startswith(f"{HOST}:")
    report(capsys, f"Kafka {node.version} node ready in {node.start_seconds:.1f} s after spawn")


async def test_produce_and_consume_with_headers(node: KafkaStarted) -> None:
    topic = unique("plain")
    producer = AIOKafkaProducer(bootstrap_servers=node.bootstrap_servers, acks="all")
    await producer.start()
    try:
        sent = [
            await producer.send_and_wait(
                topic, f"v{i}".encode(), key=f"k{i}".encode(), headers=[("h", f"{i}".encode())]
            )
            for i in range(30)
        ]
        assert len(await producer.partitions_for(topic)) == 3  # created on use, as on Tansu
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=node.bootstrap_servers,
        group_id=unique("g"),
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        got: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []
        deadline = time.monotonic() + 20
        while len(got) < len(sent) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got += [(r.key, r.value, list(r.headers)) for r in records]
    finally:
        await consumer.stop()
    assert sorted(got) == sorted(
        (f"k{i}".encode(), f"v{i}".encode(), [("h", f"{i}".encode())]) for i in range(30)
    )


async def test_an_idempotent_producer_works(node: KafkaStarted) -> None:
    topic = unique("idem")
    producer = AIOKafkaProducer(
        bootstrap_servers=node.bootstrap_servers, enable_idempotence=True, request_timeout_ms=10_000
    )
    await producer.start()
    try:
        async with asyncio.timeout(20):
            results = await asyncio.gather(
                *[await producer.send(topic, str(i).encode(), partition=0) for i in range(100)]
            )
    finally:
        await producer.stop()
    assert [r.offset for r in results] == list(range(100))


async def read_all(bootstrap: str, topic: str, isolation: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        isolation_level=isolation,
    )
    await consumer.start()
    try:
        values: list[bytes] = []
        quiet = 0
        while quiet < 3:
            batch = await consumer.getmany(timeout_ms=500)
            quiet = 0 if batch else quiet + 1
            values += [r.value for records in batch.values() for r in records]
        return values
    finally:
        await consumer.stop()


async def test_transactions_commit_and_abort(node: KafkaStarted) -> None:
    topic = unique("txn")
    producer = AIOKafkaProducer(
        bootstrap_servers=node.bootstrap_servers, transactional_id=unique("tx")
    )
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, b"committed-1", partition=0)
            await producer.send(topic, b"committed-2", partition=0)
        await producer.begin_transaction()
        await producer.send(topic, b"aborted", partition=0)
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(topic, b"committed-3", partition=0)
    finally:
        await producer.stop()
    committed = await read_all(node.bootstrap_servers, topic, "read_committed")
    everything = await read_all(node.bootstrap_servers, topic, "read_uncommitted")
    assert committed == [b"committed-1", b"committed-2", b"committed-3"]
    assert b"aborted" in everything  # it was written, and read_committed skipped it


async def test_feature_detection_kafka_yes_tansu_no(node: KafkaStarted, tmp_path: Path) -> None:
    kafka = await detect_features(node.bootstrap_servers)
    assert (kafka.idempotence, kafka.transactions) == (True, True)
    env = dev.up(tmp_path / "tansu")
    try:
        assert not await supports_idempotence(env.bootstrap_servers)
        tansu = await detect_features(env.bootstrap_servers)
    finally:
        dev.down(tmp_path / "tansu")
    assert (tansu.idempotence, tansu.transactions) == (False, False)
    assert "no idempotent producer id" in tansu.reason


# --- SASL ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_logins_work_through_kafka_access(node: KafkaStarted, mechanism: str) -> None:
    access = sasl_access(node, node.sasl.admin, mechanism)
    assert access.security_protocol == "SASL_PLAINTEXT"
    assert await round_trip(access, unique(mechanism.lower())) == [b"one", b"two"]


async def test_a_password_file_logs_in(node: KafkaStarted, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(node.sasl.admin.password + "\n")
    environ = node.sasl.environ(node.sasl.admin)
    del environ[PASSWORD]
    access = KafkaAccess.from_settings(
        load_settings(environ={**environ, PASSWORD_FILE: str(secret)})
    )
    assert await round_trip(access, unique("file")) == [b"one", b"two"]


async def start_failure(access: KafkaAccess) -> ConfigError:
    producer = AIOKafkaProducer(**access.client_kwargs(), request_timeout_ms=5000)
    try:
        await producer.start()
    except KafkaError as exc:
        return await access.connection_error(exc)
    finally:
        await producer.stop()
    pytest.fail("the producer started")


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
@pytest.mark.parametrize("source", [PASSWORD, PASSWORD_FILE])
async def test_a_wrong_password_names_the_setting_and_never_shows(
    node: KafkaStarted,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mechanism: str,
    source: str,
) -> None:
    wrong = "wrong-" + node.sasl.admin.password
    environ = node.sasl.environ(node.sasl.admin, mechanism)
    if source == PASSWORD_FILE:
        (tmp_path / "pw").write_text(wrong)
        del environ[PASSWORD]
        environ[PASSWORD_FILE] = str(tmp_path / "pw")
    else:
        environ[PASSWORD] = wrong
    with caplog.at_level(logging.DEBUG):
        access = KafkaAccess.from_settings(load_settings(environ=environ))
        error = await start_failure(access)
        await round_trip(sasl_access(node, node.sasl.admin, mechanism), unique("ok"))
    assert error.setting == source
    assert f"refused the {mechanism} login of user 'admin'" in str(error)
    for secret in (wrong, node.sasl.admin.password):
        assert secret not in str(error)
        assert secret not in repr(access)
        assert secret not in caplog.text  # aiokafka logs SASL payloads at DEBUG: redacted


async def test_a_plaintext_client_on_the_sasl_port_is_told_to_log_in(node: KafkaStarted) -> None:
    error = await start_failure(KafkaAccess(node.sasl.bootstrap_servers))
    assert error.setting == "ENVPIPE_KAFKA_SECURITY_PROTOCOL"
    assert "as a SASL listener does" in str(error)


async def test_a_sasl_client_on_the_plaintext_port_is_told_so(node: KafkaStarted) -> None:
    access = sasl_access(
        node, node.sasl.admin, "SCRAM-SHA-256", ENVPIPE_BOOTSTRAP_SERVERS=node.bootstrap_servers
    )
    error = await start_failure(access)
    assert error.setting == "ENVPIPE_KAFKA_SECURITY_PROTOCOL"
    assert "is not a SASL listener" in str(error)


async def test_a_user_without_acls_is_refused_with_topic_and_operation(node: KafkaStarted) -> None:
    topic = unique("guarded")
    access = sasl_access(node, node.sasl.user, "SCRAM-SHA-512")
    producer = AIOKafkaProducer(**access.client_kwargs(), request_timeout_ms=5000)
    await producer.start()  # authenticated: the login itself is fine
    try:
        with pytest.raises(TopicAuthorizationFailedError) as caught:
            await producer.send_and_wait(topic, b"x")
    finally:
        await producer.stop()
    error = access.authorization_error(caught.value, operation="WRITE", topic=topic)
    assert isinstance(error, KafkaAuthorizationError)
    assert (error.principal, error.operation) == ("User:envpipe", "WRITE")
    assert f"refuses WRITE on topic '{topic}' to User:envpipe" in str(error)
    assert node.sasl.user.password not in str(error)


def _b64(claims: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")


class UnsignedAdminToken(AbstractTokenProvider):  # type: ignore[misc]
    """An unsigned JWT for `admin`: what the dev node's unsecured OAUTHBEARER validator takes."""

    async def token(self) -> str:
        now = int(time.time())
        return f"{_b64({'alg': 'none'})}.{_b64({'sub': 'admin', 'iat': now, 'exp': now + 600})}."


class GarbageToken(AbstractTokenProvider):  # type: ignore[misc]
    async def token(self) -> str:
        return "not-a-jwt"


async def test_oauthbearer_with_a_token_provider(node: KafkaStarted) -> None:
    environ = {
        "ENVPIPE_BOOTSTRAP_SERVERS": node.sasl.bootstrap_servers,
        "ENVPIPE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "ENVPIPE_KAFKA_SASL_MECHANISM": "OAUTHBEARER",
    }
    good = KafkaAccess.from_settings(
        load_settings(environ={**environ, TOKEN_PROVIDER: f"{__name__}:UnsignedAdminToken"})
    )
    assert await round_trip(good, unique("oauth")) == [b"one", b"two"]
    bad = KafkaAccess.from_settings(
        load_settings(environ={**environ, TOKEN_PROVIDER: f"{__name__}:GarbageToken"})
    )
    error = await start_failure(bad)
    assert error.setting == TOKEN_PROVIDER
    assert f"{__name__}:GarbageToken" in str(error)
    assert "invalid_token" in str(error)  # the broker's RFC 7628 reason


# --- dev up, failures, the cluster ---------------------------------------------------------------


def test_dev_up_with_the_kafka_broker(tmp_path: Path) -> None:
    env = dev.up(tmp_path, broker="kafka")
    try:
        assert env.broker == "kafka"
        assert java_processes(tmp_path)
        assert "ENVPIPE_KAFKA_SASL_PASSWORD=" in (tmp_path / "kafka-sasl.env").read_text()
        assert (tmp_path / "kafka-sasl.env").stat().st_mode & 0o077 == 0
    finally:
        assert dev.down(tmp_path)
    assert java_processes(tmp_path) == []


def test_a_node_that_cannot_start_is_stopped_and_explained(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServiceError) as caught:
            apache_kafka.start(Launcher(tmp_path, lambda _records: None), port, 60.0)
    assert "Apache Kafka broker exited" in str(caught.value)
    assert java_processes(tmp_path) == []


async def test_a_cluster_survives_losing_the_leader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = "failover"
    with cluster(tmp_path) as kafka:
        report(capsys, f"3-node cluster ready in {kafka.start_seconds:.1f} s after spawn")
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, 3)])  # RF 3, min ISR 2 by default
        finally:
            await admin.close()
        leader = -1
        while leader < 0:
            leader = await kafka.leader_of(topic, 0)
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
        await producer.start()
        acked: list[tuple[float, int]] = []
        try:
            for i in range(300):
                if i == 100:
                    killed_at = time.monotonic()
                    kafka.stop_node(leader, kill=True)  # a crash, not a controlled shutdown
                async with asyncio.timeout(60):
                    meta = await producer.send_and_wait(topic, str(i).encode(), partition=0)
                acked.append((time.monotonic(), meta.offset))
                await asyncio.sleep(0.005)
        finally:
            await producer.stop()
        new_leader = await kafka.leader_of(topic, 0)
        assert new_leader not in (-1, leader)
        stall = acked[100][0] - killed_at
        report(capsys, f"leader {leader} SIGKILLed: produce (acks=all) stalled {stall:.1f} s")
        values = await read_all(kafka.bootstrap_servers, topic, "read_committed")
        assert values == [str(i).encode() for i in range(300)]  # nothing lost, in order
        kafka.start_node(leader)
        assert sorted(kafka.running()) == [1, 2, 3]
    assert java_processes(tmp_path) == []
