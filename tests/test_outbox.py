"""`workers.outbox`: one producer batch per partition, with `send()`'s partitioning and limits."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from pipeline.errors import RecordTooLarge
from tests import kit
from workers import outbox
from workers.dev import DevEnv
from workers.outbox import Outbox


async def test_records_keep_send_s_partition_and_their_order(dev_env: DevEnv) -> None:
    bootstrap = dev_env.bootstrap_servers
    topic = kit.name("outbox")
    await kit.create_topic(bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        outbox = Outbox(producer, max_request_size=1 << 20)
        records = [(f"key-{n % 17}".encode(), f"value-{n}".encode()) for n in range(500)]
        for key, value in records:
            await outbox.add(topic, key, value, None, [("h", b"1")])
        futures = await outbox.flush()
        assert len(futures) <= 3  # one batch per partition (they fit)
        for future in futures:
            await future
    finally:
        await producer.stop()

    written = await kit.read(bootstrap, topic)
    partitioner = DefaultPartitioner()
    for record in written:
        assert record.partition == partitioner(record.key, [0, 1, 2], [0, 1, 2])
        assert list(record.headers) == [("h", b"1")]
    by_partition: dict[int, list[bytes]] = defaultdict(list)
    for record in sorted(written, key=lambda r: (r.partition, r.offset)):
        by_partition[record.partition].append(record.value)
    expected: dict[int, list[bytes]] = defaultdict(list)
    for key, value in records:
        expected[partitioner(key, [0, 1, 2], [0, 1, 2])].append(value)
    assert by_partition == expected


async def test_a_record_above_the_request_size_is_refused(dev_env: DevEnv) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=dev_env.bootstrap_servers)
    await producer.start()
    try:
        outbox = Outbox(producer, max_request_size=10_000)
        with pytest.raises(RecordTooLarge, match="10000"):
            await outbox.add(kit.name("big"), b"k", b"x" * 20_000, None, [])
        assert await outbox.flush() == []
    finally:
        await producer.stop()


@pytest.mark.parametrize("size", [0, 1, 17, 64, 65, 4096])
def test_the_remembered_hash_is_the_default_partitioners_for_short_and_long_keys(
    size: int,
) -> None:
    partitioner, partitions = DefaultPartitioner(), list(range(7))
    for seed in range(50):
        key = random.Random(seed * 10_000 + size).randbytes(size)
        for _ in range(2):  # the second time from the memo, for keys short enough to keep
            chosen = partitions[outbox._positive_hash(key) % len(partitions)]
            assert chosen == partitioner(key, partitions, partitions), (size, seed)
