"""Compressed topics: every Kafka codec, in both directions, on the embedded broker.

Plaintext is produced by librdkafka (`confluent_kafka.Producer`, `compression.codec`) and by
aiokafka (`compression_type`); the encrypt worker reads it and writes with
`ENVPIPE_COMPRESSION=<codec>`, so the decrypt and rewrap workers read that codec in turn.
The codec of every output is checked in the raw record batches (a Fetch request parsed by
hand, not through the consumer), because a consumer decodes any codec silently. inspect,
the library (`KeysTopicReader`, `Decryptor`) and the Faust app read compressed input too.
A batch that cannot be decoded stops a worker with one error naming topic, partition and
offset, and nothing after it is skipped. The five codec pipelines run side by side; about
60 s in all.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.util import calc_crc32c
from confluent_kafka import Producer

from pipeline.config import load_settings
from pipeline.decryptor import Decryptor
from pipeline.errors import ConfigError, TopicError
from pipeline.keys_topic import KeysTopicReader
from pipeline.kms import CountingKms
from tests import kit
from tests.kit import IDLE, MARKER, Proc, Rec, Workers
from tests.test_faust import Launcher
from tests.test_format_v2 import cli
from workers import inspect
from workers.dev import DevEnv
from workers.supervisor import until

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
#: The record-batch attribute bits of each codec (Kafka's protocol).
CODEC_IDS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
#: Half the codecs run in v2, so a compressed keys topic is written and read as well.
FORMATS = {"none": "v1", "gzip": "v2", "snappy": "v1", "lz4": "v2", "zstd": "v2"}
PER_PRODUCER = 200
_BATCH_HEADER = 61  # bytes of a v2 record batch before its records


# --- producing and reading raw batches -------------------------------------------------------


def compressible(rng: random.Random, index: int) -> bytes:
    """A value a codec can shrink (repeated JSON-ish text), marked as plaintext."""
    line = b'{"item": "widget-%d", "qty": %d, "note": "fragile"} ' % (index % 17, index % 5)
    return MARKER + line * rng.randint(1, 12) + rng.randbytes(8)


def plaintext(prefix: str, seed: int) -> list[Rec]:
    """Records with unique keys, repeated headers, and every 50th a tombstone."""
    rng = random.Random(seed)
    return [
        Rec(
            f"{prefix}-{i:04d}".encode(),
            None if i % 50 == 7 else compressible(rng, i),
            (("trace", str(i).encode()), ("dup", b"a"), ("dup", b"b")),
        )
        for i in range(PER_PRODUCER)
    ]


def produce_librdkafka(bootstrap: str, topic: str, codec: str, records: Sequence[Rec]) -> None:
    """librdkafka, batching (linger) so that its batches are really compressed."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "compression.codec": codec, "linger.ms": 50, "acks": "all"}
    )
    failures: list[Any] = []
    for rec in records:
        producer.produce(
            topic,
            value=rec.value,
            key=rec.key,
            headers=list(rec.headers),
            on_delivery=lambda error, _: failures.append(error) if error else None,
        )
    assert producer.flush(30) == 0
    assert failures == []


