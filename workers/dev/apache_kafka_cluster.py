"""A three-node Apache Kafka cluster on loopback, for failover tests.

Every node is a combined KRaft controller and broker (PLAINTEXT only, no authorizer). Topics
default to replication factor 3 with `min.insync.replicas=2`, so an `acks=all` producer keeps
going when one node dies. Each node can be stopped (gracefully, or SIGKILLed as in a crash)
and started again on its own ports and data; `leader_of` says which node leads a partition.

A crashed broker is fenced once `broker.session.timeout.ms` passes without a heartbeat, and
only then do its partitions get new leaders. This cluster lowers that from 9 s to
`SESSION_TIMEOUT_MS`, so a test measures a failover of a few seconds, not of Kafka's defaults.
"""

from __future__ import annotations

import contextlib
import signal
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaClient
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from pipeline.errors import ServiceError
from workers.dev import kafka_jars
from workers.dev.apache_kafka import (
    LABEL,
    QUICK_START,
    NodeLayout,
    format_storage,
    kafka_version,
    new_cluster_id,
    node_command,
    prepare,
    server_properties,
)
from workers.dev.apache_kafka_probe import brokers_registered, coordinators_ready
from workers.dev.kafka_probe import NotReady, probe_kafka
from workers.dev.ports import HOST, choose_ports
from workers.dev.service import Launcher
from workers.supervisor import Child

__all__ = ["SESSION_TIMEOUT_MS", "KafkaCluster", "cluster", "start_cluster"]

SESSION_TIMEOUT_MS = 4000
_FAST_FAILOVER = {
    "broker.session.timeout.ms": str(SESSION_TIMEOUT_MS),
    "broker.heartbeat.interval.ms": "1000",
    "unclean.leader.election.enable": "false",
}
_NOT_READY = (OSError, NotReady, struct.error)


@dataclass
class KafkaCluster:
    """Running nodes, numbered by their Kafka node id (1..n), as `leader_of` reports them."""

    launcher: Launcher
    java: str
    classpath: Path
    nodes: dict[int, NodeLayout]
    version: str
    start_seconds: float
    children: dict[int, Child | None] = field(default_factory=dict)
    _restarts: int = 0

    @property
    def bootstrap_servers(self) -> str:
        """Every node's address: a client bootstraps from whichever is up."""
        return ",".join(f"{HOST}:{node.port}" for node in self.nodes.values())

    def running(self) -> list[int]:
        return [i for i, child in self.children.items() if child is not None and child.running]

    def stop_node(self, node_id: int, *, kill: bool = False) -> None:
        """Stop one node: SIGTERM (a controlled shutdown moves its leaders first) or SIGKILL."""
        child = self.children.get(node_id)
        if child is None:
            return
        if kill:
            child.kill()
            if child.wait_sync(10.0) is None:
                raise ServiceError(f"Kafka node {node_id} (pid {child.pid}) survived SIGKILL")
        else:
            child.stop_sync()
        self.children[node_id] = None

    def start_node(self, node_id: int, timeout: float = 60.0) -> None:
        """Start a stopped node again on its own ports and data; returns once it serves."""
        if self.children.get(node_id) is not None:
            raise ServiceError(f"Kafka node {node_id} is already running")
        self._restarts += 1
        child = self._spawn(node_id, suffix=f"-r{self._restarts}")
        node = self.nodes[node_id]
        self.launcher.wait_ready(
            {child: lambda: probe_kafka(HOST, node.port)}, timeout, expected=_NOT_READY
        )

    async def leader_of(self, topic: str, partition: int) -> int:
        """The node id leading `topic`/`partition` now (fresh metadata), or -1 if none does."""
        client = AIOKafkaClient(bootstrap_servers=self.bootstrap_servers)
        try:
            await client.bootstrap()
            await client.force_metadata_update()
            leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        except KafkaError:
            return -1
        finally:
            await client.close()
        return -1 if leader is None else int(leader)

    def stop(self, grace: float = 10.0) -> None:
        """Stop every node still running: SIGTERM to all at once, then SIGKILL what is left.

        All at once, because a node stopped after the others have gone waits for a controller
        quorum that no longer exists.
        """
        running = {i: child for i, child in self.children.items() if child is not None}
        for child in running.values():
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in running.values():
            if child.wait_sync(max(0.0, deadline - time.monotonic())) is None:
                child.kill()
        stuck = [i for i, child in running.items() if child.wait_sync(10.0) is None]
        self.children = dict.fromkeys(self.children)
        if stuck:
            raise ServiceError(f"Kafka node(s) {stuck} did not end after SIGKILL")

    def _spawn(self, node_id: int, suffix: str = "") -> Child:
        node = self.nodes[node_id]
        child = self.launcher.spawn(
            f"kafka-{node_id}{suffix}",
            f"{LABEL} {node_id}",
            node_command(self.java, self.classpath, node, QUICK_START),
            port=node.port,
        )
        self.children[node_id] = child
        return child


