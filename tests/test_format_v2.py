"""Wire format v2 end to end: real workers on Tansu, the library in process, inspect, the demo.

v2 (`ENVPIPE_FORMAT=v2`) moves each DEK's signed header into a compacted keys topic and
leaves `0x04 || dek_id || nonce || length || ciphertext+tag` in the record. These tests
check the bytes (47 B of overhead for a 1 KiB value), that v1 and v2 records open from one
topic, that a header not yet in the keys topic pauses the reader (busy, not idle) and ends
as `header_missing`, that a non-compacted keys topic stops the writer at start, that
inspect joins records with their headers, and that the demo passes in v2. The hostile cases
are in test_v2_hostile.py, the keys topic itself in test_keys_topic.py. About 60 s, plus
20 s for the Apache Kafka test when ENVPIPE_TEST_BROKER=kafka.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline import envelope, envelope_v2
from pipeline.config import load_settings
from pipeline.decryptor import Decryptor
from pipeline.encryptor import Encryptor
from pipeline.envelope import STREAM_CONTEXT_KEY, decode_header
from pipeline.errors import ConfigError
from pipeline.keys_topic import InMemoryHeaders, KeysTopicReader, KeysTopicWriter
from pipeline.kms import CountingKms
from pipeline.types import HeaderSink, Kms
from tests import kit
from tests.kit import IDLE, MARKER, REPO, Rec, Workers
from tests.test_keys_topic import create_keys_topic, create_with_policy, describe_policy
from workers import dev
from workers.dev import DevEnv

V1_HEADER, V2_HEADER = envelope.VERSION_HEADER, envelope_v2.VERSION_HEADER
#: 1 version byte + 16 dek_id + 12 nonce + 2 length (a varint, for 1,040 bytes) + 16 tag
V2_OVERHEAD_1KIB = 47


def v2_encryptor(kms: Kms, env: DevEnv, stream: str, sink: HeaderSink) -> Encryptor:
    """An Encryptor writing v2 under the dev keys; each DEK's header goes to `sink`."""
    return Encryptor(
        kms,
        kms_key_id=env.kms_key_canonical,
        signing_key_id=env.signing_key_canonical,
        stream=stream,
        format="v2",
        header_sink=sink,
    )


def dek_id_of(value: bytes) -> bytes:
    """The dek_id a v2 record names."""
    return envelope_v2.decode_record(value)[0]


async def publish_headers(
    bootstrap: str, topic: str, headers: Iterable[tuple[bytes, bytes]]
) -> None:
    """Write (dek_id, header bytes) to a keys topic, creating it (compacted) if missing."""
    await create_keys_topic(bootstrap, topic)
    writer = await KeysTopicWriter.open(topic, bootstrap_servers=bootstrap)
    try:
        for dek_id, header in headers:
            await writer.publish(dek_id, header)
    finally:
        await writer.close()


def envelopes(records: Sequence[Rec], sealed: Sequence[Any]) -> list[Rec]:
    """The records as an encrypt worker would write them in v2: same key, sealed value."""
    return [
        Rec(r.key, value, (*r.headers, V2_HEADER)) for r, value in zip(records, sealed, strict=True)
    ]


