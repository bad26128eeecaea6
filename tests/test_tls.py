"""Kafka over TLS: the settings, the errors a user meets, and the workers end to end.

The embedded Tansu broker cannot serve TLS itself, so these tests start one of their own that
advertises the port of a TLS terminator (benchmarks/rigs/tls.py) in front of it, as a load
balancer would sit in front of a real broker. Every test starts its own terminator on that
port, with the certificates it needs; all of them are generated here, per module.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks.rigs.tls import Issued, TestCa, TlsTerminator
from pipeline.config import env_name, load_settings
from pipeline.errors import ConfigError
from tests import kit
from tests.kit import IDLE, MARKER, Rec, Workers
from tests.providers import BROKER
from workers import dev, topics
from workers.cli import main
from workers.kafka_access import KafkaAccess

pytestmark = pytest.mark.broker  # the same tests against Tansu and Apache Kafka

CAFILE = "ENVPIPE_KAFKA_SSL_CAFILE"
CERTFILE = "ENVPIPE_KAFKA_SSL_CERTFILE"
KEYFILE = "ENVPIPE_KAFKA_SSL_KEYFILE"
PROTOCOL = "ENVPIPE_KAFKA_SECURITY_PROTOCOL"


@dataclass(frozen=True)
class Pki:
    """The module's certificates: a CA with a server and a client certificate, and strangers."""

    ca: Path
    server: Issued
    client: Issued
    wrong_ca: Path  # a CA that signed none of the above
    stranger: Issued  # a client certificate from the wrong CA
    misnamed: Issued  # a server certificate, from the right CA, for another host


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = TestCa("envpipe test CA"), TestCa("unrelated CA")
    return Pki(
        ca=ca.write(folder / "ca.pem"),
        server=ca.issue_server(folder),
        client=ca.issue_client(folder),
        wrong_ca=other.write(folder / "wrong-ca.pem"),
        stranger=other.issue_client(folder, "stranger"),
        misnamed=ca.issue_server(folder, "misnamed", hosts=("broker.example",)),
    )


def environ(**settings: str | Path) -> dict[str, str]:
    """ENVPIPE_* variables from keyword arguments: `kafka_ssl_cafile=path`."""
    return {env_name(name): str(value) for name, value in settings.items()}


def access(bootstrap: str, **settings: str | Path) -> KafkaAccess:
    """TLS access as a worker would build it from these settings."""
    env = environ(bootstrap_servers=bootstrap, kafka_security_protocol="SSL", **settings)
    return KafkaAccess.from_settings(load_settings(environ=env))


# --- settings: checked at start, named in every error ------------------------------------------


def test_plaintext_by_default() -> None:
    kafka = KafkaAccess.from_settings(load_settings(environ={}))
    assert kafka.client_kwargs() == {
        "bootstrap_servers": "localhost:9092",
        "security_protocol": "PLAINTEXT",
        "ssl_context": None,
    }
    assert KafkaAccess.of("h:1") == KafkaAccess("h:1")


def test_ssl_verifies_the_broker_with_the_given_or_the_system_cas(pki: Pki) -> None:
    for kafka in (access("h:1"), access("h:1", kafka_ssl_cafile=pki.ca)):
        context = kafka.ssl_context
        assert context is not None
        assert kafka.client_kwargs()["security_protocol"] == "SSL"
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
    mutual = access(
        "h:1",
        kafka_ssl_cafile=pki.ca,
        kafka_ssl_certfile=pki.client.cert,
        kafka_ssl_keyfile=pki.client.key,
    )
    assert mutual.ssl_context is not None


@pytest.mark.parametrize(
    ("settings", "setting", "fragment"),
    [
        ({"kafka_ssl_cafile": "/no/such/ca.pem"}, CAFILE, "does not exist"),
        ({"kafka_ssl_cafile": "{key}"}, CAFILE, "not a CA bundle of PEM certificates"),
        ({"kafka_ssl_certfile": "{cert}"}, KEYFILE, "must be set too"),
        ({"kafka_ssl_keyfile": "{key}"}, CERTFILE, "must be set too"),
        (
            {"kafka_ssl_certfile": "{cert}", "kafka_ssl_keyfile": "/no/such.key"},
            KEYFILE,
            "does not exist",
        ),
        (
            {"kafka_ssl_certfile": "{cert}", "kafka_ssl_keyfile": "{other_key}"},
            CERTFILE,
            "belong together",
        ),
    ],
)
def test_bad_tls_settings_name_the_setting(
    pki: Pki, settings: dict[str, str], setting: str, fragment: str
) -> None:
    files = {"key": pki.client.key, "cert": pki.client.cert, "other_key": pki.stranger.key}
    filled = {name: value.format(**files) for name, value in settings.items()}
    with pytest.raises(ConfigError) as caught:
        access("h:1", **filled)
    assert caught.value.setting == setting
    assert fragment in str(caught.value)


