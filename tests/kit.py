"""What the end-to-end tests share: records, topics, and worker subprocesses.

Workers run as subprocesses (`python -m workers.cli ...`) configured only through the
environment, as an operator would run them; their stats files (ENVPIPE_STATS_FILE) and logs
land in the test's tmp_path. Records carry unique keys, so "nothing lost" is a set comparison
and duplicates can be counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks.rigs.kms_proxy import KmsFaultProxy
from pipeline.config import load_settings
from pipeline.decryptor import Decryptor
from pipeline.encryptor import Encryptor
from pipeline.envelope import decode_envelope, encode_header, encode_record, signed_bytes
from pipeline.keys_topic import topic_partitions
from pipeline.kms import AwsKms, CountingKms, open_kms
from pipeline.types import Kms
from workers.contract import ERROR_HEADER, SOURCE_HEADER, STATS_FILE_ENV
from workers.dev import DevEnv
from workers.kafka_access import KafkaAccess
from workers.supervisor import Child, until
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


def name(prefix: str) -> str:
    return f"{prefix}-{uuid4().hex[:8]}"


async def create_topic(
    bootstrap: str, topic: str, partitions: int = 3, replication: int = 1
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, replication)])
    finally:
        await admin.close()


async def produce(bootstrap: str | KafkaAccess, topic: str, records: Iterable[Rec]) -> list[Any]:
    """Produce in order with the default partitioner; returns each record's metadata.

    `bootstrap` is a plaintext "host:port", or a KafkaAccess (TLS, say).
    """
    producer = AIOKafkaProducer(
        **KafkaAccess.of(bootstrap).client_kwargs(), acks="all", linger_ms=5, max_batch_size=1 << 20
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
        # A worker that is still starting may not have created the topic yet; Apache Kafka 4
        # also gives a starting consumer no metadata until it is asked for.
        consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap)
        await consumer.start()
        partitions: set[int] | None = None

        async def known() -> bool:
            nonlocal partitions
            partitions = await topic_partitions(consumer, self._topic)
            return bool(partitions)

        await until(known, within=120, interval=0.1)
        assert partitions, f"topic {self._topic} never appeared"
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


async def read(
    bootstrap: str | KafkaAccess, topic: str, *, read_committed: bool = False
) -> list[Any]:
    """Every record of `topic` that is there now (up to each partition's high watermark, or
    its last stable offset with `read_committed`)."""
    records = scan(bootstrap, topic, client_id="test", read_committed=read_committed)
    return [record async for batch in records for record in batch]


async def count(bootstrap: str, topic: str) -> int:
    return len(await read(bootstrap, topic))


async def committed(bootstrap: str, group: str, topic: str, partitions: int = 3) -> list[int]:
    """The group's committed offset per partition (0 where nothing was committed)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        return [
            (await consumer.committed(TopicPartition(topic, p))) or 0 for p in range(partitions)
        ]
    finally:
        await consumer.stop()


def keyed(n: int, size: int, prefix: str = "k") -> list[Rec]:
    """`n` records with unique keys and a marked, random value."""
    rng = random.Random(n)
    return [
        Rec(f"{prefix}{i:07d}".encode(), MARKER + rng.randbytes(size - len(MARKER)))
        for i in range(n)
    ]


def running(pid: int) -> bool:
    """Whether the PID is a live process (a zombie awaiting its reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def duplicates(records: Sequence[Any]) -> int:
    return sum(n - 1 for n in Counter(record.key for record in records).values())


# --- worker processes ------------------------------------------------------------------------


@dataclass
class Proc:
    """One worker subprocess (a `workers.supervisor.Child`), with its log and stats file."""

    name: str
    child: Child
    log: Path
    stats_file: Path

    @property
    def returncode(self) -> int | None:
        return self.child.poll()

    @property
    def pid(self) -> int:
        return self.child.pid

    def signal(self, sig: int) -> None:
        self.child.signal(sig)

    def kill(self) -> None:
        self.child.kill()

    async def wait(self, within: float = 60) -> int:
        code = await self.child.wait(within)
        if code is None:
            pytest.fail(f"worker {self.name} still running after {within}s:\n{self.tail()}")
        return code

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
        child = Child.spawn(
            [sys.executable, "-m", "workers.cli", command, *args],
            name=f"worker {name}",
            log=log,
            env=env,
            cwd=REPO,
        )
        proc = Proc(name, child, log, stats_file)
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
            if proc.returncode is None:
                proc.kill()
                await proc.child.wait(10)


@contextlib.asynccontextmanager
async def moto(
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


@contextlib.asynccontextmanager
async def service(env: DevEnv) -> AsyncIterator[CountingKms]:
    """A counting client of `env`'s cryptography service, configured as a worker would be."""
    environ = env.as_environ()
    kms = CountingKms(await open_kms(load_settings(environ=environ), environ))
    try:
        yield kms
    finally:
        await kms.close()