# --- the workers -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_v2_and_v1_workers_share_one_encrypted_topic(
    dev_env: DevEnv, workers: Workers
) -> None:
    bootstrap = dev_env.bootstrap_servers
    plain_v1, plain_v2, enc, dec, dlq = (
        kit.name(f"v2rt-{p}") for p in ("p1", "p2", "enc", "dec", "dlq")
    )
    for topic in (plain_v1, plain_v2, enc):
        await kit.create_topic(bootstrap, topic)
    await kit.produce(bootstrap, plain_v1, kit.keyed(200, 1024, "v1-"))
    await kit.produce(bootstrap, plain_v2, [*kit.keyed(300, 1024, "v2-"), *kit.mixed_records(300)])
    source = [*await kit.read(bootstrap, plain_v1), *await kit.read(bootstrap, plain_v2)]

    writers = [
        await workers.encrypt(
            plain_v1, enc, kit.name("g"), "--stop-when-idle", IDLE, name="enc-v1"
        ),
        await workers.encrypt(
            plain_v2,
            enc,
            kit.name("g"),
            "--stop-when-idle",
            IDLE,
            name="enc-v2",
            ENVPIPE_FORMAT="v2",
        ),
    ]
    for writer in writers:
        assert await writer.wait(90) == 0, writer.tail()
    sealed = await kit.read(bootstrap, enc)
    decrypt = await workers.decrypt(
        enc, dec, dlq, kit.name("g"), "--stop-when-idle", IDLE, name="dec"
    )
    assert await decrypt.wait(90) == 0, decrypt.tail()

    # Every record of both formats opens, byte for byte; tombstones pass through both ways.
    assert Counter(map(Rec.of, await kit.read(bootstrap, dec))) == Counter(map(Rec.of, source))
    assert await kit.count(bootstrap, dlq) == 0
    assert len(sealed) == len(source)
    assert sum(r.value is None for r in sealed) == sum(r.value is None for r in source) > 0
    assert not [r for r in sealed if r.value is not None and MARKER in r.value]

    plain = {r.key: r.value for r in source if r.key is not None}
    v2 = [r for r in sealed if r.headers[-1] == V2_HEADER]
    v1 = [r for r in sealed if r.headers[-1] == V1_HEADER]
    assert len(v1) + len(v2) == len(sealed)
    assert {r.key[:3] for r in v1} == {b"v1-"}
    assert {r.value[0] for r in v1} == {0x02}
    assert {r.value[0] for r in v2 if r.value is not None} == {0x04}
    # The overhead, exactly: 47 bytes on a 1 KiB value (v1 carries its ~400-byte header).
    kib = [r for r in v2 if r.key is not None and r.key.startswith(b"v2-")]
    assert {len(r.value) - len(plain[r.key]) for r in kib} == {V2_OVERHEAD_1KIB}
    assert all(
        len(r.value) - len(plain[r.key]) <= 48
        for r in v2
        if r.value is not None and r.key is not None
    )
    v1_overhead = {len(r.value) - len(plain[r.key]) for r in v1}
    print(f"overhead per 1 KiB record: v2 {V2_OVERHEAD_1KIB} B, v1 {sorted(v1_overhead)} B")

    # The keys topic: compacted, one signed v2 header per DEK generated, keyed by its dek_id.
    keys_topic = f"{enc}.keys"
    assert await describe_policy(bootstrap, keys_topic) == "compact"
    published = await kit.read(bootstrap, keys_topic)
    headers = {r.key: envelope_v2.decode_keys_header(r.value, r.key) for r in published}
    assert len(headers) == len(published) == writers[1].stats()["kms_calls"]["generate_data_key"]
    assert {dek_id_of(r.value) for r in v2 if r.value is not None} <= set(headers)
    for header in headers.values():
        assert (header.version, header.kms_key_id) == (2, dev_env.kms_key_canonical)
        assert header.signing_key_id == dev_env.signing_key_canonical
        assert dict(header.encryption_context) == {STREAM_CONTEXT_KEY: plain_v2}
    # One unwrap per DEK that records used, whatever the format.
    deks = {decode_header(r.value)[0].dek_id for r in v1} | {
        dek_id_of(r.value) for r in v2 if r.value
    }
    stats = decrypt.stats()
    assert stats["kms_calls"]["unwrap"] == len(deks)
    assert (stats["records_out"], stats["dlq"]) == (len(source), 0)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_header_not_yet_in_the_keys_topic_pauses_the_reader_then_dead_letters(
    dev_env: DevEnv, workers: Workers
) -> None:
    """The decrypt worker starts before the keys topic exists (readers deployed first). One
    DEK's header arrives while it waits and its records open; the other's never does."""
    bootstrap = dev_env.bootstrap_servers
    enc, dec, dlq = (kit.name(f"v2wait-{part}") for part in ("enc", "dec", "dlq"))
    await kit.create_topic(bootstrap, enc)
    late_in, never_in = kit.keyed(30, 200, "late-"), kit.keyed(20, 200, "never-")
    late_headers, never_headers = InMemoryHeaders(), InMemoryHeaders()  # not on the broker
    async with kit.moto(dev_env) as (kms, _):
        sealed = []
        for records, sink in ((late_in, late_headers), (never_in, never_headers)):
            encryptor = v2_encryptor(kms, dev_env, enc, sink)
            sealed.append(await encryptor.seal_many([(r.value, r.key) for r in records]))
            await encryptor.close()
    late, never = envelopes(late_in, sealed[0]), envelopes(never_in, sealed[1])
    metadata = await kit.produce(bootstrap, enc, [*late, *never])

    worker = await workers.decrypt(
        enc,
        dec,
        dlq,
        kit.name("g"),
        "--stop-when-idle",
        "1",
        name="waiting",
        ENVPIPE_KEYS_WAIT_SECONDS="12",
        ENVPIPE_KMS_RETRY_MAX_SECONDS="0.5",
    )
    await kit.logged(worker, "not in the keys topic yet")
    await asyncio.sleep(2.5)  # well past --stop-when-idle: a worker waiting for a header is busy
    assert worker.returncode is None, worker.tail()
    late_id = dek_id_of(late[0].value or b"")
    await publish_headers(bootstrap, f"{enc}.keys", [(late_id, late_headers.get(late_id) or b"")])
    assert await worker.wait(60) == 0, worker.tail()

    opened = await kit.read(bootstrap, dec)
    assert {r.key: r.value for r in opened} == {r.key: r.value for r in late_in}
    kit.assert_dead_letters(
        await kit.read(bootstrap, dlq),
        [("header_missing", rec) for rec in never],
        metadata[len(late) :],
        enc,
    )
    stats = worker.stats()
    assert stats["pauses"]["kms"] >= 1
    assert stats["dlq_reasons"] == {"header_missing": len(never)}
    assert stats["kms_calls"]["unwrap"] == 1  # the late DEK; the missing one costs nothing
    assert "ENVPIPE_KEYS_WAIT_SECONDS" in worker.log.read_text()


