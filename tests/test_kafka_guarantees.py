"""What real Apache Kafka allows beyond Tansu: exactly-once, broker failover, librdkafka.

The Apache-Kafka-only tests run under `make test-kafka` (ENVPIPE_TEST_BROKER=kafka); the
refusal of exactly-once on a broker without transactions runs against Tansu in `make test`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer

from tests import kit
from tests.kit import IDLE, MARKER, Tail, Workers
from tests.providers import BROKER
from workers.dev import DevEnv
from workers.dev.apache_kafka_cluster import KafkaCluster, cluster

on_kafka = pytest.mark.skipif(BROKER != "kafka", reason="Apache Kafka only (make test-kafka)")


@pytest.mark.skipif(BROKER != "tansu", reason="Tansu cannot run transactions; Kafka can")
async def test_exactly_once_on_a_broker_without_transactions_names_the_setting(
    dev_env: DevEnv, workers: Workers
) -> None:
    plain = kit.name("eos-plain")
    await kit.create_topic(dev_env.bootstrap_servers, plain)
    worker = await workers.encrypt(
        plain, kit.name("eos-enc"), kit.name("g"), name="eos", ENVPIPE_EXACTLY_ONCE="true"
    )
    assert await worker.wait(60) == 2, worker.tail()
    assert "ENVPIPE_EXACTLY_ONCE" in worker.tail()


@on_kafka
@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_exactly_once_survives_four_kill_9s(dev_env: DevEnv, workers: Workers) -> None:
    """kill -9 at seeded random moments, four times, over 100,000 records: a read_committed
    reader then sees every record exactly once."""
    bootstrap = dev_env.bootstrap_servers
    plain, enc, dlq, group = (kit.name(f"eos-{part}") for part in ("plain", "enc", "dlq", "g"))
    await kit.create_topic(bootstrap, plain)
    await kit.create_topic(bootstrap, enc)  # so the tail can follow it before the worker runs
    originals = kit.keyed(100_000, 200)
    await kit.produce(bootstrap, plain, originals)
    rng = random.Random(447)
    eos = {"ENVPIPE_EXACTLY_ONCE": "true", "ENVPIPE_BATCH_MAX_RECORDS": "500"}
    kills = []
    async with Tail(bootstrap, enc) as tail:
        for attempt in range(4):
            worker = await workers.encrypt(
                plain, enc, group, "--dlq", dlq, name=f"eos-{attempt}", **eos
            )
            await kit.logged(worker, "partitions assigned:", within=90)
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            worker.kill()
            assert await worker.wait(30) == -9
            kills.append(await tail.poll())
        last = await workers.encrypt(
            plain, enc, group, "--dlq", dlq, "--stop-when-idle", "8", name="eos-last", **eos
        )
        assert await last.wait(300) == 0, last.tail()
        assert "producer: transactional (exactly-once)" in last.tail(200)

    committed = await kit.read(bootstrap, enc, read_committed=True)
    seen = Counter(record.key for record in committed)
    lost = {r.key for r in originals} - set(seen)
    duplicated = sum(count - 1 for count in seen.values())
    everything = await kit.read(bootstrap, enc)  # aborted attempts included
    print(
        f"\nexactly-once: kills after {kills} records seen (uncommitted included); "
        f"{len(committed)} committed, {len(lost)} lost, {duplicated} duplicated; "
        f"{len(everything) - len(committed)} records of aborted transactions on the topic"
    )
    assert not lost
    assert duplicated == 0
    assert len(committed) == len(originals)
    assert await kit.count(bootstrap, dlq) == 0


@pytest.fixture(scope="module")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


async def _until_grows(tail: Tail, count: int, within: float) -> float:
    """Seconds until `tail` holds more than `count` records."""
    started = time.monotonic()
    await tail.wait_for(count + 1, within=within)
    return time.monotonic() - started


@on_kafka
@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_the_worker_rides_out_losing_partition_leaders(
    dev_env: DevEnv, kafka_cluster: KafkaCluster, tmp_path: Path
) -> None:
    """Three KRaft nodes, replication factor 3, min.insync.replicas 2: kill the leader of a
    source partition, then of a destination partition, mid-stream. Nothing is lost and the
    worker keeps running; the stall each time is measured."""
    env = replace(dev_env, bootstrap_servers=kafka_cluster.bootstrap_servers)
    pool = Workers(env, tmp_path)
    bootstrap = env.bootstrap_servers
    plain, enc = kit.name("fo-plain"), kit.name("fo-enc")
    await kit.create_topic(bootstrap, plain, partitions=3, replication=3)
    await kit.create_topic(bootstrap, enc, partitions=3, replication=3)
    originals = kit.keyed(30_000, 200)
    stalls: dict[str, float] = {}
    try:
        worker = await pool.encrypt(plain, enc, kit.name("g"), "--stop-when-idle", "10", name="fo")
        feeding = asyncio.ensure_future(
            kit.produce_steadily(bootstrap, plain, originals, chunk=500, pause=0.1)
        )
        async with Tail(bootstrap, enc) as tail:
            for role, topic in (("source", plain), ("destination", enc)):
                await tail.wait_for(await tail.poll() + 2_000, within=120)
                leader = await kafka_cluster.leader_of(topic, 0)
                kafka_cluster.stop_node(leader, kill=True)
                seen = await tail.poll()
                stalls[role] = await _until_grows(tail, seen, within=120)
                assert worker.returncode is None, worker.tail()
                kafka_cluster.start_node(leader)
            await feeding
            assert await worker.wait(300) == 0, worker.tail()
    finally:
        await pool.close()
    sealed = await kit.read(bootstrap, enc)
    assert {r.key for r in sealed} == {r.key for r in originals}, "records were lost"
    assert not [r for r in sealed if r.value is not None and MARKER in r.value]
    print(
        f"\nfailover: stall after killing the leader of a source partition "
        f"{stalls['source']:.1f} s, of a destination partition {stalls['destination']:.1f} s; "
        f"{kit.duplicates(sealed)} duplicates"
    )


@on_kafka
@pytest.mark.kafka
@pytest.mark.timeout(180)
async def test_a_librdkafka_consumer_reads_what_the_library_opens(
    dev_env: DevEnv, workers: Workers
) -> None:
    """confluent-kafka (librdkafka) in a consumer group reads the encrypted topic from Apache
    Kafka; the `pipeline` library opens every record it read."""
    bootstrap = dev_env.bootstrap_servers
    plain, enc = kit.name("rd-plain"), kit.name("rd-enc")
    await kit.create_topic(bootstrap, plain)
    originals = kit.keyed(2_000, 300)
    await kit.produce(bootstrap, plain, originals)
    worker = await workers.encrypt(plain, enc, kit.name("g"), "--stop-when-idle", IDLE, name="e")
    assert await worker.wait(120) == 0, worker.tail()

    read = await asyncio.to_thread(_librdkafka_read, bootstrap, enc, len(originals))
    async with kit.service(dev_env) as kms:
        decryptor = await kit.opener(kms, dev_env)
        opened = await decryptor.open_many([(value, key) for key, value in read])
    assert Counter(zip((k for k, _ in read), opened, strict=True)) == Counter(
        (r.key, r.value) for r in originals
    )


def _librdkafka_read(bootstrap: str, topic: str, expected: int) -> list[tuple[bytes, bytes]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": kit.name("librdkafka"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    records: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + 90
    try:
        while len(records) < expected and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None or message.error():
                continue
            records.append((message.key(), message.value()))
    finally:
        consumer.close()
    assert len(records) == expected
    return records