def service_url(env: DevEnv) -> str:
    """The HTTP endpoint of `env`'s service (for a fault proxy in front of it)."""
    return env.variables["VAULT_ADDR"] if env.provider == "vault" else env.kms_endpoint


def through(env: DevEnv, proxy: KmsFaultProxy) -> dict[str, str]:
    """The variables that point a worker at `proxy` instead of `env`'s service."""
    name = "VAULT_ADDR" if env.provider == "vault" else "ENVPIPE_KMS_ENDPOINT"
    return {name: proxy.endpoint}


def fault_proxy(env: DevEnv) -> KmsFaultProxy:
    """A fault proxy in front of `env`'s service, answering faults in its protocol."""
    return KmsFaultProxy(service_url(env), protocol="vault" if env.provider == "vault" else "aws")


async def sealer(kms: Kms, env: DevEnv, stream: str) -> Encryptor:
    """An Encryptor as `env`'s encrypt worker would build it (its settings, its keys)."""
    return await Encryptor.from_settings(
        kms, load_settings(environ=env.as_environ()), stream=stream
    )


async def opener(kms: Kms, env: DevEnv) -> Decryptor:
    """A Decryptor as `env`'s decrypt worker would build it."""
    return await Decryptor.from_settings(kms, load_settings(environ=env.as_environ()))


def decryptor(kms: AwsKms, env: DevEnv) -> Decryptor:
    return Decryptor(
        kms,
        allowed_kms_keys=[env.kms_key_canonical],
        allowed_signing_keys=[env.signing_key_canonical],
    )


def encryptor(kms: AwsKms, env: DevEnv, stream: str, kms_key_id: str | None = None) -> Encryptor:
    return Encryptor(
        kms,
        kms_key_id=kms_key_id or env.kms_key_canonical,
        signing_key_id=env.signing_key_canonical,
        stream=stream,
    )


# --- shared record sets and checks ---------------------------------------------------------


def mixed_records(n: int) -> list[Rec]:
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


def flip(value: bytes, index: int) -> bytes:
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


# --- streams, logs and forged envelopes ------------------------------------------------------


async def produce_steadily(
    bootstrap: str,
    topic: str,
    records: Sequence[Rec],
    *,
    chunk: int = 1_000,
    pause: float = 0.2,
    until: asyncio.Event | None = None,
) -> None:
    """Produce `records` in chunks with a pause between them: a live stream, not a backlog.

    Once `until` is set, the rest goes out at once, in one produce call.
    """
    for start in range(0, len(records), chunk):
        if until is not None and until.is_set():
            await produce(bootstrap, topic, records[start:])
            return
        await produce(bootstrap, topic, records[start : start + chunk])
        await asyncio.sleep(pause)


async def logged(proc: Proc, text: str, within: float = 60) -> None:
    """Wait until the worker's log contains `text` (fails with the log's tail if it never does)."""
    if not await until(lambda: proc.child.logged(text), within, interval=0.1):
        pytest.fail(f"{proc.name}: no {text!r} within {within}s:\n{proc.tail()}")


async def forge(
    sealed: bytes,
    *,
    sign: Callable[[bytes], Awaitable[bytes]] | None = None,
    **changes: Any,
) -> bytes:
    """The envelope `sealed` with header fields changed (`dek_id=...`, `signature=...`).

    With `sign`, the new header is signed over its bytes S (as a writer holding that signing
    key would); without it, the signature is whatever `changes` leave it. Nonce and
    ciphertext are kept.
    """
    envelope = decode_envelope(sealed)
    header = replace(envelope.header, **changes)
    if sign is not None:
        header = replace(header, signature=await sign(signed_bytes(header)))
    return encode_record(encode_header(header), envelope.nonce, envelope.ciphertext)


def assert_dead_letters_by_source(
    letters: Sequence[Any], records: Sequence[tuple[str, Rec]], metadata: Sequence[Any], topic: str
) -> None:
    """Like `assert_dead_letters`, matched by `envpipe.source` rather than by record key (so
    keys may repeat or be null). `records` are all that were produced, as (reason, record);
    a reason of "" marks a good record, which must not be in the DLQ."""
    expected = {
        f"{topic}/{meta.partition}/{meta.offset}": (reason, rec)
        for (reason, rec), meta in zip(records, metadata, strict=True)
        if reason
    }
    assert len(letters) == len(expected)
    for letter in letters:
        source = dict(letter.headers)[SOURCE_HEADER].decode()
        reason, rec = expected.pop(source)
        assert (letter.key, letter.value) == (rec.key, rec.value), source  # the original bytes
        assert tuple(letter.headers) == (
            *rec.headers,
            (ERROR_HEADER, reason.encode()),
            (SOURCE_HEADER, source.encode()),
        ), source
    assert not expected