@pytest.mark.timeout(90)
async def test_a_keys_topic_that_is_not_compacted_stops_the_writer_at_start(
    dev_env: DevEnv, workers: Workers
) -> None:
    bootstrap = dev_env.bootstrap_servers
    plain, enc, named = kit.name("v2del-plain"), kit.name("v2del-enc"), kit.name("v2del-keys")
    await kit.create_topic(bootstrap, plain)
    await kit.produce(bootstrap, plain, kit.keyed(20, 100))
    for topic in (f"{enc}.keys", named):
        await create_with_policy(bootstrap, topic, "delete")
    started = [
        (
            f"{enc}.keys",
            await workers.encrypt(plain, enc, kit.name("g"), name="default", ENVPIPE_FORMAT="v2"),
        ),
        (
            named,
            await workers.encrypt(
                plain,
                enc,
                kit.name("g"),
                name="named",
                ENVPIPE_FORMAT="v2",
                ENVPIPE_KEYS_TOPIC=named,
            ),
        ),
    ]
    for keys_topic, proc in started:
        assert await proc.wait(60) == 2, proc.tail()  # a configuration error
        log = proc.log.read_text()
        assert f"envpipe: error: ENVPIPE_KEYS_TOPIC: the keys topic {keys_topic} exists" in log
        assert "cleanup.policy=delete" in log
        assert "Traceback" not in log
    assert await kit.count(bootstrap, enc) == 0  # nothing was sealed


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(
    os.environ.get("ENVPIPE_TEST_BROKER") != "kafka",
    reason="Apache Kafka tests run with ENVPIPE_TEST_BROKER=kafka",
)
async def test_v2_with_exactly_once_on_apache_kafka(tmp_path: Path) -> None:
    """A transactional worker publishes its headers outside the transaction (a send on a
    transactional producer outside one is refused, so nothing was ever sealed), and readers
    find the keys topic on a broker that, unlike Tansu, sends a new client no metadata."""
    env = await asyncio.to_thread(dev.up, tmp_path / "kafka", broker="kafka", ready_timeout=120)
    pool = Workers(env, tmp_path)
    try:
        bootstrap = env.bootstrap_servers
        plain, enc, dec, dlq = (kit.name(f"v2eos-{part}") for part in ("p", "enc", "dec", "dlq"))
        for topic in (plain, enc):
            await kit.create_topic(bootstrap, topic)
        await kit.produce(bootstrap, plain, kit.mixed_records(300))
        source = await kit.read(bootstrap, plain)
        eos = {"ENVPIPE_FORMAT": "v2", "ENVPIPE_EXACTLY_ONCE": "true"}
        encrypt = await pool.encrypt(
            plain, enc, kit.name("g"), "--stop-when-idle", IDLE, name="enc", **eos
        )
        assert await encrypt.wait(90) == 0, encrypt.tail()
        assert "producer: transactional (exactly-once)" in encrypt.log.read_text()
        decrypt = await pool.decrypt(
            enc, dec, dlq, kit.name("g"), "--stop-when-idle", IDLE, name="dec", **eos
        )
        assert await decrypt.wait(90) == 0, decrypt.tail()
        assert Counter(map(Rec.of, await kit.read(bootstrap, dec))) == Counter(map(Rec.of, source))
        assert encrypt.stats()["records_out"] == len(source)
        assert len(await kit.read(bootstrap, f"{enc}.keys")) >= 1
        # inspect finds the topics and the headers on Apache Kafka too
        done = await asyncio.to_thread(
            cli, "inspect", "--topic", enc, "--json", "--limit", "1000", env=pool.environ()
        )
        assert done.returncode == 0, done.stderr
        lines = [orjson.loads(line) for line in done.stdout.splitlines()]
        assert {(line["verdict"], line["format"]) for line in lines} == {
            ("verified", "v2"),
            ("tombstone", None),
        }
    finally:
        await pool.close()
        await asyncio.to_thread(dev.down, tmp_path / "kafka")


