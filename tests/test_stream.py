"""The stream workers end to end: real embedded broker, real KMS emulator, real processes.

Workers run as subprocesses (`python -m workers.cli ...`) configured only through the
environment, as an operator would run them; their stats files (ENVPIPE_STATS_FILE) and logs
land in the test's tmp_path. Every test uses its own topics and consumer groups. Records
carry unique keys, so "nothing lost" is a set comparison and duplicates can be counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline.crypto import Decryptor, Encryptor
from pipeline.envelope import VERSION_HEADER, decode_header
from pipeline.errors import KmsUnavailableError
from pipeline.kms import AwsKms
from tests.faults import KmsFaultProxy
from workers.dev import DevEnv
from workers.stats import Histogram
from workers.stream import ERROR_HEADER, SOURCE_HEADER, STATS_FILE_ENV
from workers.topics import scan

REPO = Path(__file__).resolve().parent.parent
MARKER = b"PLAINTEXT-MARKER-7f3a9c"
IDLE = "3"  # --stop-when-idle for workers that should finish by themselves

Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class Rec:
    """A record as the tests compare them: everything that must survive the round trip."""

    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    timestamp: int | None = None

    @classmethod
    def of(cls, record: Any) -> Rec:
        return cls(record.key, record.value, tuple(record.headers), record.timestamp)


# --- Kafka helpers ---------------------------------------------------------------------------


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid4().hex[:8]}"


async def _create_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, records: Iterable[Rec]) -> list[Any]:
    """Produce in order with the default partitioner; returns each record's metadata."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20
    )
    await producer.start()
    try:
        futures = []
        for rec in records:
            if rec.key is None and rec.value is None:  # send() refuses these
                batch = producer.create_batch()
                batch.append(key=None, value=None, timestamp=rec.timestamp, headers=[*rec.headers])
                partition = random.choice(sorted(await producer.partitions_for(topic)))
                futures.append(await producer.send_batch(batch, topic, partition=partition))
            else:
                futures.append(
                    await producer.send(
                        topic,
                        rec.value,
                        key=rec.key,
                        headers=[*rec.headers],
                        timestamp_ms=rec.timestamp,
                    )
                )
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


