"""The Kafka clients of one worker, built from the settings in one place.

Every client gets its connection arguments from `KafkaAccess` (TLS, SASL). The producer
writes with acks=all and `ENVPIPE_COMPRESSION` for every output (encrypted topic, decrypted
topic, DLQ, keys topic); the consumer reads every codec Kafka defines (aiokafka decodes
snappy, lz4 and zstd through cramjam, a core dependency), commits nothing by itself and
starts at the earliest offset for a new group.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.config import MIB, Settings, env_name
from pipeline.errors import ConfigError
from workers.broker_features import detect_features
from workers.kafka_access import KafkaAccess

__all__ = ["compression", "max_request_size", "new_consumer", "new_producer", "new_producer_for"]

log = logging.getLogger("envpipe.stream")


_TRANSACTION_TIMEOUT_MS = 10_000


def compression(settings: Settings) -> dict[str, str | None]:
    """The producer argument for ENVPIPE_COMPRESSION."""
    return {"compression_type": None if settings.compression == "none" else settings.compression}


def max_request_size(settings: Settings) -> int:
    """The producer's request-size limit: at least 1 MiB, and at least one batch."""
    return max(MIB, settings.producer_max_batch_bytes)


def new_producer(
    kafka: KafkaAccess,
    settings: Settings,
    *,
    client_id: str,
    idempotent: bool = False,
    transactional_id: str | None = None,
) -> Any:
    """An acks=all producer; idempotent only where the broker was found to support it."""
    return AIOKafkaProducer(
        **kafka.client_kwargs(),
        **compression(settings),
        client_id=client_id,
        acks="all",
        enable_idempotence=idempotent or transactional_id is not None,
        transactional_id=transactional_id,
        # a killed worker's open transaction blocks read_committed readers until it expires
        transaction_timeout_ms=_TRANSACTION_TIMEOUT_MS,
        linger_ms=settings.linger_ms,
        max_batch_size=settings.producer_max_batch_bytes,
        max_request_size=max_request_size(settings),
    )


async def new_producer_for(
    kafka: KafkaAccess, settings: Settings, *, client_id: str, group: str
) -> tuple[Any, str | None]:
    """A worker's producer, as the broker allows: (producer, transactional id or None).

    What the broker serves is asked once, by a real InitProducerId round trip
    (`workers.broker_features`), never by its name: idempotent where it can, transactional
    with ENVPIPE_EXACTLY_ONCE (a ConfigError naming the setting where it cannot). The
    transactional id is unique per process, so scaled-out workers never fence each other.
    """
    features = await detect_features(kafka, transactions=settings.exactly_once)
    if settings.exactly_once and not features.transactions:
        raise ConfigError(
            env_name("exactly_once"),
            f"is true, but the broker at {settings.bootstrap_servers} cannot run "
            f"transactions ({features.reason}); use Apache Kafka, or set it to false",
        )
    transactional_id = (
        f"{client_id}-{group}-{socket.gethostname()}-{os.getpid()}"
        if settings.exactly_once
        else None
    )
    if transactional_id:
        kind = "transactional (exactly-once)"
    elif features.idempotence:
        kind = "idempotent"
    else:
        kind = f"acks=all, not idempotent ({features.reason})"
    log.info("producer: %s", kind)
    producer = new_producer(
        kafka,
        settings,
        client_id=client_id,
        idempotent=features.idempotence,
        transactional_id=transactional_id,
    )
    return producer, transactional_id


def new_consumer(
    kafka: KafkaAccess,
    settings: Settings,
    *,
    client_id: str,
    group_id: str,
    read_committed: bool = False,
) -> Any:
    """A group consumer with auto-commit off, starting at the earliest offset."""
    return AIOKafkaConsumer(
        **kafka.client_kwargs(),
        client_id=client_id,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        # aiokafka's default 500 ms: brokers such as Tansu hold each fetch that long even
        # when records are waiting, which showed up as ~200 ms of added latency.
        fetch_max_wait_ms=settings.batch_timeout_ms,
    )