# --- the library -----------------------------------------------------------------------------


async def test_library_v2_writer_and_a_restarted_reader_through_the_broker(dev_env: DevEnv) -> None:
    bootstrap = dev_env.bootstrap_servers
    topic = kit.name("v2lib")
    keys_topic = f"{topic}.keys"
    await kit.create_topic(bootstrap, topic)
    await create_keys_topic(bootstrap, keys_topic)
    settings = load_settings(environ={**dev_env.as_environ(), "ENVPIPE_FORMAT": "v2"})
    records = kit.keyed(200, 300)

    async with kit.moto(dev_env) as (aws, _):
        kms = CountingKms(aws)
        with pytest.raises(ConfigError, match=r"^ENVPIPE_FORMAT: v2 needs a keys topic"):
            v2_encryptor(kms, dev_env, topic, None)  # type: ignore[arg-type]
        writer = await KeysTopicWriter.open(keys_topic, bootstrap_servers=bootstrap)
        encryptor = await Encryptor.from_settings(kms, settings, stream=topic, header_sink=writer)
        first = await encryptor.seal(records[0].value or b"", records[0].key)
        # The header is acknowledged by the broker before the first record under it exists.
        assert [r.key for r in await kit.read(bootstrap, keys_topic)] == [dek_id_of(first)]
        rest = await encryptor.seal_many([(r.value or b"", r.key) for r in records[1:]])
        await encryptor.close()
        await writer.close()
        await kit.produce(bootstrap, topic, envelopes(records, [first, *rest]))

        reader = await KeysTopicReader.open(keys_topic, bootstrap_servers=bootstrap)
        decryptor = await Decryptor.from_settings(kms, settings, header_source=reader)
        try:
            fetched = await kit.read(bootstrap, topic)
            opened = await decryptor.open_many_with_context([(r.value, r.key) for r in fetched])
        finally:
            await decryptor.close()
            await reader.close()
    assert reader.loaded == writer.published == 1
    assert {r.key: result for r, result in zip(fetched, opened, strict=True)} == {
        r.key: (r.value, {STREAM_CONTEXT_KEY: topic}) for r in records
    }
    assert kms.calls["unwrap"] == 1
    assert (kms.calls["generate_data_key"], kms.calls["sign"]) == (1, 1)


# --- inspect ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inspected:
    """A topic holding v1 and v2 records, and what inspect must say about each, in order."""

    topic: str
    keys_topic: str
    verdicts: list[tuple[str, str | None]]  # (verdict, format)
    dek_ids: list[str | None]