class Tail:
    """Reads a topic from the beginning as it grows, to watch a worker's progress.

    Counting what was read, not `end_offsets()`: the embedded broker answers
    ListOffsets(latest) with the base offset of the last batch + 1 (see workers/topics.py).
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self.records: list[Any] = []

    async def __aenter__(self) -> Tail:
        # A starting consumer reads the metadata of all topics, which never auto-creates
        # this one; a worker that is still starting may not have created it yet.
        while True:
            consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap)
            await consumer.start()
            if partitions := consumer.partitions_for_topic(self._topic):
                break
            await asyncio.sleep(0.1)  # stopping a consumer at once trips over its own task
            await consumer.stop()
        self._consumer = consumer
        assigned = [TopicPartition(self._topic, p) for p in partitions]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def poll(self, seconds: float = 0.05) -> int:
        """Read what has arrived (waiting up to `seconds`); the number of records so far."""
        for part in (await self._consumer.getmany(timeout_ms=int(seconds * 1000))).values():
            self.records.extend(part)
        return len(self.records)

    async def wait_for(self, at_least: int, within: float) -> int:
        """Poll until `at_least` records have arrived; returns the count seen."""
        deadline = asyncio.get_running_loop().time() + within
        while (count := await self.poll()) < at_least:
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"{self._topic}: {count} records after {within}s, not {at_least}")
        return count

    async def settled(self, quiet: float = 2.0) -> int:
        """The record count once nothing new has arrived for `quiet` seconds."""
        count = -1
        while (now := await self.poll(quiet)) != count:
            count = now
        return count


async def _read(bootstrap: str, topic: str) -> list[Any]:
    """Every record of `topic` that is there now (up to each partition's high watermark)."""
    return [r async for batch in scan(bootstrap, topic, client_id="test") for r in batch]


async def _count(bootstrap: str, topic: str) -> int:
    return len(await _read(bootstrap, topic))


async def _committed(bootstrap: str, group: str, topic: str, partitions: int = 3) -> list[int]:
    """The group's committed offset per partition (0 where nothing was committed)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        return [
            (await consumer.committed(TopicPartition(topic, p))) or 0 for p in range(partitions)
        ]
    finally:
        await consumer.stop()


def _keyed(n: int, size: int, prefix: str = "k") -> list[Rec]:
    """`n` records with unique keys and a marked, random value."""
    rng = random.Random(n)
    return [
        Rec(f"{prefix}{i:07d}".encode(), MARKER + rng.randbytes(size - len(MARKER)))
        for i in range(n)
    ]


def _duplicates(records: Sequence[Any]) -> int:
    return sum(n - 1 for n in Counter(record.key for record in records).values())


# --- worker processes ------------------------------------------------------------------------


@dataclass
class Proc:
    """One worker subprocess, with its log and stats file."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    stats_file: Path

    async def wait(self, within: float = 60) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            pytest.fail(f"worker {self.name} still running after {within}s:\n{self.tail()}")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.stats_file.read_text())
        return result

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Workers:
    """Starts workers against the session's broker and KMS; kills any left at teardown."""

    def __init__(self, env: DevEnv, tmp_path: Path) -> None:
        self._env = env
        self._tmp = tmp_path
        self._procs: list[Proc] = []

    def environ(self, **overrides: str) -> dict[str, str]:
        """dev.env's variables and nothing of the developer's AWS setup."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self._tmp),
            "PYTHONPATH": str(REPO),
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            **self._env.as_environ(),
            **overrides,
        }

    async def start(self, command: str, *args: str, name: str, **overrides: str) -> Proc:
        log = self._tmp / f"{name}.log"
        stats_file = self._tmp / f"{name}.json"
        env = self.environ(**{STATS_FILE_ENV: str(stats_file), **overrides})
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "workers.cli",
                command,
                *args,
                cwd=REPO,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        proc = Proc(name, process, log, stats_file)
        self._procs.append(proc)
        return proc

    async def encrypt(
        self, source: str, dest: str, group: str, *extra: str, name: str, **env: str
    ) -> Proc:
        args = ["--source", source, "--dest", dest, "--group", group, *extra]
        return await self.start("encrypt", *args, name=name, **env)

    async def decrypt(
        self, source: str, dest: str, dlq: str, group: str, *extra: str, name: str, **env: str
    ) -> Proc:
        args = ["--source", source, "--dest", dest, "--dlq", dlq, "--group", group, *extra]
        return await self.start("decrypt", *args, name=name, **env)

    async def close(self) -> None:
        for proc in self._procs:
            if proc.process.returncode is None:
                proc.process.kill()
                await proc.process.wait()


@pytest.fixture
async def workers(dev_env: DevEnv, tmp_path: Path) -> AsyncIterator[Workers]:
    pool = Workers(dev_env, tmp_path)
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def _moto(
    env: DevEnv, endpoint: str | None = None, attempts: int = 3
) -> AsyncIterator[tuple[AwsKms, Any]]:
    """An AwsKms on the session's moto (or `endpoint`), plus the raw client (to create keys)."""
    stack = AsyncExitStack()
    client = await stack.enter_async_context(
        get_session().create_client(
            "kms",
            region_name=env.region,
            endpoint_url=endpoint or env.kms_endpoint,
            aws_access_key_id=env.access_key_id,
            aws_secret_access_key=env.secret_access_key,
            config=AioConfig(retries={"total_max_attempts": attempts, "mode": "standard"}),
        )
    )
    kms = AwsKms(client, stack)
    try:
        yield kms, client
    finally:
        await kms.close()


def _decryptor(kms: AwsKms, env: DevEnv) -> Decryptor:
    return Decryptor(
        kms, allowed_kms_keys=[env.kms_key_arn], allowed_signing_keys=[env.signing_key_arn]
    )


def _encryptor(kms: AwsKms, env: DevEnv, stream: str, kms_key_id: str | None = None) -> Encryptor:
    return Encryptor(
        kms,
        kms_key_id=kms_key_id or env.kms_key_arn,
        signing_key_id=env.signing_key_arn,
        stream=stream,
    )


# --- the histogram ---------------------------------------------------------------------------


