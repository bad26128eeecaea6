"""Apache Kafka 4 in KRaft mode, from Apache's jars on Maven Central: `dev up --broker kafka`.

One JVM is both controller and broker (`process.roles=broker,controller`), on loopback:

    PLAINTEXT       the bootstrap port; its principal, User:ANONYMOUS, is a super user
    SASL_PLAINTEXT  PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512, for the users `admin` (a super
                    user) and `envpipe` (authenticated, but granted nothing: no ACLs); and
                    OAUTHBEARER with Kafka's unsecured validator, which trusts any unsigned
                    JWT (its `sub` is the principal): a dev broker's stand-in for a real
                    identity provider, no weaker than the PLAINTEXT listener beside it
    CONTROLLER      KRaft's own

`StandardAuthorizer` is on, so plaintext clients keep full access while a SASL user without
ACLs is refused. The storage is formatted afresh on every start (a new cluster id, new random
passwords), so like Tansu the broker starts empty. Topics are created on first use with three
partitions, as on Tansu, which envpipe's tests rely on. Readiness means more than an open port:
the group and transaction coordinators answer and a producer id can be had, so the first
idempotent producer does not wait. `apache_kafka_cluster` starts three such nodes.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shlex
import shutil
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ServiceError
from workers.dev import kafka_jars
from workers.dev.apache_kafka_probe import coordinators_ready
from workers.dev.kafka_probe import NotReady, probe_kafka
from workers.dev.ports import HOST, choose_ports
from workers.dev.service import BrokerStarted, Launcher
from workers.dev.state import write_private
from workers.supervisor import Child

__all__ = [
    "LABEL",
    "MECHANISMS",
    "QUICK_START",
    "VERSION_ENV",
    "KafkaStarted",
    "NodeLayout",
    "SaslListener",
    "SaslUser",
    "format_storage",
    "kafka_version",
    "node_command",
    "prepare",
    "running",
    "server_properties",
    "start",
]

LABEL = "Apache Kafka broker"
#: Picks another Kafka 4.x from Maven Central than the tested `kafka_jars.KAFKA_VERSION`.
VERSION_ENV = "ENVPIPE_DEV_KAFKA_VERSION"
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
SERVER_MAIN = "kafka.Kafka"
STORAGE_TOOL_MAIN = "kafka.tools.StorageTool"
HEAP = "-Xmx512m"
_FORMAT_SECONDS = 60.0
_SASL_FILE = "kafka-sasl.env"

#: Root INFO into the child's log (stdout); the per-request and config dumps only when they warn.
LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.change.name = state.change.logger
logger.change.level = WARN
"""


@dataclass(frozen=True)
class SaslUser:
    """A SASL user of the dev broker; the password is random per start and never shown."""

    name: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class SaslListener:
    """The node's SASL_PLAINTEXT listener and its users."""

    bootstrap_servers: str
    admin: SaslUser  # a super user
    user: SaslUser  # authenticated, but no ACL grants it anything
    mechanisms: tuple[str, ...] = MECHANISMS
    security_protocol: str = "SASL_PLAINTEXT"

    def environ(self, user: SaslUser, mechanism: str = "SCRAM-SHA-512") -> dict[str, str]:
        """The ENVPIPE_* variables a worker connects with as `user`."""
        return {
            "ENVPIPE_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "ENVPIPE_KAFKA_SECURITY_PROTOCOL": self.security_protocol,
            "ENVPIPE_KAFKA_SASL_MECHANISM": mechanism,
            "ENVPIPE_KAFKA_SASL_USERNAME": user.name,
            "ENVPIPE_KAFKA_SASL_PASSWORD": user.password,
        }


@dataclass(frozen=True)
class KafkaStarted(BrokerStarted):
    """A running Apache Kafka node: plaintext bootstrap, its SASL listener, and how it started."""

    version: str
    sasl: SaslListener
    directory: Path  # server.properties, the data, the log4j2 config
    start_seconds: float  # spawn until ready (coordinators included), without the jar fetch


@dataclass(frozen=True)
class NodeLayout:
    """One node's identity, ports and directory."""

    node_id: int
    port: int  # PLAINTEXT
    controller_port: int
    directory: Path
    advertised_port: int | None = None
    sasl_port: int | None = None

    @property
    def properties_file(self) -> Path:
        return self.directory / "server.properties"

    @property
    def voter(self) -> str:
        return f"{self.node_id}@{HOST}:{self.controller_port}"


