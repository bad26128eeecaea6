"""The Kafka clients of one worker, built from the settings in one place.

Every client gets its connection arguments from `KafkaAccess` (TLS, SASL). The producer
writes with acks=all and `ENVPIPE_COMPRESSION` for every output (encrypted topic, decrypted
topic, DLQ, keys topic); the consumer reads every codec Kafka defines (aiokafka decodes
snappy, lz4 and zstd through cramjam, a core dependency), commits nothing by itself and
starts at the earliest offset for a new group.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.config import MIB, Settings
from workers.kafka_access import KafkaAccess

__all__ = ["max_request_size", "new_consumer", "new_producer"]


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
    compression = None if settings.compression == "none" else settings.compression
    return AIOKafkaProducer(
        **kafka.client_kwargs(),
        client_id=client_id,
        acks="all",
        enable_idempotence=idempotent or transactional_id is not None,
        transactional_id=transactional_id,
        compression_type=compression,
        linger_ms=settings.linger_ms,
        max_batch_size=settings.producer_max_batch_bytes,
        max_request_size=max_request_size(settings),
    )


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