async def produce_aiokafka(bootstrap: str, topic: str, codec: str, records: Sequence[Rec]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        compression_type=None if codec == "none" else codec,
        linger_ms=50,
        acks="all",
    )
    await producer.start()
    try:
        sent = [
            await producer.send(topic, r.value, key=r.key, headers=list(r.headers)) for r in records
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def batch_codecs(bootstrap: str, topic: str) -> Counter[int]:
    """The codec id of every record batch in `topic`, read from raw Fetch responses."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    codecs: Counter[int] = Counter()
    try:
        await client.add_topic(topic)
        for partition in sorted(client.cluster.partitions_for_topic(topic) or ()):
            leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
            offset, end = 0, 1
            while offset < end:
                request = FetchRequest(
                    100, 1, 1 << 24, 0, [(topic, [(partition, offset, 1 << 24)])]
                )
                (_, (answer,)), *_ = (await client.send(leader, request)).topics
                end, data = answer[2], answer[-1] or b""
                position = 0
                while position + _BATCH_HEADER <= len(data):
                    base, length = struct.unpack_from(">qi", data, position)
                    if position + 12 + length > len(data):
                        break  # a partial batch at the end of the response
                    attributes, last_delta = struct.unpack_from(">hi", data, position + 21)
                    codecs[attributes & 0x07] += 1
                    offset = base + last_delta + 1
                    position += 12 + length
                if not data:
                    break
    finally:
        await client.close()
    return codecs


# --- the five pipelines, side by side --------------------------------------------------------


@dataclass
class Pipeline:
    """One codec's run: plaintext in, encrypt, then decrypt and rewrap at once."""

    codec: str
    format: str
    topics: dict[str, str]
    source: list[Any] = field(default_factory=list)
    procs: dict[str, Proc] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    #: topic role -> codec ids of its record batches
    codecs: dict[str, Counter[int]] = field(default_factory=dict)

    @property
    def junk(self) -> Rec:
        """Not an envelope: written to the encrypted topic so both DLQs are written too."""
        return Rec(b"junk", b'{"not": "an envelope"}', (("n", b"1"),))


async def run_pipeline(env: DevEnv, pool: Workers, codec: str) -> Pipeline:
    bootstrap = env.bootstrap_servers
    roles = ("plain", "enc", "dec", "dlq", "rewrapped", "rewrap-dlq")
    run = Pipeline(codec, FORMATS[codec], {role: kit.name(f"z{codec}-{role}") for role in roles})
    topics = run.topics
    for role in ("plain", "enc"):
        await kit.create_topic(bootstrap, topics[role])
    await asyncio.gather(
        asyncio.to_thread(
            produce_librdkafka, bootstrap, topics["plain"], codec, plaintext("rd", 1)
        ),
        produce_aiokafka(bootstrap, topics["plain"], codec, plaintext("aio", 2)),
    )
    run.source = await kit.read(bootstrap, topics["plain"])
    settings = {"ENVPIPE_COMPRESSION": codec, "ENVPIPE_FORMAT": run.format}
    idle = ("--stop-when-idle", IDLE)
    run.procs["encrypt"] = await pool.encrypt(
        topics["plain"], topics["enc"], kit.name("g"), *idle, name=f"{codec}-enc", **settings
    )
    run.codes["encrypt"] = await run.procs["encrypt"].wait(90)
    await produce_aiokafka(bootstrap, topics["enc"], codec, [run.junk])
    run.procs["decrypt"] = await pool.decrypt(
        topics["enc"],
        topics["dec"],
        topics["dlq"],
        kit.name("g"),
        *idle,
        name=f"{codec}-dec",
        **settings,
    )
    run.procs["rewrap"] = await pool.start(
        "rewrap",
        *("--source", topics["enc"], "--dest", topics["rewrapped"], "--group", kit.name("g")),
        *("--dlq", topics["rewrap-dlq"], "--to-key", env.kms_key_id, *idle),
        name=f"{codec}-rewrap",
        **settings,
    )
    for direction in ("decrypt", "rewrap"):
        run.codes[direction] = await run.procs[direction].wait(90)
    written = dict(topics)
    if run.format == "v2":
        written |= {f"{role}.keys": f"{topics[role]}.keys" for role in ("enc", "rewrapped")}
    for role, topic in written.items():
        run.codecs[role] = await batch_codecs(bootstrap, topic)
    return run


@pytest.fixture(scope="module")
async def pipelines(
    dev_env: DevEnv, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Pipeline]:
    pool = Workers(dev_env, tmp_path_factory.mktemp("compression"))
    try:
        runs = await asyncio.gather(*(run_pipeline(dev_env, pool, codec) for codec in CODECS))
    finally:
        await pool.close()
    return {run.codec: run for run in runs}


@pytest.mark.slow
@pytest.mark.parametrize("codec", CODECS)
async def test_every_record_round_trips(
    dev_env: DevEnv, pipelines: dict[str, Pipeline], codec: str
) -> None:
    run = pipelines[codec]
    bootstrap = dev_env.bootstrap_servers
    # the input really is compressed with the codec, by both producers
    assert set(run.codecs["plain"]) == {CODEC_IDS[codec]}
    assert len(run.source) == 2 * PER_PRODUCER
    assert run.codes == {"encrypt": 0, "decrypt": 0, "rewrap": 0}, {
        name: proc.tail() for name, proc in run.procs.items()
    }
    opened = await kit.read(bootstrap, run.topics["dec"])
    assert Counter(map(Rec.of, opened)) == Counter(map(Rec.of, run.source))
    for dlq in ("dlq", "rewrap-dlq"):
        (letter,) = await kit.read(bootstrap, run.topics[dlq])
        assert (letter.key, letter.value) == (run.junk.key, run.junk.value)
        assert dict(letter.headers)["envpipe.error"] == b"malformed"
    sealed = await kit.read(bootstrap, run.topics["enc"])
    assert not [r for r in sealed if r.value is not None and MARKER in r.value]
    assert run.procs["encrypt"].stats()["records_in"] == len(run.source)


@pytest.mark.slow
@pytest.mark.parametrize("codec", CODECS)
def test_every_output_is_written_with_the_configured_codec(
    pipelines: dict[str, Pipeline], codec: str
) -> None:
    run = pipelines[codec]
    outputs = {role: codecs for role, codecs in run.codecs.items() if role != "plain"}
    assert len(outputs) == (7 if run.format == "v2" else 5)
    assert all(codecs for codecs in outputs.values()), outputs
    assert {role: set(codecs) for role, codecs in outputs.items()} == {
        role: {CODEC_IDS[codec]} for role in outputs
    }


@pytest.mark.slow
@pytest.mark.parametrize("codec", CODECS)
async def test_inspect_and_the_library_read_compressed_topics(
    dev_env: DevEnv, pipelines: dict[str, Pipeline], codec: str
) -> None:
    run = pipelines[codec]
    bootstrap = dev_env.bootstrap_servers
    settings = load_settings(environ=dev_env.as_environ())
    plain = {r.key: r.value for r in run.source}
    async with kit.moto(dev_env) as (aws, _):
        kms = CountingKms(aws)
        found: list[inspect.Finding] = []
        verdicts = await inspect.inspect_topic(
            settings, kms, topic=run.topics["enc"], limit=10_000, emit=found.append
        )
        tombstones = sum(value is None for value in plain.values())
        assert verdicts == {
            "verified": len(plain) - tombstones,
            "tombstone": tombstones,
            "malformed": 1,
        }
        assert {f.format for f in found if f.verdict == "verified"} == {run.format}
        assert kms.calls["unwrap"] == 0

        # The rewrapped topic (and, in v2, its compressed keys topic) through the library.
        rewrapped = await kit.read(bootstrap, run.topics["rewrapped"])
        keys = None
        if run.format == "v2":
            keys = await KeysTopicReader.open(
                run.topics["rewrapped"] + ".keys", bootstrap_servers=bootstrap, follow=False
            )
        decryptor = await Decryptor.from_settings(kms, settings, header_source=keys)
        try:
            sealed = [r for r in rewrapped if r.value is not None]
            opened = await decryptor.open_many([(r.value, r.key) for r in sealed])
        finally:
            if keys is not None:
                await keys.close()
    assert {r.key: value for r, value in zip(sealed, opened, strict=True)} == {
        key: value for key, value in plain.items() if value is not None
    }
    assert sum(r.value is None for r in rewrapped) == tombstones


# --- settings --------------------------------------------------------------------------------


def test_an_invalid_codec_is_a_config_error_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"ENVPIPE_COMPRESSION": "brotli"})
    assert refused.value.setting == "ENVPIPE_COMPRESSION"
    assert "must be one of none, gzip, snappy, lz4, zstd" in str(refused.value)
    assert load_settings(environ={"ENVPIPE_COMPRESSION": "ZSTD"}).compression == "zstd"

    done = cli(
        *("encrypt", "--source", "a", "--dest", "b", "--group", "g"),
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ENVPIPE_COMPRESSION": "brotli"},
    )
    assert done.returncode == 2
    assert done.stderr.startswith("envpipe: error: ENVPIPE_COMPRESSION: got 'brotli'")
    assert "Traceback" not in done.stderr