def test_histogram_percentiles_are_within_one_percent() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(3, 2) for _ in range(50_000)] + [0.0, -5.0]
    histogram = Histogram()
    histogram.add_many(values)
    ordered = sorted(values)
    for p in (1, 10, 50, 90, 99, 99.9, 100):
        exact = ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]
        assert histogram.percentile(p) == pytest.approx(exact, rel=0.0101), p
    assert histogram.count == len(values)
    assert -5.0 <= histogram.percentile(0) <= 0.01  # at or below the smallest bucket
    assert Histogram().summary() == {"p50": None, "p99": None, "p999": None}


# --- the fault proxy itself ------------------------------------------------------------------


async def test_fault_proxy_modes_reach_the_client_as_retriable_errors(dev_env: DevEnv) -> None:
    async with (
        KmsFaultProxy(dev_env.kms_endpoint) as proxy,
        _moto(dev_env, proxy.endpoint, attempts=1) as (kms, _),
    ):
        arn = await kms.resolve_key_id(dev_env.kms_key_id)
        assert arn == dev_env.kms_key_arn
        for mode, code in [("throttle", "ThrottlingException"), ("internal", "KMSInternal")]:
            await proxy.set_mode(mode)  # type: ignore[arg-type]
            with pytest.raises(KmsUnavailableError, match=code):
                await kms.generate_data_key(arn, {"envpipe:stream": "s"})
        await proxy.set_mode("refuse")
        with pytest.raises(KmsUnavailableError, match="ConnectionError"):
            await kms.sign(dev_env.signing_key_arn, b"m")
        await proxy.set_mode("stall")
        call = asyncio.ensure_future(kms.generate_data_key(arn, {"envpipe:stream": "s"}))
        await asyncio.sleep(0.5)
        assert not call.done()
        await proxy.set_mode("pass")
        assert (await asyncio.wait_for(call, 5)).key_id == arn
    assert proxy.count("stall", "GenerateDataKey") == 1
    assert proxy.count("throttle") == proxy.count("internal") == 1


# --- 1. the round trip -----------------------------------------------------------------------


