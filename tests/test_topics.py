"""`workers.topics`: the topics envpipe creates, and whole-topic scans."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.errors import TopicError
from tests import kit
from workers import topics
from workers.dev import DevEnv
from workers.kafka_access import KafkaAccess


async def _partitions(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        return len(described["partitions"])
    finally:
        await admin.close()


async def test_outputs_are_created_like_the_source(dev_env: DevEnv) -> None:
    bootstrap = dev_env.bootstrap_servers
    source, existing, missing = kit.name("src"), kit.name("have"), kit.name("new")
    await kit.create_topic(bootstrap, source, partitions=5)
    await kit.create_topic(bootstrap, existing, partitions=2)
    await topics.ensure_outputs(KafkaAccess(bootstrap), source, [existing, missing])
    assert await _partitions(bootstrap, missing) == 5  # a key keeps its partition number
    assert await _partitions(bootstrap, existing) == 2  # an operator's topic is left alone


async def test_a_missing_source_leaves_outputs_to_the_broker(dev_env: DevEnv) -> None:
    bootstrap = dev_env.bootstrap_servers
    output = kit.name("later")
    await topics.ensure_outputs(KafkaAccess(bootstrap), kit.name("absent"), [output])
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        assert output not in await admin.list_topics()
    finally:
        await admin.close()


async def test_the_keys_topic_is_created_compacted(dev_env: DevEnv) -> None:
    bootstrap = dev_env.bootstrap_servers
    dest, keys = kit.name("enc"), kit.name("enc-keys")
    await kit.create_topic(bootstrap, dest)
    await topics.ensure_keys_topic(KafkaAccess(bootstrap), keys, like=dest)
    assert await _partitions(bootstrap, keys) == 1
    await topics.ensure_keys_topic(KafkaAccess(bootstrap), keys, like=dest)  # idempotent


async def test_scan_reads_to_the_end_and_names_a_missing_topic(dev_env: DevEnv) -> None:
    bootstrap = dev_env.bootstrap_servers
    topic = kit.name("scan")
    await kit.create_topic(bootstrap, topic)
    await kit.produce(bootstrap, topic, kit.keyed(250, 50))
    batches = [batch async for batch in topics.scan(bootstrap, topic, client_id="t")]
    assert sum(len(batch) for batch in batches) == 250
    limited = [r async for b in topics.scan(bootstrap, topic, client_id="t", limit=7) for r in b]
    assert len(limited) == 7
    with pytest.raises(TopicError, match="does not exist"):
        async for _ in topics.scan(bootstrap, kit.name("nope"), client_id="t"):
            pass


async def test_a_topic_that_already_exists_is_neither_created_nor_failed(
    dev_env: DevEnv,
) -> None:
    bootstrap = dev_env.bootstrap_servers
    topic = kit.name("twice")
    await topics.create_topics(bootstrap, [topic], 2)
    await topics.create_topics(bootstrap, [topic], 2)  # another worker was first: fine
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        assert await topics.create_with(admin, [topic], 2) == ([], [])
    finally:
        await admin.close()
