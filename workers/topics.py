"""Every topic envpipe creates or reads from outside a consumer group, in one place.

Workers create their missing output topics like the source (`ensure_outputs`) and a v2
writer its compacted keys topic (`ensure_keys_topic`); `inspect` and `demo` read whole topics
without joining a group or committing anything (`scan`), and the demo creates its topics
(`create_topics`). Sharing these helpers keeps the edge cases in one place.
Each helper takes a `KafkaAccess` (bootstrap servers and TLS, from the settings) or a bare
"host:port" string, which means plaintext: the embedded broker and the tests use those.

Where a topic ends is taken from the high watermark of fetch responses, not from
`end_offsets()`: the embedded Tansu broker answers ListOffsets(latest) with the base offset
of the last batch plus one, which undercounts a partition whose last batch holds more than
one record.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import cramjam
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as Errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, KafkaError

from pipeline.config import env_name
from pipeline.errors import ConfigError, TopicError
from pipeline.keys_topic import topic_partitions
from workers.kafka_access import KafkaAccess

__all__ = [
    "TopicError",
    "consumer",
    "create_topics",
    "create_with",
    "ensure_keys_topic",
    "ensure_outputs",
    "scan",
]

log = logging.getLogger("envpipe.topics")

_TOPIC_ALREADY_EXISTS = 36
_POLL_MS = 200
_MAX_REPLICATION = 3
#: records stepped through to find an undecodable one (more than one fetch holds)
_LOCATE_MAX_RECORDS = 200_000
#: how long a fetch that returns nothing (a busy broker) is tried again while locating
_LOCATE_WAIT_SECONDS = 10.0

_COMPACT = {"cleanup.policy": "compact"}


async def create_topics(brokers: KafkaAccess | str, names: Iterable[str], partitions: int) -> None:
    """Create the topics (replication factor 1); a topic that already exists is fine."""
    access = KafkaAccess.of(brokers)
    admin = AIOKafkaAdminClient(**access.client_kwargs(), client_id="envpipe-admin")
    try:
        await admin.start()
    except KafkaConnectionError as exc:
        await admin.close()
        raise await access.connection_error(exc) from exc
    try:
        _, failed = await create_with(admin, names, partitions)
    finally:
        await admin.close()
    if failed:
        raise TopicError("cannot create topic(s): " + "; ".join(failed))


async def create_with(
    admin: AIOKafkaAdminClient,
    names: Iterable[str],
    partitions: int,
    replication: int = 1,
    configs: dict[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """Create topics through a started admin client: (created, "topic: why" failures).

    A topic that already exists (another worker was first) is neither.
    """
    response = await admin.create_topics(
        [NewTopic(name, partitions, replication, topic_configs=configs or {}) for name in names]
    )
    created, failed = [], []
    for topic, code, message in response.topic_errors:
        if code == 0:
            created.append(topic)
        elif code != _TOPIC_ALREADY_EXISTS:
            failed.append(f"{topic}: {message or f'error code {code}'}")
    return created, failed


@asynccontextmanager
async def consumer(
    brokers: KafkaAccess | str, *, client_id: str, read_committed: bool = False
) -> AsyncIterator[Any]:
    """A started consumer with no group and no commits, stopped on exit; with
    `read_committed`, it sees only committed transactions (what an exactly-once reader sees)."""
    access = KafkaAccess.of(brokers)
    kafka = AIOKafkaConsumer(
        **access.client_kwargs(),
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
    )
    try:
        await kafka.start()
    except KafkaConnectionError as exc:
        await kafka.stop()
        raise await access.connection_error(exc) from exc
    try:
        yield kafka
    finally:
        await kafka.stop()


async def _partitions(kafka: Any, topic: str) -> list[TopicPartition]:
    """Every partition of `topic`, or a TopicError that says the topic does not exist."""
    partitions = await topic_partitions(kafka, topic)
    if partitions is None:
        listed = ", ".join(sorted(await kafka.topics())) or "none"
        raise TopicError(f"topic {topic!r} does not exist (topics on the broker: {listed})")
    return [TopicPartition(topic, partition) for partition in sorted(partitions)]


async def scan(
    brokers: KafkaAccess | str,
    topic: str,
    *,
    client_id: str,
    limit: int | None = None,
    stall_seconds: float = 15.0,
    read_committed: bool = False,
) -> AsyncGenerator[list[Any], None]:
    """Yield batches of `topic`'s records from the start of every partition, up to its end.

    "The end" is each partition's high watermark as seen when the scan reaches it, so records
    appended meanwhile may or may not be included. Each batch is sorted by (partition,
    offset). Stops after `limit` records; raises TopicError if no partition makes progress
    for `stall_seconds` (a partition without a leader, say). A consumer of its own per scan:
    aiokafka narrows its metadata to the assigned topics, so one cannot scan a second topic.
    """
    async with consumer(brokers, client_id=client_id, read_committed=read_committed) as kafka:
        partitions = await _partitions(kafka, topic)
        kafka.assign(partitions)
        await kafka.seek_to_beginning(*partitions)
        remaining = limit
        last_progress = time.monotonic()
        while remaining is None or remaining > 0:
            pending = [tp for tp in partitions if not await _at_end(kafka, tp, read_committed)]
            if not pending:
                return
            try:
                fetched = await kafka.getmany(*pending, timeout_ms=_POLL_MS, max_records=remaining)
            except DECODE_ERRORS as exc:
                raise TopicError(await undecodable(kafka, exc)) from exc
            batch = sorted(
                (record for records in fetched.values() for record in records),
                key=lambda record: (record.partition, record.offset),
            )
            if batch:
                last_progress = time.monotonic()
                if remaining is not None:
                    batch = batch[:remaining]
                    remaining -= len(batch)
                yield batch
            elif time.monotonic() - last_progress > stall_seconds:
                stuck = ", ".join(str(tp.partition) for tp in pending)
                raise TopicError(f"topic {topic!r}: partition(s) {stuck} stopped answering")


async def undecodable(kafka: Any, exc: BaseException) -> str:
    """Where the record batch that `exc` (from a fetch) could not decode sits, and why.

    aiokafka says neither which partition failed nor where: a fetch that fails returns none
    of its records, not even those before the bad batch, and moves no position. So each
    assigned partition is fetched alone from its position until one fails again, then read
    one record at a time up to the first that cannot be decoded. Positions are restored.
    The answer names the topic, partition and offset.
    """
    kind = type(exc).__name__
    if kind.islower():  # zlib.error, say: name its module too
        kind = f"{type(exc).__module__}.{kind}"
    why = f"{kind}: {exc}"
    for tp in sorted(kafka.assignment()):
        position = await kafka.position(tp)
        try:
            if not await _fetch_fails(kafka, tp):
                continue
            kafka.seek(tp, position)
            offset = await _first_undecodable(kafka, tp)
            at = f"offset {offset}" if offset is not None else f"at or after offset {position}"
            return f"the record batch at {tp.topic}/{tp.partition} {at} cannot be decoded ({why})"
        finally:
            kafka.seek(tp, position)
    return f"a fetched record batch cannot be decoded ({why}); it did not fail again alone"


async def _fetch_fails(kafka: Any, tp: TopicPartition) -> bool:
    """Whether fetching `tp` alone from its position fails (False once records come back,
    or the partition is known to hold nothing more)."""
    deadline = time.monotonic() + _LOCATE_WAIT_SECONDS
    while not await _at_end(kafka, tp) and time.monotonic() < deadline:
        try:
            if await kafka.getmany(tp, timeout_ms=_POLL_MS * 5):
                return False
        except Exception:  # noqa: BLE001 - found it: whatever it raises, this is the one
            return True
    return False


async def _first_undecodable(kafka: Any, tp: TopicPartition) -> int | None:
    """The offset where reading `tp` one record at a time fails (the bad batch lies within
    one fetch of the position, so this is bounded); None if it does not fail again."""
    deadline = time.monotonic() + _LOCATE_WAIT_SECONDS
    for _ in range(_LOCATE_MAX_RECORDS):
        offset: int = await kafka.position(tp)
        try:
            if await kafka.getmany(tp, timeout_ms=_POLL_MS * 5, max_records=1):
                deadline = time.monotonic() + _LOCATE_WAIT_SECONDS
            elif await _at_end(kafka, tp) or time.monotonic() > deadline:
                return None
        except Exception:  # noqa: BLE001 - as above
            return offset
    return None


#: What a fetch raises when a batch's bytes cannot be decoded: a codec library's own error,
#: a bad CRC, an unknown codec id, or a truncated or garbled batch.
DECODE_ERRORS = (
    Errors.CorruptRecordException,
    Errors.UnsupportedCodecError,
    cramjam.DecompressionError,
    zlib.error,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
)


async def _at_end(kafka: Any, tp: TopicPartition, read_committed: bool = False) -> bool:
    """Whether the consumer's position has reached the partition's end as last fetched: the
    high watermark, or the last stable offset for a read_committed reader."""
    end = kafka.last_stable_offset(tp) if read_committed else kafka.highwater(tp)
    return end is not None and await kafka.position(tp) >= end


async def ensure_outputs(kafka: KafkaAccess, source: str, targets: list[str]) -> None:
    """Create missing output topics like the source; best effort.

    Same partition count as the source (so the default partitioner maps a key to the same
    partition number) and a replication factor of min(3, brokers). If that fails, the
    broker's auto-creation or an operator's topics are used as they are.
    """
    try:
        async with _admin(kafka) as admin:
            # Every topic at once: asking for the source by name could auto-create it.
            described = {topic["topic"]: topic for topic in await admin.describe_topics()}
            missing = [topic for topic in targets if topic not in described]
            if not missing:
                return
            partitions = len(described.get(source, {}).get("partitions", ()))
            if not partitions:
                log.info(
                    "source topic %s does not exist yet; leaving %s to the broker", source, missing
                )
                return
            replication = await _replication(admin)
            created, failed = await create_with(admin, missing, partitions, replication)
    except KafkaError as exc:
        log.warning("could not check or create the output topics: %s", exc)
        return
    for topic in created:
        log.info("created topic %s (%d partitions)", topic, partitions)
    for failure in failed:
        log.warning("could not create topic %s", failure)


async def ensure_keys_topic(kafka: KafkaAccess, topic: str, like: str) -> None:
    """Create the v2 keys topic if missing (compacted, `like`'s replication factor); refuse
    one that exists but is not compacted, since its headers would then expire."""
    setting = env_name("keys_topic")
    async with _admin(kafka) as admin:
        try:
            described = {t["topic"]: t for t in await admin.describe_topics()}
            if topic not in described:
                replicas = [
                    len(p.get("replicas", ()))
                    for p in described.get(like, {}).get("partitions", ())
                ]
                replication = max(replicas) if replicas else await _replication(admin)
                _, failed = await create_with(admin, [topic], 1, replication, _COMPACT)
                if failed:
                    raise ConfigError(setting, f"cannot create the keys topic: {failed[0]}")
                log.info("created keys topic %s (compacted, replication %d)", topic, replication)
                return
            policy = await _cleanup_policy(admin, topic)
        except KafkaError as exc:
            raise ConfigError(setting, f"cannot check the keys topic {topic}: {exc}") from exc
    if policy is None:
        log.warning(
            "the broker does not report the cleanup.policy of the keys topic %s: make sure "
            "it is compact, or its headers may expire (%s)",
            topic,
            setting,
        )
    elif "compact" not in policy:
        raise ConfigError(
            setting,
            f"the keys topic {topic} exists with cleanup.policy={policy}: its headers would "
            "expire and records under them could no longer be opened; set cleanup.policy="
            "compact on it, or name another topic",
        )


async def _cleanup_policy(admin: AIOKafkaAdminClient, topic: str) -> str | None:
    """The topic's cleanup.policy, or None if the broker does not say."""
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    for response in responses:
        for resource in response.resources:
            for entry in resource[4]:
                if entry[0] == "cleanup.policy":
                    return str(entry[1])
    return None


async def _replication(admin: AIOKafkaAdminClient) -> int:
    brokers = len((await admin.describe_cluster())["brokers"])
    return max(1, min(_MAX_REPLICATION, brokers))


@contextlib.asynccontextmanager
async def _admin(kafka: KafkaAccess) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(**kafka.client_kwargs(), client_id="envpipe-admin")
    try:
        await admin.start()
        yield admin
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
