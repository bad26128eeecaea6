"""The v2 keys topic on the embedded broker: `KeysTopicWriter`, `KeysTopicReader`, and the
encrypt worker's start-up check (`workers.topics.ensure_keys_topic`).

Tansu answers DescribeConfigs with a topic's `cleanup.policy` when the topic was created
with one (and with nothing for a topic created without configs), so the "exists but not
compacted" refusal is tested on the real broker; what a broker reports in other shapes
(Apache Kafka lists every default) is tested against a fake admin client. About 5 s.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError

from pipeline.errors import ConfigError
from pipeline.keys_topic import InMemoryHeaders, KeysTopicReader, KeysTopicWriter
from tests import kit
from workers import topics
from workers.dev import DevEnv
from workers.kafka_access import KafkaAccess
from workers.supervisor import until

pytestmark = pytest.mark.timeout(60)


def fake_headers(count: int) -> dict[bytes, bytes]:
    """`count` (dek_id, header bytes) pairs; the reader stores bytes, it does not parse them."""
    return {secrets.token_bytes(16): b"header " + secrets.token_bytes(360) for _ in range(count)}


async def describe_policy(bootstrap: str, topic: str) -> str | None:
    """The topic's cleanup.policy as the broker reports it (None if it does not say)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)]
        )
    finally:
        await admin.close()
    entries = {entry[0]: entry[1] for entry in response.resources[0][4]}
    return entries.get("cleanup.policy")


async def create_with_policy(bootstrap: str, topic: str, policy: str | None) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        configs = {} if policy is None else {"cleanup.policy": policy}
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs=configs)])
    finally:
        await admin.close()


async def create_keys_topic(bootstrap: str, topic: str) -> None:
    """The keys topic as an encrypt worker creates it (compacted)."""
    await topics.ensure_keys_topic(KafkaAccess.of(bootstrap), topic, like=topic)


@contextlib.asynccontextmanager
async def reader_of(bootstrap: str, topic: str, **options: Any) -> AsyncIterator[KeysTopicReader]:
    reader = await KeysTopicReader.open(topic, bootstrap_servers=bootstrap, **options)
    try:
        yield reader
    finally:
        await reader.close()


async def test_a_restarted_reader_loads_every_header_then_follows(dev_env: DevEnv) -> None:
    bootstrap = dev_env.bootstrap_servers
    topic = kit.name("keys")
    await create_keys_topic(bootstrap, topic)
    assert await describe_policy(bootstrap, topic) == "compact"
    headers = fake_headers(500)
    writer = await KeysTopicWriter.open(topic, bootstrap_servers=bootstrap)
    try:
        for dek_id, header in headers.items():
            await writer.publish(dek_id, header)
        assert writer.published == len(headers)

        async with reader_of(bootstrap, topic) as reader:  # a reader started after them all
            assert (len(reader), reader.loaded) == (len(headers), len(headers))
            assert all(reader.get(dek_id) == header for dek_id, header in headers.items())
            assert reader.get(secrets.token_bytes(16)) is None

            late_id, late = next(iter(fake_headers(1).items()))
            await writer.publish(late_id, late)
            assert await until(lambda: reader.get(late_id) == late, 10, interval=0.05)

            # One dek_id never names two headers: the first one stays.
            first_id, first = next(iter(headers.items()))
            await writer.publish(first_id, b"a different header")
            assert await until(lambda: reader.conflicts == 1, 10, interval=0.05)
            assert reader.get(first_id) == first
    finally:
        await writer.close()


async def test_tombstones_and_keyless_records_are_not_headers(dev_env: DevEnv) -> None:
    bootstrap = dev_env.bootstrap_servers
    topic = kit.name("keys-stray")
    await create_keys_topic(bootstrap, topic)
    (dek_id, header), (other_id, _) = fake_headers(2).items()
    await kit.produce(
        bootstrap,
        topic,
        [
            kit.Rec(dek_id, header),
            kit.Rec(dek_id, None),
            kit.Rec(other_id, None),
            kit.Rec(None, b"x"),
        ],
    )
    async with reader_of(bootstrap, topic, follow=False) as reader:
        assert len(reader) == 1
        assert reader.get(dek_id) == header  # a tombstone read later does not drop it
        assert reader.get(other_id) is None


async def test_the_reader_keeps_at_most_max_headers_dropping_the_oldest(
    dev_env: DevEnv, caplog: pytest.LogCaptureFixture
) -> None:
    bootstrap = dev_env.bootstrap_servers
    topic = kit.name("keys-full")
    await create_keys_topic(bootstrap, topic)
    headers = list(fake_headers(8).items())
    await kit.produce(bootstrap, topic, [kit.Rec(dek_id, value) for dek_id, value in headers])
    with caplog.at_level(logging.WARNING, logger="envpipe.keys"):
        async with reader_of(bootstrap, topic, follow=False, max_headers=5) as reader:
            assert len(reader) == 5
            assert [reader.get(dek_id) for dek_id, _ in headers[:3]] == [None] * 3
            assert all(reader.get(dek_id) == value for dek_id, value in headers[3:])
    assert "header_missing" in caplog.text  # said once, with what it will cost


async def test_a_reader_started_before_the_topic_exists_finds_it(dev_env: DevEnv) -> None:
    bootstrap = dev_env.bootstrap_servers
    topic = kit.name("keys-later")
    async with reader_of(bootstrap, topic) as reader:
        assert len(reader) == 0
        await create_keys_topic(bootstrap, topic)
        (dek_id, header), *_ = fake_headers(1).items()
        writer = await KeysTopicWriter.open(topic, bootstrap_servers=bootstrap)
        try:
            await writer.publish(dek_id, header)
        finally:
            await writer.close()
        assert await until(lambda: reader.get(dek_id) == header, 20, interval=0.1)