def start_cluster(launcher: Launcher, nodes: int = 3, timeout: float = 90.0) -> KafkaCluster:
    """Format and start `nodes` combined KRaft nodes; returns once all brokers are registered
    and the group and transaction coordinators answer. Nothing stays running if it fails."""
    if nodes < 1:
        raise ServiceError(f"a Kafka cluster needs at least one node, not {nodes}")
    version = kafka_version()
    java = kafka_jars.java_binary()
    classpath = kafka_jars.kafka_classpath(version)
    names = [f"{kind}-{i}" for i in range(1, nodes + 1) for kind in ("port", "controller")]
    ports = choose_ports(dict.fromkeys(names), {name: f"Kafka {name}" for name in names})
    layouts = {
        i: NodeLayout(
            node_id=i,
            port=ports[f"port-{i}"],
            controller_port=ports[f"controller-{i}"],
            directory=launcher.state_dir / f"kafka-{i}",
        )
        for i in range(1, nodes + 1)
    }
    voters = ",".join(node.voter for node in layouts.values())
    replication = min(3, nodes)
    cluster_id = new_cluster_id()
    for node in layouts.values():
        properties = server_properties(
            node,
            voters,
            replication=replication,
            min_isr=max(1, replication - 1),
            extra=_FAST_FAILOVER,
        )
        prepare(node, properties)
    with ThreadPoolExecutor(nodes) as pool:  # a JVM each: in parallel, not one after another
        for done in [
            pool.submit(format_storage, java, classpath, node, cluster_id, None)
            for node in layouts.values()
        ]:
            done.result()
    began = time.monotonic()
    started = KafkaCluster(launcher, java, classpath, layouts, version, 0.0)
    try:
        children = {started._spawn(i): node for i, node in layouts.items()}
        launcher.wait_ready(
            {child: _node_probe(node, nodes) for child, node in children.items()},
            timeout,
            expected=_NOT_READY,
        )
    except BaseException:
        with contextlib.suppress(ServiceError):
            started.stop()
        raise
    started.start_seconds = time.monotonic() - began
    return started


def _node_probe(node: NodeLayout, nodes: int) -> Callable[[], None]:
    """Ready: the node serves Kafka, lists every broker, and the coordinators answer."""

    def probe() -> None:
        probe_kafka(HOST, node.port)
        brokers_registered(HOST, node.port, nodes)
        coordinators_ready(HOST, node.port)

    return probe


@contextlib.contextmanager
def cluster(state_dir: Path, nodes: int = 3, timeout: float = 90.0) -> Iterator[KafkaCluster]:
    """A cluster for the length of a `with` block; every node is stopped on the way out."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    started = start_cluster(Launcher(state_dir, lambda _records: None), nodes, timeout)
    try:
        yield started
    finally:
        started.stop()
