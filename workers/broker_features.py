"""Does the broker really serve idempotent and transactional producers? Asked once, at start.

Not by broker name, and not from ApiVersions: the embedded Tansu lists InitProducerId (API 22,
v0-5) and then answers every InitProducerId with UNKNOWN_SERVER_ERROR, and an idempotent
aiokafka producer only finds out at its first send, where it stalls. So the check is a real
round trip: InitProducerId without a transactional id (idempotence), then FindCoordinator and
InitProducerId for a transactional id at its coordinator (transactions). Retriable answers
(the coordinator is still loading) are asked again for `within` seconds; anything else is "no".

The transactional probe leaves an empty transactional-id state on the broker (it expires after
`transactional.id.expiration.ms`); with ACLs, pass the id the worker will use, since the
principal may be allowed that one only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiokafka import AIOKafkaClient
from aiokafka.client import CoordinationType
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.transaction import InitProducerIdRequest

from workers.kafka_access import KafkaAccess

__all__ = [
    "PROBE_TRANSACTIONAL_ID",
    "BrokerFeatures",
    "detect_features",
    "supports_idempotence",
    "supports_transactions",
]

T = TypeVar("T")
PROBE_TRANSACTIONAL_ID = "envpipe-feature-probe"
_TIMEOUT_SECONDS = 10.0
_RETRY_SECONDS = 0.1
_TXN_TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class BrokerFeatures:
    """What the broker serves; `reason` says why a feature is missing, for the log."""

    idempotence: bool
    transactions: bool
    reason: str = ""


class _Refused(Exception):
    """The broker answered, and the answer is no."""


async def detect_features(
    access: KafkaAccess | str,
    *,
    within: float = _TIMEOUT_SECONDS,
    transactional_id: str = PROBE_TRANSACTIONAL_ID,
    transactions: bool = True,
) -> BrokerFeatures:
    """Ask the broker for producer ids; ConfigError (`access.connection_error`) if it cannot
    be reached or refuses the login."""
    access = KafkaAccess.of(access)
    deadline = time.monotonic() + within
    client = AIOKafkaClient(
        **access.client_kwargs(),
        client_id="envpipe-features",
        request_timeout_ms=int(within * 1000),
    )
    try:
        try:
            await client.bootstrap()
        except KafkaError as exc:
            raise await access.connection_error(exc) from exc
        try:
            await _producer_id(client, client.get_random_node(), None, deadline)
        except _Refused as exc:
            return BrokerFeatures(False, False, f"no idempotent producer id: {exc}")
        if not transactions:
            return BrokerFeatures(True, False, "transactions not checked")
        try:
            coordinator = await _retrying(
                lambda: client.coordinator_lookup(CoordinationType.TRANSACTION, transactional_id),
                deadline,
            )
            await _producer_id(client, coordinator, transactional_id, deadline)
        except _Refused as exc:
            return BrokerFeatures(True, False, f"no transactional producer id: {exc}")
        return BrokerFeatures(True, True)
    finally:
        await client.close()


async def supports_idempotence(
    access: KafkaAccess | str, *, within: float = _TIMEOUT_SECONDS
) -> bool:
    """Whether an idempotent producer can get a producer id from this broker."""
    return (await detect_features(access, within=within, transactions=False)).idempotence


async def supports_transactions(
    access: KafkaAccess | str,
    *,
    within: float = _TIMEOUT_SECONDS,
    transactional_id: str = PROBE_TRANSACTIONAL_ID,
) -> bool:
    """Whether a transactional producer (`transactional_id`) can be initialised here."""
    features = await detect_features(access, within=within, transactional_id=transactional_id)
    return features.transactions


async def _producer_id(
    client: AIOKafkaClient, node: int, transactional_id: str | None, deadline: float
) -> None:
    """InitProducerId at `node` until it succeeds (retriable errors) or is refused."""

    async def attempt() -> None:
        response = await client.send(node, InitProducerIdRequest(transactional_id, _TXN_TIMEOUT_MS))
        if response.error_code != 0:
            raise for_code(response.error_code)()
        if response.producer_id < 0:
            raise _Refused("the broker answered with no producer id")

    await _retrying(attempt, deadline)


async def _retrying(call: Callable[[], Awaitable[T]], deadline: float) -> T:
    """Await `call()` until it succeeds; retriable Kafka errors again until `deadline`."""
    while True:
        remaining = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, 0.01)):
                return await call()
        except TimeoutError:
            raise _Refused("no answer in time") from None
        except KafkaError as exc:
            if not exc.retriable or time.monotonic() + _RETRY_SECONDS >= deadline:
                raise _Refused(f"{type(exc).__name__}: {exc}") from exc
        await asyncio.sleep(_RETRY_SECONDS)