def kafka_version() -> str:
    """The Kafka release to run: $ENVPIPE_DEV_KAFKA_VERSION, else the tested one."""
    return os.environ.get(VERSION_ENV) or kafka_jars.KAFKA_VERSION


def server_properties(
    node: NodeLayout,
    voters: str,
    *,
    replication: int = 1,
    min_isr: int = 1,
    sasl: SaslListener | None = None,
    extra: Mapping[str, str] | None = None,
) -> str:
    """The node's server.properties: KRaft combined mode, internal topics sized to the cluster."""
    listeners = [f"PLAINTEXT://{HOST}:{node.port}", f"CONTROLLER://{HOST}:{node.controller_port}"]
    advertised = [f"PLAINTEXT://{HOST}:{node.advertised_port or node.port}"]
    protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
    values = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": voters,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(node.directory / "data"),
        "num.partitions": "3",
        "auto.create.topics.enable": "true",
        "default.replication.factor": str(replication),
        "min.insync.replicas": str(min_isr),
        "offsets.topic.replication.factor": str(replication),
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.replication.factor": str(replication),
        "transaction.state.log.min.isr": str(min_isr),
        "transaction.state.log.num.partitions": "3",
        "share.coordinator.state.topic.replication.factor": str(replication),
        "share.coordinator.state.topic.min.isr": str(min_isr),
        "group.initial.rebalance.delay.ms": "0",
        "num.network.threads": "2",
        "num.io.threads": "4",
    }
    if sasl is not None and node.sasl_port:
        listeners.append(f"SASL_PLAINTEXT://{HOST}:{node.sasl_port}")
        advertised.append(f"SASL_PLAINTEXT://{HOST}:{node.sasl_port}")
        protocols.append("SASL_PLAINTEXT:SASL_PLAINTEXT")
        values |= _sasl_properties(sasl)
    values |= {
        "listeners": ",".join(listeners),
        "advertised.listeners": ",".join(advertised),
        "listener.security.protocol.map": ",".join(protocols),
        **(extra or {}),
    }
    return "".join(f"{name}={value}\n" for name, value in values.items())


def _sasl_properties(sasl: SaslListener) -> dict[str, str]:
    """PLAIN's users live in its JAAS line; SCRAM's were written into the storage by `format`."""
    plain_users = " ".join(
        f"user_{user.name}={_jaas_quote(user.password)}" for user in (sasl.admin, sasl.user)
    )
    prefix = "listener.name.sasl_plaintext"
    return {
        "sasl.enabled.mechanisms": ",".join(sasl.mechanisms),
        f"{prefix}.plain.sasl.jaas.config": (
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};"
        ),
        f"{prefix}.scram-sha-256.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
        f"{prefix}.scram-sha-512.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
        # No validator configured: Kafka's unsecured one, which trusts any unsigned JWT.
        f"{prefix}.oauthbearer.sasl.jaas.config": (
            "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;"
        ),
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        # PLAINTEXT and CONTROLLER connections are User:ANONYMOUS: full access, as without SASL.
        "super.users": f"User:ANONYMOUS;User:{sasl.admin.name}",
    }


