"""A TLS terminator for tests, and the throwaway certificates it serves.

The embedded Tansu broker cannot serve TLS itself (its `--cert` and `--key` options fail),
so a test puts this in front of its plaintext listener, the way a load balancer or stunnel
would sit in front of a real broker: clients speak TLS to the terminator, which pipes the
decrypted bytes to the broker and back. The broker must advertise the terminator's address,
or clients would be sent around it after bootstrap.

The terminator counts connections, completed handshakes, refused ones (and why) and the bytes
it carried, so a test can prove that the traffic really went over TLS, or that a client
really refused the certificate.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_HOST = "127.0.0.1"
_CHUNK = 64 * 1024
_VALIDITY = datetime.timedelta(days=1)


# --- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A PEM certificate and its key, written to files."""

    cert: Path
    key: Path


@dataclass
class TestCa:
    """A throwaway certificate authority (ECDSA P-256) that can issue leaf certificates."""

    name: str
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()), repr=False
    )

    __test__ = False  # not a pytest test class, whatever its name

    def __post_init__(self) -> None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        self.cert = (
            _builder(subject, subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def write(self, path: Path) -> Path:
        """The CA certificate as a PEM bundle, for a client's ENVPIPE_KAFKA_SSL_CAFILE."""
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issue_server(
        self, folder: Path, name: str = "server", hosts: tuple[str, ...] = (_HOST, "localhost")
    ) -> Issued:
        """A server certificate naming `hosts` (IP addresses or DNS names) in its SAN."""
        return self._issue(folder, name, ExtendedKeyUsageOID.SERVER_AUTH, [_san(h) for h in hosts])

    def issue_client(self, folder: Path, name: str = "client") -> Issued:
        """A client certificate, for mutual TLS."""
        return self._issue(folder, name, ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(name)])

    def _issue(
        self, folder: Path, name: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            _builder(subject, self.cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        issued = Issued(folder / f"{name}.pem", folder / f"{name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        issued.key.chmod(0o600)
        return issued


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
    )


# --- the terminator -------------------------------------------------------------------------


class TlsTerminator:
    """Terminates TLS on a loopback port and pipes the plaintext to `upstream` ("host:port").

    It serves `issued` (certificate and key) on `port` (0: a free one); with `client_ca`,
    clients must present a certificate signed by it (mutual TLS).

    `connections` counts accepted connections, `handshakes` the TLS handshakes that
    completed, `refused` why the others failed (OpenSSL's reason, as this end saw it);
    `bytes_up` and `bytes_down` count the plaintext carried to and from the upstream.
    """

    def __init__(
        self, issued: Issued, upstream: str, *, port: int = 0, client_ca: Path | None = None
    ) -> None:
        self.upstream = upstream
        self.port = port
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(issued.cert, issued.key)
        if client_ca is not None:
            self._context.load_verify_locations(client_ca)
            self._context.verify_mode = ssl.CERT_REQUIRED
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.handshakes = 0
        self.refused: list[str] = []
        self.bytes_up = 0
        self.bytes_down = 0

    @property
    def address(self) -> str:
        """What clients use as their bootstrap servers."""
        return f"{_HOST}:{self.port}"

    async def start(self) -> TlsTerminator:
        self._server = await asyncio.start_server(
            self._accept, _HOST, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):  # their readers see EOF; the pipes end
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> TlsTerminator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            tls = _ServerTls(self._context, reader, writer)
            try:
                await tls.handshake()
            except (ssl.SSLError, ConnectionError) as exc:
                self.refused.append(getattr(exc, "reason", None) or type(exc).__name__)
                return
            self.handshakes += 1
            await self._forward(tls)
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)

    async def _forward(self, tls: _ServerTls) -> None:
        """Connect to the upstream and pipe both ways until both directions end."""
        host, _, port = self.upstream.rpartition(":")
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except (OSError, ValueError):
            return  # no upstream: the client sees its connection close
        self._writers.add(up_writer)
        try:
            await asyncio.gather(self._upstream(tls, up_writer), self._downstream(up_reader, tls))
        finally:
            self._writers.discard(up_writer)
            up_writer.transport.abort()

    async def _upstream(self, tls: _ServerTls, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await tls.read():
                self.bytes_up += len(chunk)
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, ssl.SSLError):
            writer.transport.abort()

    async def _downstream(self, reader: asyncio.StreamReader, tls: _ServerTls) -> None:
        try:
            while chunk := await reader.read(_CHUNK):
                self.bytes_down += len(chunk)
                await tls.write(chunk)
        except (ConnectionError, ssl.SSLError):
            pass
        tls.close()


class _ServerTls:
    """The server side of TLS over a plain stream, through memory BIOs.

    asyncio's own TLS (`start_server(ssl=...)`) drops the alert when a handshake fails, so a
    client never learns *why* it was refused; a real broker or stunnel sends it. This does.
    """

    def __init__(
        self, context: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._reader, self._writer = reader, writer

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                return  # noqa: TRY300 - the finally must flush on success too
            except ssl.SSLWantReadError:
                pass
            finally:
                await self._flush()  # our next flight, or the alert of a failed handshake
            if not await self._fill():
                raise ConnectionResetError("the client left during the handshake")

    async def read(self) -> bytes:
        """Plaintext from the client; b"" once it is done."""
        while True:
            try:
                return self._tls.read(_CHUNK)
            except ssl.SSLWantReadError:
                if not await self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    async def write(self, data: bytes) -> None:
        self._tls.write(data)
        await self._flush()

    def close(self) -> None:
        self._writer.close()

    async def _fill(self) -> bool:
        data = await self._reader.read(_CHUNK)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def _flush(self) -> None:
        if data := self._outgoing.read():
            self._writer.write(data)
            await self._writer.drain()