async def test_in_memory_headers_keep_the_first_header_too() -> None:
    headers = InMemoryHeaders()
    await headers.publish(b"d" * 16, b"first")
    await headers.publish(b"d" * 16, b"second")
    assert (headers.get(b"d" * 16), len(headers)) == (b"first", 1)


# --- ensure_keys_topic on the embedded broker ------------------------------------------------


async def test_ensure_keys_topic_refuses_a_topic_that_is_not_compacted(dev_env: DevEnv) -> None:
    bootstrap = dev_env.bootstrap_servers
    access = KafkaAccess.of(bootstrap)
    deleting, both = kit.name("keys-delete"), kit.name("keys-both")
    await create_with_policy(bootstrap, deleting, "delete")
    await create_with_policy(bootstrap, both, "compact,delete")
    assert await describe_policy(bootstrap, deleting) == "delete"  # Tansu reports it

    with pytest.raises(ConfigError) as refused:
        await topics.ensure_keys_topic(access, deleting, like=deleting)
    message = str(refused.value)
    assert message.startswith("ENVPIPE_KEYS_TOPIC")
    assert deleting in message
    assert "cleanup.policy=delete" in message
    await topics.ensure_keys_topic(access, both, like=both)  # compacted (and deleting): fine


async def test_ensure_keys_topic_warns_when_the_broker_does_not_say(
    dev_env: DevEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """Tansu reports nothing for a topic created without configs: accepted, with a warning."""
    bootstrap = dev_env.bootstrap_servers
    topic = kit.name("keys-unsaid")
    await create_with_policy(bootstrap, topic, None)
    assert await describe_policy(bootstrap, topic) is None
    with caplog.at_level(logging.WARNING, logger="envpipe.topics"):
        await topics.ensure_keys_topic(KafkaAccess.of(bootstrap), topic, like=topic)
    assert "ENVPIPE_KEYS_TOPIC" in caplog.text
    assert topic in caplog.text


# --- ensure_keys_topic's decision, against a fake admin --------------------------------------


@dataclass
class FakeAdmin:
    """The admin calls ensure_keys_topic makes, answered from a dict of topic -> configs."""

    configs: dict[str, list[tuple[str, str]]]
    replicas: int = 3
    create_error: tuple[int, str] | None = None
    fail_with: Exception | None = None
    created: list[Any] = field(default_factory=list)

    async def describe_topics(self) -> list[dict[str, Any]]:
        if self.fail_with is not None:
            raise self.fail_with
        partition = {"partition": 0, "replicas": list(range(self.replicas))}
        return [{"topic": name, "partitions": [partition]} for name in self.configs]

    async def create_topics(self, new: list[NewTopic]) -> Any:
        self.created.extend(new)
        code, message = self.create_error or (0, None)
        return _Response([(topic.name, code, message) for topic in new])

    async def describe_configs(self, resources: list[ConfigResource]) -> list[Any]:
        entries = [(name, value, False, 5, False, []) for name, value in self.configs["keys"]]
        return [_Response(resources=[(0, "", 2, "keys", entries)])]

    async def describe_cluster(self) -> dict[str, Any]:
        return {"brokers": [{}] * self.replicas}


@dataclass
class _Response:
    topic_errors: list[Any] = field(default_factory=list)
    resources: list[Any] = field(default_factory=list)


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> FakeAdmin:
    fake = FakeAdmin(configs={"orders.enc": []})

    @contextlib.asynccontextmanager
    async def fake_admin(kafka: KafkaAccess) -> AsyncIterator[FakeAdmin]:
        yield fake

    monkeypatch.setattr(topics, "_admin", fake_admin)
    return fake


async def _ensure() -> None:
    await topics.ensure_keys_topic(KafkaAccess.of("127.0.0.1:1"), "keys", like="orders.enc")


async def test_a_missing_keys_topic_is_created_compacted_like_the_encrypted_topic(
    admin: FakeAdmin,
) -> None:
    await _ensure()
    (created,) = admin.created
    assert (created.name, created.num_partitions, created.replication_factor) == ("keys", 1, 3)
    assert created.topic_configs == {"cleanup.policy": "compact"}


@pytest.mark.parametrize(
    ("policy", "refused"),
    [("delete", True), ("compact", False), ("delete,compact", False), ("compact,delete", False)],
)
async def test_an_existing_keys_topic_must_be_compacted(
    admin: FakeAdmin, policy: str, refused: bool
) -> None:
    # Apache Kafka lists every config, defaults included: `delete` is its default.
    admin.configs["keys"] = [("retention.ms", "604800000"), ("cleanup.policy", policy)]
    if refused:
        with pytest.raises(ConfigError, match=r"^ENVPIPE_KEYS_TOPIC.*cleanup\.policy=delete"):
            await _ensure()
    else:
        await _ensure()
    assert admin.created == []


async def test_keys_topic_failures_name_the_setting(admin: FakeAdmin) -> None:
    admin.create_error = (44, "Policy violation: no compacted topics here")
    with pytest.raises(ConfigError, match=r"^ENVPIPE_KEYS_TOPIC.*cannot create.*Policy violation"):
        await _ensure()
    admin.fail_with = KafkaConnectionError("the broker went away")
    with pytest.raises(ConfigError, match=r"^ENVPIPE_KEYS_TOPIC.*cannot check the keys topic"):
        await _ensure()
