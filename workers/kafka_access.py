"""How every envpipe process reaches Kafka: bootstrap servers and transport, in one value.

`KafkaAccess.from_settings` checks the TLS settings once, at start, and builds the one
`ssl.SSLContext` all clients of a process share (certificate and hostname verification on;
the system CAs unless ENVPIPE_KAFKA_SSL_CAFILE names others). `client_kwargs()` is what
every aiokafka consumer, producer and admin client is built with, so no client can be
created without TLS when TLS is configured.

aiokafka reports a failed TLS handshake only in a log line and then raises a bare "Unable to
bootstrap", so `connection_error` looks again, with one handshake of its own per bootstrap
server, and turns what it finds into an error that names the setting to change.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiokafka.conn import collect_hosts

from pipeline.config import Settings, env_name
from pipeline.errors import ConfigError

__all__ = ["KafkaAccess"]

_PROTOCOL = env_name("kafka_security_protocol")
_CAFILE = env_name("kafka_ssl_cafile")
_CERTFILE = env_name("kafka_ssl_certfile")
_KEYFILE = env_name("kafka_ssl_keyfile")
_SSL_FILES = ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
#: Bound the diagnostic connection and handshake, and the wait for a server's alert after it
#: (TLS 1.3 servers refuse a client certificate after the client thinks the handshake is done).
_HANDSHAKE_SECONDS = 5.0
_ALERT_SECONDS = 0.5
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = {62, 64}


@dataclass(frozen=True, slots=True)
class KafkaAccess:
    """Bootstrap servers and transport; `ssl_context` is set exactly when TLS is on."""

    bootstrap_servers: str
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    cafile: str = ""  # for messages: which CAs were trusted

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaAccess:
        """Validate the Kafka transport settings and build the TLS context; ConfigError if wrong."""
        if settings.kafka_security_protocol != "SSL":
            given = [env_name(name) for name in _SSL_FILES if getattr(settings, name)]
            if given:
                raise ConfigError(
                    given[0],
                    f"is set but {_PROTOCOL} is {settings.kafka_security_protocol}, so it would "
                    f"be ignored; set {_PROTOCOL}=SSL to connect over TLS, or unset "
                    + ", ".join(given),
                )
            return cls(settings.bootstrap_servers)
        context = _ssl_context(
            settings.kafka_ssl_cafile, settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile
        )
        return cls(settings.bootstrap_servers, context, settings.kafka_ssl_cafile)

    @classmethod
    def of(cls, target: KafkaAccess | str) -> KafkaAccess:
        """`target` itself, or plaintext access to a bare "host:port[,...]" string."""
        return target if isinstance(target, KafkaAccess) else cls(target)

    @property
    def security_protocol(self) -> str:
        return "PLAINTEXT" if self.ssl_context is None else "SSL"

    def client_kwargs(self) -> dict[str, Any]:
        """The connection arguments of an aiokafka consumer, producer or admin client."""
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "ssl_context": self.ssl_context,
        }

    async def connection_error(self, exc: BaseException) -> ConfigError:
        """The error to report when a client could not start: why, and which setting to change.

        `exc` is what aiokafka raised. Over TLS, a handshake of our own with each bootstrap
        server finds out whether TLS was the reason (aiokafka only logs it).
        """
        for host, port, _ in collect_hosts(self.bootstrap_servers, randomize=False):
            if (problem := await self._tls_problem(host, port)) is not None:
                return problem
        over = " over TLS" if self.ssl_context is not None else ""
        return ConfigError(
            env_name("bootstrap_servers"),
            f"cannot reach the Kafka broker at {self.bootstrap_servers}{over}: {exc}",
        )

    async def _tls_problem(self, host: str, port: int) -> ConfigError | None:
        """The TLS error a handshake with `host:port` runs into, explained; None if none."""
        if self.ssl_context is None:
            return None
        failure = await _handshake_failure(host, port, self.ssl_context)
        return None if failure is None else self._explain(host, port, failure)

    def _explain(self, host: str, port: int, exc: ssl.SSLError | TimeoutError) -> ConfigError:
        where = f"the Kafka broker at {host}:{port}"
        if isinstance(exc, TimeoutError):
            return ConfigError(
                _PROTOCOL,
                f"{where} accepted a connection but gave no TLS answer within "
                f"{_HANDSHAKE_SECONDS:g} s; is it a TLS listener? ({_PROTOCOL}=SSL needs one)",
            )
        reason = exc.reason or str(exc)
        if isinstance(exc, ssl.SSLCertVerificationError):
            if exc.verify_code in _NAME_MISMATCH:
                return ConfigError(
                    env_name("bootstrap_servers"),
                    f"the certificate of {where} does not name {host} ({exc.verify_message}); "
                    "connect by a name or address the certificate holds",
                )
            return ConfigError(
                _CAFILE,
                f"the certificate of {where} was not trusted ({exc.verify_message}; trusted: "
                f"{self.cafile or 'the system CAs'}); set {_CAFILE} to the CA bundle (PEM) "
                "that signed it",
            )
        if "CERTIFICATE_REQUIRED" in reason:
            return ConfigError(
                _CERTFILE,
                f"{where} wants a client certificate (mutual TLS); set {_CERTFILE} and {_KEYFILE}",
            )
        if any(
            alert in reason for alert in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN")
        ):
            return ConfigError(
                _CERTFILE,
                f"{where} refused our client certificate ({reason}); set {_CERTFILE} and "
                f"{_KEYFILE} to a certificate the broker trusts",
            )
        return ConfigError(
            _PROTOCOL,
            f"the TLS handshake with {where} failed ({reason}); is it a TLS listener? "
            f"({_PROTOCOL}=SSL needs one)",
        )


async def _handshake_failure(
    host: str, port: int, context: ssl.SSLContext
) -> ssl.SSLError | TimeoutError | None:
    """What a TLS handshake with `host:port` runs into (TimeoutError: no TLS answer at all).

    None if it works, or if not even a TCP connection can be made: that is not TLS's fault.
    """
    try:
        async with asyncio.timeout(_HANDSHAKE_SECONDS):
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return None
    try:
        try:
            async with asyncio.timeout(_HANDSHAKE_SECONDS):
                await writer.start_tls(context, server_hostname=host)
        except (ssl.SSLError, TimeoutError) as exc:
            return exc
        except OSError:
            return None
        try:
            async with asyncio.timeout(_ALERT_SECONDS):
                await reader.read(1)  # a Kafka broker never speaks first, but a TLS alert might
        except ssl.SSLError as exc:
            return exc
        except (OSError, TimeoutError):
            pass
        return None
    finally:
        writer.transport.abort()


def _ssl_context(cafile: str, certfile: str, keyfile: str) -> ssl.SSLContext:
    """A client context that verifies the broker; with certfile and keyfile, for mutual TLS."""
    if bool(certfile) != bool(keyfile):
        missing = _KEYFILE if certfile else _CERTFILE
        raise ConfigError(
            missing, f"must be set too: mutual TLS needs both {_CERTFILE} and {_KEYFILE}"
        )
    for setting, path in ((_CAFILE, cafile), (_CERTFILE, certfile), (_KEYFILE, keyfile)):
        if path and not os.path.isfile(path):
            raise ConfigError(setting, f"{path} does not exist or is not a file")
    try:
        # Certificate and hostname verification on; TLS 1.2 at least.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            _CAFILE, f"{cafile} is not a CA bundle of PEM certificates ({_why(exc)})"
        ) from exc
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                _CERTFILE,
                f"cannot load the client certificate {certfile} with the key {keyfile} "
                f"({_KEYFILE}): {_why(exc)}; both must be PEM and belong together",
            ) from exc
    return context


def _why(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