# --- Faust -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_the_faust_app_reads_and_writes_lz4(dev_env: DevEnv, tmp_path: Path) -> None:
    from workers.faust_app import FaustTopics

    bootstrap = dev_env.bootstrap_servers
    # v2, so the Faust helper's own keys-topic producer is checked too
    variables = {**dev_env.variables, "ENVPIPE_COMPRESSION": "lz4", "ENVPIPE_FORMAT": "v2"}
    lz4 = replace(dev_env, variables=variables)
    launcher = Launcher(Workers(lz4, tmp_path), tmp_path)
    topics = FaustTopics(
        source=kit.name("zfaust-plain"),
        encrypted=kit.name("zfaust-enc"),
        clear=kit.name("zfaust-clear"),
        dlq=kit.name("zfaust-dlq"),
        app_id=kit.name("zfaust"),
        stop_when_idle=3.0,
    )
    for topic in (topics.source, topics.encrypted):
        await kit.create_topic(bootstrap, topic)
    await asyncio.to_thread(produce_librdkafka, bootstrap, topics.source, "lz4", plaintext("f", 3))
    source = await kit.read(bootstrap, topics.source)
    try:
        faust = await launcher.start(topics)
        assert await faust.proc.wait(120) == 0, faust.proc.tail()
    finally:
        await launcher.close()

    assert Counter(map(Rec.of, await kit.read(bootstrap, topics.clear))) == Counter(
        map(Rec.of, source)
    )
    for topic in (topics.source, topics.encrypted, f"{topics.encrypted}.keys", topics.clear):
        assert set(await batch_codecs(bootstrap, topic)) == {CODEC_IDS["lz4"]}, topic


# --- a batch that cannot be decoded ----------------------------------------------------------


BAD_PARTITION = 1
GOOD_BEFORE = 5