def _jaas_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def new_cluster_id() -> str:
    """A random KRaft cluster id as `kafka-storage random-uuid` makes them (never "-..." first)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def prepare(node: NodeLayout, properties: str) -> None:
    """A fresh directory for the node: server.properties (owner-only) and the log4j2 config."""
    shutil.rmtree(node.directory / "data", ignore_errors=True)
    node.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(node.properties_file, properties)
    (node.directory / "log4j2.properties").write_text(LOG4J2)


#: C1 only: half the JVM start-up CPU, for short-lived JVMs (the storage tool, test clusters)
#: at some cost in peak throughput, so not for the dev broker benchmarks may run against.
QUICK_START = ("-XX:TieredStopAtLevel=1",)


def _jvm(
    java: str, classpath: Path, node: NodeLayout, main: str, options: tuple[str, ...] = ()
) -> list[str]:
    return [
        java,
        HEAP,
        "-XX:+UseG1GC",
        *options,
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={node.directory / 'log4j2.properties'}",
        "-cp",
        f"{classpath}/*",
        main,
    ]


def node_command(
    java: str, classpath: Path, node: NodeLayout, options: tuple[str, ...] = ()
) -> list[str]:
    """`java ... kafka.Kafka <dir>/server.properties`: the absolute path tells nodes apart in ps."""
    return [*_jvm(java, classpath, node, SERVER_MAIN, options), str(node.properties_file)]


def format_storage(
    java: str, classpath: Path, node: NodeLayout, cluster_id: str, sasl: SaslListener | None
) -> None:
    """Format the node's KRaft storage, with the SCRAM users in its bootstrap metadata.

    The arguments (SCRAM passwords among them) go through an owner-only @argfile, so no other
    user of the machine sees them in `ps`. The storage tool reads it (argparse4j), one argument
    per line, taken literally.
    """
    arguments = ["format", "--cluster-id", cluster_id, "--config", str(node.properties_file)]
    if sasl is not None:
        for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
            for user in (sasl.admin, sasl.user):
                arguments += [
                    "--add-scram",
                    f"{mechanism}=[name={user.name},password={user.password}]",
                ]
    argfile = node.directory / "format.args"
    write_private(argfile, "".join(f"{arg}\n" for arg in arguments))
    try:
        tool = Child.spawn(
            [*_jvm(java, classpath, node, STORAGE_TOOL_MAIN, QUICK_START), f"@{argfile}"],
            name="the Kafka storage tool",
            log=node.directory / "format.log",
        )
        code = tool.wait_sync(_FORMAT_SECONDS)
        if code is None:
            tool.stop_sync()
            raise ServiceError(
                f"formatting the Kafka storage of node {node.node_id} did not finish within "
                f"{_FORMAT_SECONDS:g} s; {tool.tail()}"
            )
        if code != 0:
            raise ServiceError(
                f"formatting the Kafka storage of node {node.node_id} failed "
                f"(exit code {code}); {tool.tail()}"
            )
    finally:
        argfile.unlink(missing_ok=True)


def start(
    launcher: Launcher, port: int, timeout: float, advertised_port: int | None = None
) -> KafkaStarted:
    """Start one Apache Kafka node, bootstrapping on `port`, and wait until it is fully ready.

    `advertised_port`: as for `workers.dev.tansu.start`, clients are told to reach the PLAINTEXT
    listener there (a proxy in front). The jars are fetched first if not cached (not counted in
    `timeout`). Fails at once, naming what to install, without Java 17+ or Maven. The SASL
    settings are also written to STATE_DIR/kafka-sasl.env (owner-only), for a shell.
    """
    version = kafka_version()
    java = kafka_jars.java_binary()
    classpath = kafka_jars.kafka_classpath(version)
    ports = choose_ports(
        {"controller_port": None, "sasl_port": None},
        labels={"controller_port": "Kafka controller", "sasl_port": "Kafka SASL listener"},
    )
    node = NodeLayout(
        node_id=1,
        port=port,
        controller_port=ports["controller_port"],
        directory=launcher.state_dir / "kafka",
        advertised_port=advertised_port,
        sasl_port=ports["sasl_port"],
    )
    sasl = SaslListener(
        bootstrap_servers=f"{HOST}:{node.sasl_port}",
        admin=SaslUser("admin", secrets.token_urlsafe(18)),
        user=SaslUser("envpipe", secrets.token_urlsafe(18)),
    )
    prepare(node, server_properties(node, node.voter, sasl=sasl))
    format_storage(java, classpath, node, new_cluster_id(), sasl)
    began = time.monotonic()
    child = launcher.spawn("broker", LABEL, node_command(java, classpath, node), port=port)
    try:
        launcher.wait_ready(
            {child: lambda: _probe(node)}, timeout, expected=(OSError, NotReady, struct.error)
        )
    except BaseException:
        child.stop_sync()
        raise
    write_private(
        launcher.state_dir / _SASL_FILE,
        "# the dev broker's SASL listener as its admin user; load with: source kafka-sasl.env\n"
        + "".join(
            f"export {name}={shlex.quote(value)}\n"
            for name, value in sasl.environ(sasl.admin).items()
        ),
    )
    return KafkaStarted(f"{HOST}:{port}", version, sasl, node.directory, time.monotonic() - began)


def _probe(node: NodeLayout) -> None:
    """Ready for every client: serves Kafka at its advertised address, coordinators up."""
    probe_kafka(HOST, node.port, node.advertised_port)
    coordinators_ready(HOST, node.port, single_node=True)


@contextlib.contextmanager
def running(
    state_dir: Path, *, port: int | None = None, timeout: float = 60.0
) -> Iterator[KafkaStarted]:
    """One node for the length of a `with` block (tests, tools); stopped on the way out."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    launcher = Launcher(state_dir, lambda _records: None)
    broker_port = port or choose_ports({"port": None}, {"port": LABEL})["port"]
    try:
        yield start(launcher, broker_port, timeout)
    finally:
        for child in launcher.children:
            child.stop_sync()
