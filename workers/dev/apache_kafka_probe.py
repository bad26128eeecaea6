"""Are a Kafka broker's coordinators up? FindCoordinator and InitProducerId over a plain socket.

`probe_kafka` says a broker answers; consumer groups also need the group coordinator (the
`__consumer_offsets` topic, created on the first FindCoordinator) and idempotent or
transactional producers the transaction coordinator (`__transaction_state`) and a producer id.
Apache Kafka creates and loads both lazily, so a broker that has just started answers
COORDINATOR_NOT_AVAILABLE for a few seconds: `wait_ready` asks until it answers, so the first
test or worker does not pay that wait. Synchronous, like `envpipe dev up`.
"""

from __future__ import annotations

import socket
import struct

from workers.dev.kafka_probe import NotReady, kafka_call, metadata_brokers

__all__ = ["brokers_registered", "coordinators_ready"]

_TIMEOUT_SECONDS = 2.0
_METADATA, _FIND_COORDINATOR, _INIT_PRODUCER_ID = 3, 10, 22
_GROUP, _TRANSACTION = 0, 1
#: The ids the probe asks about; the broker keeps an empty transactional state for the second.
PROBE_GROUP = "envpipe-ready"
PROBE_TRANSACTIONAL_ID = "envpipe-ready"


def coordinators_ready(
    host: str, port: int, *, transactions: bool = True, single_node: bool = False
) -> None:
    """Raise NotReady or OSError unless the group coordinator answers and a producer id can be had.

    With `transactions`, the transaction coordinator must also hand out a transactional one;
    it is reached where it advertises itself, or, for a `single_node`, at `host:port` (its
    advertised address may be a proxy that is not up yet).
    """
    with socket.create_connection((host, port), timeout=_TIMEOUT_SECONDS) as sock:
        _find_coordinator(sock, PROBE_GROUP, _GROUP)
        _init_producer_id(sock, None)  # idempotence: any broker answers
        if not transactions:
            return
        coordinator = _find_coordinator(sock, PROBE_TRANSACTIONAL_ID, _TRANSACTION)
    if single_node:
        coordinator = (host, port)
    with socket.create_connection(coordinator, timeout=_TIMEOUT_SECONDS) as sock:
        _init_producer_id(sock, PROBE_TRANSACTIONAL_ID)


def brokers_registered(host: str, port: int, expected: int) -> None:
    """Raise NotReady or OSError until the broker's metadata lists `expected` live brokers."""
    with socket.create_connection((host, port), timeout=_TIMEOUT_SECONDS) as sock:
        brokers = metadata_brokers(
            kafka_call(sock, api_key=_METADATA, version=0, body=struct.pack(">i", 0))
        )
    if len(brokers) < expected:
        raise NotReady(f"{len(brokers)} of {expected} brokers registered")


def _find_coordinator(sock: socket.socket, key: str, key_type: int) -> tuple[str, int]:
    """FindCoordinator v1: the coordinator's (host, port)."""
    body = _string(key) + struct.pack(">b", key_type)
    response = kafka_call(sock, api_key=_FIND_COORDINATOR, version=1, body=body)
    _throttle, error = struct.unpack_from(">ih", response)
    if error != 0:
        what = "group" if key_type == _GROUP else "transaction"
        raise NotReady(f"the {what} coordinator is not available yet (error code {error})")
    offset = 6
    (message_len,) = struct.unpack_from(">h", response, offset)
    offset += 2 + max(message_len, 0) + 4  # the message, then the node id
    (host_len,) = struct.unpack_from(">h", response, offset)
    host = response[offset + 2 : offset + 2 + host_len].decode()
    (port,) = struct.unpack_from(">i", response, offset + 2 + host_len)
    return host, port


def _init_producer_id(sock: socket.socket, transactional_id: str | None) -> None:
    """InitProducerId v0; NotReady unless the broker hands out a producer id."""
    body = _string(transactional_id) + struct.pack(">i", 60_000)
    response = kafka_call(sock, api_key=_INIT_PRODUCER_ID, version=0, body=body)
    _throttle, error, producer_id = struct.unpack_from(">ihq", response)
    if error != 0 or producer_id < 0:
        kind = "a transactional" if transactional_id else "an idempotent"
        raise NotReady(f"no producer id for {kind} producer yet (error code {error})")


def _string(text: str | None) -> bytes:
    if text is None:
        return struct.pack(">h", -1)
    raw = text.encode()
    return struct.pack(">h", len(raw)) + raw