async def produce_with_an_undecodable_batch(bootstrap: str, topic: str, codec: str) -> None:
    """Good records in every partition; in `BAD_PARTITION`, after `GOOD_BEFORE` of them, a
    batch whose records (compressed or not) are garbled, with a CRC that matches the
    garbage, then more good records. The broker stores it; no consumer can decode it."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, compression_type=None if codec == "none" else codec
    )
    await producer.start()
    try:
        for partition in range(3):
            for i in range(GOOD_BEFORE):
                key = f"before-{partition}-{i}".encode()
                await producer.send_and_wait(topic, b"good", key=key, partition=partition)
        batch = producer.create_batch()
        for i in range(3):
            batch.append(key=b"bad-%d" % i, value=bytes(range(256)) * 4, timestamp=None)
        raw = bytearray(batch._build())  # the bytes it will send
        for index in range(_BATCH_HEADER + 4, min(len(raw), _BATCH_HEADER + 24)):
            raw[index] ^= 0x5A
        struct.pack_into(">I", raw, 17, calc_crc32c(bytes(raw[21:])))  # CRC-32C from attributes
        batch._buffer = raw
        await (await producer.send_batch(batch, topic, partition=BAD_PARTITION))
        for i in range(GOOD_BEFORE):
            key = f"after-{i}".encode()
            await producer.send_and_wait(topic, b"good", key=key, partition=BAD_PARTITION)
    finally:
        await producer.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_an_undecodable_batch_stops_the_worker_naming_where_it_is(
    dev_env: DevEnv, workers: Workers
) -> None:
    bootstrap = dev_env.bootstrap_servers
    settings = load_settings(environ=dev_env.as_environ())
    plains = {codec: kit.name(f"zbad-{codec}") for codec in CODECS}
    for codec, topic in plains.items():
        await kit.create_topic(bootstrap, topic)
        await produce_with_an_undecodable_batch(bootstrap, topic, codec)
    groups = {codec: kit.name("g") for codec in CODECS}
    started = {
        codec: await workers.encrypt(
            topic, topic + ".enc", groups[codec], "--stop-when-idle", IDLE, name=f"bad-{codec}"
        )
        for codec, topic in plains.items()
    }
    where = {
        codec: f"{topic}/{BAD_PARTITION} offset {GOOD_BEFORE}" for codec, topic in plains.items()
    }
    for codec, proc in started.items():
        assert await proc.wait(60) == 1, proc.tail()
        log = proc.log.read_text()
        errors = [line for line in log.splitlines() if " ERROR envpipe." in line]
        assert len(errors) == 1, log
        assert f"the record batch at {where[codec]} cannot be decoded" in errors[0]
        assert "stopping without skipping it" in errors[0]
        assert "Traceback" not in log
        # Nothing at or after the bad batch was sealed or committed.
        sealed = await kit.read(bootstrap, plains[codec] + ".enc")
        assert not [r for r in sealed if r.key.startswith((b"after-", b"bad-"))]
        committed = await kit.committed(bootstrap, groups[codec], plains[codec])
        assert committed[BAD_PARTITION] <= GOOD_BEFORE

    async with kit.moto(dev_env) as (aws, _):
        for codec, topic in plains.items():
            with pytest.raises(TopicError, match=f"the record batch at {where[codec]} cannot"):
                await inspect.inspect_topic(
                    settings, CountingKms(aws), topic=topic, limit=1000, emit=lambda _: None
                )
    done = await asyncio.to_thread(
        cli, "inspect", "--topic", plains["gzip"], "--limit", "1000", env=workers.environ()
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"envpipe: error: the record batch at {where['gzip']}")
    assert "zlib.error" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_keys_topic_batch_that_cannot_be_decoded_is_a_clear_error(
    dev_env: DevEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """At start a reader refuses to load past it; a following reader says so, loudly, and
    reads nothing after it (records under later DEKs then end as header_missing)."""
    bootstrap = dev_env.bootstrap_servers
    loaded, followed = kit.name("zbad-keys"), kit.name("zbad-keys-followed")
    for topic in (loaded, followed):
        await kit.create_topic(bootstrap, topic)
    await produce_with_an_undecodable_batch(bootstrap, loaded, "gzip")
    with pytest.raises(TopicError, match=rf"keys topic '{loaded}' cannot be read past .*zlib"):
        await KeysTopicReader.open(loaded, bootstrap_servers=bootstrap, follow=False)

    reader = await KeysTopicReader.open(followed, bootstrap_servers=bootstrap)
    try:
        with caplog.at_level(logging.ERROR, logger="envpipe.keys"):
            await produce_with_an_undecodable_batch(bootstrap, followed, "zstd")
            said = f"the keys topic '{followed}' cannot be read past a record batch"
            assert await until(lambda: said in caplog.text, 20, interval=0.1)
        assert "header_missing" in caplog.text
        assert reader.get(b"after-0") is None  # nothing after the bad batch was taken
    finally:
        await reader.close()