def _mixed_records(n: int) -> list[Rec]:
    """Unique keys, null keys, tombstones (also keyless), empty values, repeated headers."""
    rng = random.Random(1)
    records = []
    for i in range(n):
        key = None if i % 7 == 3 else f"key-{i:05d}".encode()
        if i % 11 == 5 and key is not None:
            value = None
        elif i % 97 == 0:
            value = b""
        else:
            value = MARKER + rng.randbytes(i * 37 % 1500)
        headers: Headers = (
            (("trace-id", str(i).encode()), ("dup", b"a"), ("dup", b"b"), ("empty", b"")),
            (),
            (("tenant", b"acme"),),
        )[i % 3]
        records.append(Rec(key, value, headers))
    for i in (100, n // 2, n - 1):
        records[i] = Rec(None, None, (("keyless-tombstone", str(i).encode()),))
    return records


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_encrypt_then_decrypt_returns_every_record(dev_env: DevEnv, workers: Workers) -> None:
    bootstrap = dev_env.bootstrap_servers
    plain, enc, dec, dlq = (_name(f"rt-{part}") for part in ("plain", "enc", "dec", "dlq"))
    await _create_topic(bootstrap, plain)
    originals = _mixed_records(20_000)
    await _produce(bootstrap, plain, originals)
    source = await _read(bootstrap, plain)
    assert len(source) == len(originals)

    encrypt = await workers.encrypt(plain, enc, _name("g"), "--stop-when-idle", IDLE, name="enc")
    assert await encrypt.wait(90) == 0, encrypt.tail()
    sealed = await _read(bootstrap, enc)
    decrypt = await workers.decrypt(
        enc,
        dec,
        dlq,
        _name("g"),
        "--stop-when-idle",
        IDLE,
        name="dec",
        ENVPIPE_MAX_INFLIGHT_RECORDS="1000",  # backpressure: pause and resume, many times
    )
    assert await decrypt.wait(90) == 0, decrypt.tail()
    opened = await _read(bootstrap, dec)

    # Nothing readable on the encrypted topic; tombstones stay tombstones.
    assert len(sealed) == len(source)
    assert not [r for r in sealed if r.value is not None and MARKER in r.value]
    assert all(r.headers[-1] == VERSION_HEADER for r in sealed)
    tombstones = sum(r.value is None for r in source)
    assert sum(r.value is None for r in sealed) == tombstones
    # The round trip: key, value, headers and timestamp, as a multiset.
    assert Counter(map(Rec.of, opened)) == Counter(map(Rec.of, source))
    assert await _count(bootstrap, dlq) == 0
    # The default partitioner keeps a key's partition, topic to topic.
    where = {r.key: r.partition for r in source if r.key is not None}
    assert all(where[r.key] == r.partition for r in (*sealed, *opened) if r.key is not None)

    for stats, direction in ((encrypt.stats(), "encrypt"), (decrypt.stats(), "decrypt")):
        assert stats["direction"] == direction
        assert stats["records_in"] == stats["records_out"] == len(source)
        assert stats["tombstones"] == tombstones
        assert stats["dlq"] == 0
        assert stats["active_seconds"] > 0
        assert stats["records_per_s"] > 0
        assert 0 < stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"]
        assert stats["envelope_overhead_bytes"] > 300
        assert stats["cache"]["hit"] > 0
    assert encrypt.stats()["kms_calls"]["GenerateDataKey"] >= 1
    assert decrypt.stats()["kms_calls"]["Decrypt"] >= 1
    assert decrypt.stats()["pauses"]["backpressure"] > 1


# --- 2. kill -9 and restart ------------------------------------------------------------------


@dataclass
class Interrupted:
    """An encrypt worker stopped by a signal mid-stream."""

    plain: str
    enc: str
    group: str
    originals: list[Rec]
    written: int  # records on the encrypted topic when the signal was sent
    exit_code: int


async def _interrupt_encrypt(bootstrap: str, workers: Workers, sig: signal.Signals) -> Interrupted:
    """Encrypt 40,000 records and send `sig` once 3,000 are written (small batches: slow)."""
    plain, enc, group = _name(f"{sig.name}-plain"), _name(f"{sig.name}-enc"), _name("g")
    await _create_topic(bootstrap, plain)
    originals = _keyed(40_000, 300)
    await _produce(bootstrap, plain, originals)
    first = await workers.encrypt(plain, enc, group, "--batch-max-records", "100", name="first")
    async with Tail(bootstrap, enc) as tail:
        written = await tail.wait_for(3_000, within=60)
        first.process.send_signal(sig)
    exit_code = await first.wait(45)
    assert written < len(originals), f"the worker finished before {sig.name}"
    return Interrupted(plain, enc, group, originals, written, exit_code)


async def _restart(bootstrap: str, workers: Workers, run: Interrupted) -> list[Any]:
    """Run the group again to the end; returns the encrypted topic, checked for losses."""
    second = await workers.encrypt(
        run.plain, run.enc, run.group, "--stop-when-idle", IDLE, name="second"
    )
    assert await second.wait(90) == 0, second.tail()
    sealed = await _read(bootstrap, run.enc)
    assert {r.key for r in sealed} == {r.key for r in run.originals}, "records were lost"
    assert not [r for r in sealed if MARKER in r.value]
    assert sum(await _committed(bootstrap, run.group, run.plain)) == len(run.originals)
    return sealed


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_kill_9_then_restart_loses_nothing(dev_env: DevEnv, workers: Workers) -> None:
    bootstrap = dev_env.bootstrap_servers
    run = await _interrupt_encrypt(bootstrap, workers, signal.SIGKILL)
    assert run.exit_code == -signal.SIGKILL
    sealed = await _restart(bootstrap, workers, run)
    print(f"kill -9 after {run.written} records: {_duplicates(sealed)} duplicates, 0 lost")


# --- 3. KMS outage ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_encrypt_rides_out_a_kms_outage(dev_env: DevEnv, workers: Workers) -> None:
    bootstrap = dev_env.bootstrap_servers
    plain, enc, group = _name("outage-plain"), _name("outage-enc"), _name("g")
    await _create_topic(bootstrap, plain)
    originals = _keyed(9_000, 200)
    before, during = originals[:3_000], originals[3_000:]
    await _produce(bootstrap, plain, before)

    async with KmsFaultProxy(dev_env.kms_endpoint) as proxy:
        worker = await workers.encrypt(
            plain,
            enc,
            group,
            "--stop-when-idle",
            "4",
            name="outage",
            ENVPIPE_KMS_ENDPOINT=proxy.endpoint,
            ENVPIPE_DEK_MAX_RECORDS="2000",
            ENVPIPE_DEK_GRACE_SECONDS="1",
            ENVPIPE_KMS_RETRY_MAX_SECONDS="1",
        )
        async with Tail(bootstrap, enc) as tail:
            await tail.wait_for(len(before), within=60)
            await proxy.set_mode("refuse")
            await _produce(bootstrap, plain, during)
            stalled = await tail.settled()
            # The spent DEK stopped the worker; grace never stretches a DEK's record limit.
            assert len(before) <= stalled < len(originals)
            for mode in ("throttle", "internal", "stall"):
                await proxy.set_mode(mode)
                assert await tail.poll(3) == stalled
                assert proxy.count(mode) > 0, f"the worker made no KMS call while in {mode}"
        assert worker.process.returncode is None

        await proxy.set_mode("pass")
        assert await worker.wait(90) == 0, worker.tail()

    sealed = await _read(bootstrap, enc)
    assert {r.key for r in sealed} == {r.key for r in originals}
    plaintext = {r.key: r.value for r in originals}
    async with _moto(dev_env) as (kms, _):
        decryptor = _decryptor(kms, dev_env)
        opened = await decryptor.open_many([(r.value, r.key) for r in sealed])
    assert all(value == plaintext[r.key] for r, value in zip(sealed, opened, strict=True))
    assert worker.stats()["pauses"]["kms"] >= 1
    log = worker.log.read_text()
    assert "retry" in log
    assert dev_env.secret_access_key not in log
    print(f"outage: stalled at {stalled}, {_duplicates(sealed)} duplicates")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_decrypt_holds_good_records_through_a_kms_outage(
    dev_env: DevEnv, workers: Workers
) -> None:
    bootstrap = dev_env.bootstrap_servers
    enc, dec, dlq, group = (_name(f"dout-{part}") for part in ("enc", "dec", "dlq", "g"))
    await _create_topic(bootstrap, enc)
    originals = _keyed(2_000, 200)
    async with _moto(dev_env) as (kms, _):
        # Two encryptors, two DEKs: the second one is first seen during the outage.
        first, second = _encryptor(kms, dev_env, enc), _encryptor(kms, dev_env, enc)
        pairs = [(r.value or b"", r.key) for r in originals]
        sealed_a = await first.seal_many(pairs[:1_000])
        sealed_b = await second.seal_many(pairs[1_000:])
        await first.close()
        await second.close()
    envelopes = [
        Rec(r.key, value, (VERSION_HEADER,))
        for r, value in zip(originals, [*sealed_a, *sealed_b], strict=True)
    ]
    await _produce(bootstrap, enc, envelopes[:1_000])

    async with KmsFaultProxy(dev_env.kms_endpoint) as proxy:
        worker = await workers.decrypt(
            enc,
            dec,
            dlq,
            group,
            "--stop-when-idle",
            "4",
            name="decrypt-outage",
            ENVPIPE_KMS_ENDPOINT=proxy.endpoint,
            ENVPIPE_KMS_RETRY_MAX_SECONDS="1",
        )
        async with Tail(bootstrap, dec) as tail:
            await tail.wait_for(1_000, within=60)
            await proxy.set_mode("internal")
            await _produce(bootstrap, enc, envelopes[1_000:])
            assert await tail.poll(3) == 1_000
        assert proxy.count("internal", "Decrypt") > 0
        await proxy.set_mode("pass")
        assert await worker.wait(90) == 0, worker.tail()

    assert await _count(bootstrap, dlq) == 0
    opened = await _read(bootstrap, dec)
    assert Counter((r.key, r.value) for r in opened) == Counter((r.key, r.value) for r in originals)


# --- 4. hostile input goes to the DLQ --------------------------------------------------------


def _flip(value: bytes, index: int) -> bytes:
    return value[:index] + bytes([value[index] ^ 0x01]) + value[index + 1 :]


def assert_dead_letters(
    letters: Sequence[Any], bad: Sequence[tuple[str, Any]], metadata: Sequence[Any], topic: str
) -> None:
    """Each bad record is in the DLQ once: original bytes and headers, reason and source."""
    assert len(letters) == len(bad)
    dead = {r.key: r for r in letters}
    for (reason, rec), meta in zip(bad, metadata, strict=True):
        letter = dead[rec.key]
        assert letter.value == rec.value  # the original bytes
        assert tuple(letter.headers) == (
            *rec.headers,
            (ERROR_HEADER, reason.encode()),
            (SOURCE_HEADER, f"{topic}/{meta.partition}/{meta.offset}".encode()),
        ), rec.key


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_bad_records_are_dead_lettered_and_good_ones_arrive(
    dev_env: DevEnv, workers: Workers
) -> None:
    bootstrap = dev_env.bootstrap_servers
    plain, enc, dec, dlq = (_name(f"bad-{part}") for part in ("plain", "enc", "dec", "dlq"))
    await _create_topic(bootstrap, plain)
    originals = [
        Rec(r.key, r.value, (("n", r.key or b""),)) for r in _keyed(300, 150, prefix="good")
    ]
    await _produce(bootstrap, plain, originals)
    encrypt = await workers.encrypt(plain, enc, _name("g"), "--stop-when-idle", IDLE, name="enc")
    assert await encrypt.wait(90) == 0, encrypt.tail()
    sample = (await _read(bootstrap, enc))[0]
    header, _ = decode_header(sample.value)
    wrapped_at = sample.value.index(header.wrapped_dek) + len(header.wrapped_dek) // 2
    signature_at = sample.value.index(header.signature) + 5

    async with _moto(dev_env) as (kms, client):
        foreign_key = (await client.create_key(Description="not on the allowlist"))["KeyMetadata"]
        foreign = _encryptor(kms, dev_env, plain, kms_key_id=foreign_key["Arn"])
        foreign_value = await foreign.seal(MARKER + b"sealed under a foreign key", b"bad-foreign")
        await foreign.close()

    headers = (*sample.headers, ("n", b"bad"))
    value = sample.value
    bad = [  # (expected reason, record)
        ("bad_tag", Rec(b"bad-ciphertext", _flip(value, len(value) - 1), headers)),
        ("bad_tag", Rec(b"bad-other-key", value, headers)),  # the AAD binds the record key
        ("bad_signature", Rec(b"bad-wrapped-dek", _flip(value, wrapped_at), headers)),
        ("bad_signature", Rec(b"bad-signature", _flip(value, signature_at), headers)),
        ("malformed", Rec(b"bad-version-byte", _flip(value, 0), headers)),  # version -2
        ("unknown_version", Rec(b"bad-future", b"\x04" + value[1:], headers)),  # version 2
        ("malformed", Rec(b"bad-plaintext", b'{"card": "4111 1111 1111 1111"}', (("n", b"p"),))),
        ("key_not_allowed", Rec(b"bad-foreign", foreign_value, headers)),
    ]
    metadata = await _produce(bootstrap, enc, [rec for _, rec in bad])

    decrypt = await workers.decrypt(enc, dec, dlq, _name("g"), "--stop-when-idle", IDLE, name="dec")
    assert await decrypt.wait(90) == 0, decrypt.tail()

    opened = await _read(bootstrap, dec)
    assert Counter(map(Rec.of, opened)) == Counter(Rec.of(r) for r in await _read(bootstrap, plain))
    assert_dead_letters(await _read(bootstrap, dlq), bad, metadata, enc)
    stats = decrypt.stats()
    assert stats["dlq"] == len(bad)
    assert stats["records_out"] == len(originals)


# --- 4b. a record that cannot be sealed -----------------------------------------------------

_MAX_REQUEST = 1 << 20  # aiokafka's default max_request_size, which the worker keeps


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_encrypt_dead_letters_a_record_it_cannot_write_or_stops_without_a_dlq(
    dev_env: DevEnv, workers: Workers
) -> None:
    """Its envelope would be too large to produce: DLQ it, or stop and never commit past it."""
    bootstrap = dev_env.bootstrap_servers
    plain = _name("big-plain")
    await _create_topic(bootstrap, plain, partitions=1)
    small = _keyed(100, 100)
    big = Rec(b"big", MARKER + b"\0" * (_MAX_REQUEST - 300))  # fits; its envelope does not
    records = [*small[:50], big, *small[50:]]
    metadata = await _produce(bootstrap, plain, records)
    enc, dlq, enc2 = _name("big-enc"), _name("big-dlq"), _name("big-enc2")
    with_dlq = await workers.encrypt(
        plain, enc, _name("g"), "--dlq", dlq, "--stop-when-idle", IDLE, name="with-dlq"
    )
    group = _name("g")
    without = await workers.encrypt(plain, enc2, group, "--stop-when-idle", IDLE, name="no-dlq")
    assert await with_dlq.wait(90) == 0, with_dlq.tail()
    assert await without.wait(90) == 1, without.tail()

    assert {r.key for r in await _read(bootstrap, enc)} == {r.key for r in small}
    (letter,) = await _read(bootstrap, dlq)
    assert (letter.key, letter.value) == (big.key, big.value)
    assert dict(letter.headers) == {
        ERROR_HEADER: b"too_large",
        SOURCE_HEADER: f"{plain}/0/{metadata[50].offset}".encode(),
    }
    assert "reason=too_large" in without.log.read_text()
    assert (await _committed(bootstrap, group, plain, partitions=1))[0] <= metadata[50].offset


# --- 5. scale-out ----------------------------------------------------------------------------


async def _produce_steadily(bootstrap: str, topic: str, until: asyncio.Event) -> list[Rec]:
    """Produce 500 records every 0.1 s until `until` is set; returns what was produced."""
    produced: list[Rec] = []
    while not until.is_set():
        chunk = _keyed(500, 200, prefix=f"s{len(produced):07d}-")
        await _produce(bootstrap, topic, chunk)
        produced.extend(chunk)
        await asyncio.sleep(0.1)
    return produced


async def _logged(proc: Proc, text: str, within: float = 60) -> None:
    """Wait until the worker's log contains `text`."""
    deadline = asyncio.get_running_loop().time() + within
    while text not in proc.log.read_text():
        assert asyncio.get_running_loop().time() < deadline, f"no {text!r}:\n{proc.tail()}"
        await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_second_worker_takes_over_partitions_under_load(
    dev_env: DevEnv, workers: Workers
) -> None:
    """The second worker joins mid-stream: the first commits on revocation, nothing is lost."""
    bootstrap = dev_env.bootstrap_servers
    plain, enc, group = _name("two-plain"), _name("two-enc"), _name("g")
    await _create_topic(bootstrap, plain)
    stop = asyncio.Event()
    producing = asyncio.ensure_future(_produce_steadily(bootstrap, plain, stop))
    try:
        first = await workers.encrypt(plain, enc, group, "--stop-when-idle", "4", name="w1")
        async with Tail(bootstrap, enc) as tail:
            await tail.wait_for(1, within=60)
        second = await workers.encrypt(plain, enc, group, "--stop-when-idle", "4", name="w2")
        await _logged(first, "partitions revoked: ")  # the first commits what it did
        await _logged(second, f"partitions assigned: {plain}/")
        await asyncio.sleep(2)  # both run under load for a while
    finally:
        stop.set()
        originals = await producing
    for proc in (first, second):
        assert await proc.wait(90) == 0, proc.tail()

    held = [set(proc.stats()["assigned_partitions"]) for proc in (first, second)]
    assert all(held), f"a worker never got a partition: {held}"
    assert held[0] | held[1] == {f"{plain}/{p}" for p in range(3)}
    assert second.stats()["records_in"] > 0
    sealed = await _read(bootstrap, enc)
    assert {r.key for r in sealed} == {r.key for r in originals}
    print(f"two workers, {len(originals)} records: {held}, {_duplicates(sealed)} duplicates")


# --- 6. SIGTERM ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_sigterm_drains_and_commits_exactly_what_was_written(
    dev_env: DevEnv, workers: Workers
) -> None:
    bootstrap = dev_env.bootstrap_servers
    run = await _interrupt_encrypt(bootstrap, workers, signal.SIGTERM)
    assert run.exit_code == 0

    # Everything written is committed, and everything committed was written: a graceful
    # stop leaves nothing to redo.
    committed = await _committed(bootstrap, run.group, run.plain)
    source = await _read(bootstrap, run.plain)
    sealed = await _read(bootstrap, run.enc)
    assert len(sealed) < len(run.originals)
    assert {r.key for r in sealed} == {r.key for r in source if r.offset < committed[r.partition]}
    assert _duplicates(sealed) == 0

    sealed = await _restart(bootstrap, workers, run)
    print(f"SIGTERM after {run.written} records: {_duplicates(sealed)} duplicates after restart")
    assert _duplicates(sealed) == 0