@pytest.fixture(scope="module")
async def inspected(dev_env: DevEnv) -> Inspected:
    bootstrap = dev_env.bootstrap_servers
    topic, keys_topic = kit.name("v2inspect"), kit.name("v2inspect-keys")
    await kit.create_topic(bootstrap, topic, partitions=1)
    published, unpublished = InMemoryHeaders(), InMemoryHeaders()
    async with kit.moto(dev_env) as (kms, _):
        v1 = kit.encryptor(kms, dev_env, topic)
        v2, lost = (
            v2_encryptor(kms, dev_env, topic, published),
            v2_encryptor(kms, dev_env, topic, unpublished),
        )
        values = [
            await v1.seal(b"order 1", b"a"),
            await v2.seal(b"order 2", b"b"),
            await v2.seal(b"order 3", None),
            await lost.seal(b"order 4", b"d"),
        ]
        for encryptor in (v1, v2, lost):
            await encryptor.close()
    v2_id = dek_id_of(values[1])
    await publish_headers(bootstrap, keys_topic, [(v2_id, published.get(v2_id) or b"")])
    keys = [b"a", b"b", None, b"d", b"e"]
    await kit.produce(
        bootstrap, topic, [Rec(k, v) for k, v in zip(keys, [*values, None], strict=True)]
    )
    return Inspected(
        topic=topic,
        keys_topic=keys_topic,
        verdicts=[
            ("verified", "v1"),
            ("verified", "v2"),
            ("verified", "v2"),
            ("header_missing", None),
            ("tombstone", None),
        ],
        dek_ids=[decode_header(values[0])[0].dek_id.hex(), v2_id.hex(), v2_id.hex(), None, None],
    )


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`envpipe ARGS` as a user runs it, from the checkout; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _inspect(
    dev_env: DevEnv, tmp_path: Path, topic: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return cli("inspect", "--topic", topic, *args, env=Workers(dev_env, tmp_path).environ(**env))


def test_inspect_json_joins_v2_records_with_their_headers(
    inspected: Inspected, dev_env: DevEnv, tmp_path: Path
) -> None:
    done = _inspect(
        dev_env, tmp_path, inspected.topic, "--json", ENVPIPE_KEYS_TOPIC=inspected.keys_topic
    )
    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [(line["verdict"], line["format"]) for line in lines] == inspected.verdicts
    assert [line["header"] and line["header"]["dek_id"] for line in lines] == inspected.dek_ids
    joined = lines[1]["header"]
    assert joined["version"] == 2
    assert (joined["kms_key_id"], joined["signing_key_id"]) == (
        dev_env.kms_key_canonical,
        dev_env.signing_key_canonical,
    )
    assert joined["encryption_context"] == {STREAM_CONTEXT_KEY: inspected.topic}
    assert joined["wrapped_dek_bytes"] > 0
    assert lines[1]["value_bytes"] == len(b"order 2") + envelope_v2.PREFIX_SIZE + 12 + 1 + 16
    assert "5 records: 1 header_missing, 1 tombstone, 3 verified." in done.stderr
    assert "unwrap 0." in done.stderr


def test_inspect_text_shows_the_format_and_the_joined_header(
    inspected: Inspected, dev_env: DevEnv, tmp_path: Path
) -> None:
    done = _inspect(dev_env, tmp_path, inspected.topic, ENVPIPE_KEYS_TOPIC=inspected.keys_topic)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.findall(r"^ +format +(v\d)$", out, re.MULTILINE) == ["v1", "v2", "v2"]
    assert out.count(f"dek id      {inspected.dek_ids[1]}") == 2
    assert re.search(r"^ +0 +3 +header_missing ", out, re.MULTILINE), out
    assert "order" not in out  # no plaintext
    assert out.rstrip().endswith("unwrap 0.")
    # Without the keys topic's name it looks in <topic>.keys, which is not there.
    default = _inspect(dev_env, tmp_path, inspected.topic, "--json")
    assert [orjson.loads(line)["verdict"] for line in default.stdout.splitlines()][1:4] == [
        "header_missing"
    ] * 3


# --- the demo --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_in_v2_passes_with_at_most_48_bytes_of_overhead(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    command = ["demo", "--format", "v2", "--records", "3000", "--state-dir", str(state_dir)]
    done = cli(*command, timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "PASSED: all 3,000 records identical (key, value, headers)" in out
    assert "format v2" in out.splitlines()[1]
    rows = {line.split("  ")[1].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert rows["wire format"].rstrip().endswith("v2")
    overhead = re.search(
        r"([\d.]+) B/record \(version \+ dek_id 17 B \+ nonce 12 B", rows["envelope overhead"]
    )
    assert overhead, rows["envelope overhead"]
    assert float(overhead.group(1)) <= 48
    headers = re.search(r"([\d,]+) headers in \S+\.keys", rows["keys topic"])
    assert headers, rows["keys topic"]
    assert int(headers.group(1).replace(",", "")) >= 1
    assert "unwrap 1" in rows["KMS calls, decrypt worker"]
    assert not (state_dir / "state.json").exists()  # the services were stopped
