"""Loopback ports for the embedded services: chosen free, or checked free, and released."""

from __future__ import annotations

import contextlib
import socket

from pipeline.errors import ServiceError
from workers.supervisor import wait_until

HOST = "127.0.0.1"
_PORT_RELEASE_SECONDS = 3.0


def choose_ports(requested: dict[str, int | None], labels: dict[str, str]) -> dict[str, int]:
    """Check the requested ports are free and pick free ones for the rest (None or 0).

    Every port is held open until all are chosen, so the kernel cannot hand out one twice.
    `labels` names each service and the option that sets its port, for the error message.
    """
    chosen: dict[str, int] = {}
    with contextlib.ExitStack() as held:
        for name, port in sorted(requested.items(), key=lambda item: item[1] is None):
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port or 0))
            except OSError as exc:
                raise ServiceError(
                    f"port {port} for the {labels[name]} is already in use on {HOST}; "
                    f"choose another {name} (--{name.replace('_', '-')}), or leave it unset "
                    "to use a free port"
                ) from exc
            chosen[name] = sock.getsockname()[1]
    return chosen


def free_port() -> int:
    """A loopback port that was free a moment ago (bind to 0, read it back, release it)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def is_free(port: int) -> bool:
    """Whether the port can be bound on loopback now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def wait_port_free(port: int) -> bool:
    """Whether the port can be bound again within a short grace period."""
    return wait_until(lambda: is_free(port), _PORT_RELEASE_SECONDS)