def test_tls_files_without_ssl_are_refused_not_ignored(pki: Pki) -> None:
    settings = load_settings(environ=environ(kafka_ssl_cafile=pki.ca))
    with pytest.raises(ConfigError) as caught:
        KafkaAccess.from_settings(settings)
    assert caught.value.setting == CAFILE
    assert f"set {PROTOCOL}=SSL" in str(caught.value)


def test_a_worker_with_bad_tls_settings_stops_before_connecting(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["encrypt", "--source", "a", "--dest", "b", "--group", "g"],
        env=environ(
            bootstrap_servers="127.0.0.1:1",
            kafka_security_protocol="ssl",
            kafka_ssl_cafile=tmp_path / "missing.pem",
        ),
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("envpipe: error:")]
    missing = tmp_path / "missing.pem"
    assert errors == [f"envpipe: error: {CAFILE}: {missing} does not exist or is not a file"]
    assert "Traceback" not in result.output


async def test_a_listener_that_does_not_speak_tls_is_named(pki: Pki) -> None:
    async def answer_in_plaintext(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_in_plaintext, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        kafka = access(f"127.0.0.1:{port}", kafka_ssl_cafile=pki.ca)
        error = await kafka.connection_error(RuntimeError("aiokafka's complaint"))
    assert error.setting == PROTOCOL
    assert "is it a TLS listener?" in str(error)


async def test_an_unreachable_broker_is_not_blamed_on_tls(pki: Pki) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        kafka = access(f"127.0.0.1:{port}", kafka_ssl_cafile=pki.ca)
        error = await kafka.connection_error(RuntimeError("aiokafka's complaint"))
    assert error.setting == "ENVPIPE_BOOTSTRAP_SERVERS"
    assert str(error) == (
        f"ENVPIPE_BOOTSTRAP_SERVERS: cannot reach the Kafka broker at 127.0.0.1:{port} over TLS: "
        "aiokafka's complaint"
    )


# --- a broker behind a TLS terminator ---------------------------------------------------------


@dataclass(frozen=True)
class TlsBroker:
    """A Tansu broker (and KMS) of this module's own, advertising `tls_port`."""

    env: dev.DevEnv
    tls_port: int

    def terminator(self, issued: Issued, *, client_ca: Path | None = None) -> TlsTerminator:
        """A terminator on the advertised port, forwarding to the broker's plaintext listener."""
        return TlsTerminator(
            issued, self.env.bootstrap_servers, port=self.tls_port, client_ca=client_ca
        )


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    state_dir = tmp_path_factory.mktemp("tls-broker")
    with socket.socket() as sock:  # free now; each test's terminator binds it
        sock.bind(("127.0.0.1", 0))
        tls_port: int = sock.getsockname()[1]
    env = dev.up(state_dir, broker=BROKER, advertised_port=tls_port, ready_timeout=120)
    try:
        yield TlsBroker(env, tls_port)
    finally:
        dev.down(state_dir)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_workers_encrypt_and_decrypt_over_verified_tls(
    tls_broker: TlsBroker, pki: Pki, tmp_path: Path
) -> None:
    plain, enc, dec, dlq = (kit.name(f"tls-{part}") for part in ("plain", "enc", "dec", "dlq"))
    async with tls_broker.terminator(pki.server) as terminator:
        kafka = access(terminator.address, kafka_ssl_cafile=pki.ca)
        await topics.create_topics(kafka, [plain], partitions=3)
        originals = kit.mixed_records(2_000)
        await kit.produce(kafka, plain, originals)
        source = await kit.read(kafka, plain)
        assert len(source) == len(originals)
        plaintext_bytes = sum(len(rec.value or b"") for rec in originals)
        assert terminator.bytes_up > plaintext_bytes  # the records went through the terminator

        tls_env = {
            "ENVPIPE_BOOTSTRAP_SERVERS": terminator.address,
            PROTOCOL: "SSL",
            CAFILE: str(pki.ca),
        }
        workers = Workers(tls_broker.env, tmp_path)
        try:
            before = terminator.handshakes
            encrypt = await workers.encrypt(
                plain, enc, kit.name("g"), "--stop-when-idle", IDLE, name="enc", **tls_env
            )
            assert await encrypt.wait(90) == 0, encrypt.tail()
            assert terminator.handshakes > before  # the worker's own connections
            before = terminator.handshakes
            decrypt = await workers.decrypt(
                enc, dec, dlq, kit.name("g"), "--stop-when-idle", IDLE, name="dec", **tls_env
            )
            assert await decrypt.wait(90) == 0, decrypt.tail()
            assert terminator.handshakes > before
        finally:
            await workers.close()
        sealed = await kit.read(kafka, enc)
        opened = await kit.read(kafka, dec)
        assert await kit.read(kafka, dlq) == []

    assert len(sealed) == len(source)
    assert not [r for r in sealed if r.value is not None and MARKER in r.value]
    assert Counter(map(Rec.of, opened)) == Counter(map(Rec.of, source))
    for proc in (encrypt, decrypt):
        assert proc.stats()["records_in"] == proc.stats()["records_out"] == len(source)
    assert terminator.refused == []
    # Everything, both workers' output included, came back through the terminator.
    assert terminator.bytes_down > 3 * plaintext_bytes


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_worker_that_does_not_trust_the_broker_stops_with_one_clear_error(
    tls_broker: TlsBroker, pki: Pki, tmp_path: Path
) -> None:
    async with tls_broker.terminator(pki.server) as terminator:
        workers = Workers(tls_broker.env, tmp_path)
        try:
            started = time.monotonic()
            proc = await workers.encrypt(
                "tls-anything",
                "tls-anything.enc",
                kit.name("g"),
                name="enc-wrong-ca",
                ENVPIPE_BOOTSTRAP_SERVERS=terminator.address,
                **{PROTOCOL: "SSL", CAFILE: str(pki.wrong_ca)},
            )
            code = await proc.wait(60)
            elapsed = time.monotonic() - started
        finally:
            await workers.close()
    log = proc.log.read_text()
    assert code == 2, log
    assert elapsed < 30, log  # no retrying until some timeout
    errors = [line for line in log.splitlines() if line.startswith("envpipe: error:")]
    assert errors == [
        f"envpipe: error: {CAFILE}: the certificate of the Kafka broker at {terminator.address} "
        f"was not trusted (unable to get local issuer certificate; trusted: {pki.wrong_ca}); "
        f"set {CAFILE} to the CA bundle (PEM) that signed it"
    ], log
    assert "Traceback" not in log
    # The worker did try TLS with the terminator, and gave up on every handshake.
    assert terminator.refused
    assert terminator.handshakes == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_mutual_tls(tls_broker: TlsBroker, pki: Pki) -> None:
    topic = kit.name("tls-mutual")
    async with tls_broker.terminator(pki.server, client_ca=pki.ca) as terminator:
        client = {"kafka_ssl_certfile": pki.client.cert, "kafka_ssl_keyfile": pki.client.key}
        kafka = access(terminator.address, kafka_ssl_cafile=pki.ca, **client)
        await topics.create_topics(kafka, [topic], partitions=1)
        await kit.produce(kafka, topic, [Rec(b"k", b"over mutual TLS")])
        assert [Rec.of(r).value for r in await kit.read(kafka, topic)] == [b"over mutual TLS"]
        assert terminator.handshakes > 0
        assert terminator.refused == []


@dataclass(frozen=True)
class Failure:
    """A TLS setup that cannot work, and what the error must say about it."""

    server: str  # which of the Pki's server certificates the terminator serves
    mutual: bool  # whether the terminator wants client certificates
    files: dict[str, str]  # setting -> a Pki attribute path ("client.cert")
    setting: str
    fragment: str


FAILURES = {
    "wrong CA": Failure("server", False, {"kafka_ssl_cafile": "wrong_ca"}, CAFILE, "not trusted"),
    "system CAs": Failure("server", False, {}, CAFILE, "trusted: the system CAs"),
    "wrong name": Failure(
        "misnamed",
        False,
        {"kafka_ssl_cafile": "ca"},
        "ENVPIPE_BOOTSTRAP_SERVERS",
        "does not name 127.0.0.1",
    ),
    "no client certificate": Failure(
        "server", True, {"kafka_ssl_cafile": "ca"}, CERTFILE, "wants a client certificate"
    ),
    "untrusted client certificate": Failure(
        "server",
        True,
        {
            "kafka_ssl_cafile": "ca",
            "kafka_ssl_certfile": "stranger.cert",
            "kafka_ssl_keyfile": "stranger.key",
        },
        CERTFILE,
        "refused our client certificate",
    ),
}


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", FAILURES.values(), ids=FAILURES.keys())
async def test_tls_failures_are_explained(tls_broker: TlsBroker, pki: Pki, case: Failure) -> None:
    """What `inspect`, `demo` and the workers report, through the shared topic helpers."""
    files = {name: attrgetter(path)(pki) for name, path in case.files.items()}
    issued: Issued = getattr(pki, case.server)
    client_ca = pki.ca if case.mutual else None
    async with tls_broker.terminator(issued, client_ca=client_ca) as terminator:
        kafka = access(terminator.address, **files)
        started = time.monotonic()
        with pytest.raises(ConfigError) as caught:
            await kit.read(kafka, "tls-anything")
    assert caught.value.setting == case.setting, caught.value
    assert case.fragment in str(caught.value)
    assert time.monotonic() - started < 30
