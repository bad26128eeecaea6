"""Is a Kafka broker up? One ApiVersions and one Metadata round trip over a plain socket.

Plain sockets rather than aiokafka keep `envpipe dev up` synchronous and the probe cheap, and
they check what a client needs: the broker answers, and advertises the address it is
reached at (a broker advertising the wrong address accepts connections but serves nobody).
"""

from __future__ import annotations

import socket
import struct

__all__ = ["NotReady", "kafka_call", "metadata_brokers", "probe_kafka"]

_PROBE_TIMEOUT_SECONDS = 1.0


class NotReady(Exception):
    """A readiness probe got an answer, but not the expected one."""


def probe_kafka(host: str, port: int, advertised_port: int | None = None) -> None:
    """Raise NotReady or OSError unless the broker at `host:port` serves Kafka and advertises
    `host:advertised_port` (default: its own port) among its brokers."""
    with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_SECONDS) as sock:
        (error_code,) = struct.unpack_from(">h", kafka_call(sock, api_key=18, body=b""))
        if error_code != 0:
            raise NotReady(f"ApiVersions returned error code {error_code}")
        # Metadata v0 with an empty topic list: the brokers, then all topics.
        metadata = kafka_call(sock, api_key=3, body=struct.pack(">i", 0))
    advertised = advertised_port or port
    if (host, advertised) not in metadata_brokers(metadata):
        raise NotReady(f"the broker does not advertise {host}:{advertised}")


def kafka_call(sock: socket.socket, *, api_key: int, body: bytes, version: int = 0) -> bytes:
    """One Kafka request (a v1 request header); returns the response after its correlation id."""
    client_id = b"envpipe-dev"
    correlation_id = api_key  # one request per API per connection
    header = struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id
    request = header + body
    sock.sendall(struct.pack(">i", len(request)) + request)
    (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
    response = _recv_exactly(sock, size)
    if struct.unpack_from(">i", response)[0] != correlation_id:
        raise NotReady("the broker answered with a wrong correlation id")
    return response[4:]


def metadata_brokers(body: bytes) -> set[tuple[str, int]]:
    """The (host, port) pairs of a Metadata v0 response's broker array."""
    (count,) = struct.unpack_from(">i", body)
    offset = 4
    brokers = set()
    for _ in range(count):
        _node_id, host_len = struct.unpack_from(">ih", body, offset)
        offset += 6
        host = body[offset : offset + host_len].decode()
        (port,) = struct.unpack_from(">i", body, offset + host_len)
        offset += host_len + 4
        brokers.add((host, port))
    return brokers


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read exactly `size` bytes, or fail if the broker hangs up first."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise NotReady("the broker closed the connection")
        data += chunk
    return bytes(data)
