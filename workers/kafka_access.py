"""How every envpipe process reaches Kafka: bootstrap servers, transport and login, in one value.

`KafkaAccess.from_settings` checks the TLS and SASL settings once, at start, and builds the one
`ssl.SSLContext` all clients of a process share (certificate and hostname verification on;
the system CAs unless ENVPIPE_KAFKA_SSL_CAFILE names others) and the SASL credentials
(`workers.kafka_sasl`). `client_kwargs()` is what every aiokafka consumer, producer and admin
client is built with, so no client can be created without TLS or SASL when they are configured.

aiokafka reports a failed TLS handshake or a refused login only in a log line and then raises
a bare "Unable to bootstrap", so `connection_error` looks again, with one connection of its own
per bootstrap server, and turns what it finds into an error that names the setting to change.
`authorization_error` does the same for a broker that knows who we are but refuses an
operation: it names the principal, the operation and the topic or group.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest
from cryptography import x509

from pipeline.config import Settings, env_name
from pipeline.errors import ConfigError
from workers.kafka_sasl import MECHANISM, USERNAME, SaslCredentials, sasl_credentials

__all__ = ["KafkaAccess", "KafkaAuthorizationError"]

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


class KafkaAuthorizationError(ConfigError):
    """The broker authenticated us but refuses an operation: who, what, on which resource."""

    def __init__(
        self, setting: str, message: str, *, principal: str, operation: str, resource: str
    ) -> None:
        super().__init__(setting, message)
        self.principal = principal
        self.operation = operation
        self.resource = resource  # "topic 'orders'", "group 'g'", "the cluster", ...


@dataclass(frozen=True, slots=True)
class KafkaAccess:
    """Bootstrap servers, transport and login; `ssl_context` is set exactly when TLS is on,
    `sasl` exactly when SASL is."""

    bootstrap_servers: str
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    cafile: str = ""  # for messages: which CAs were trusted
    sasl: SaslCredentials | None = None
    certfile: str = ""  # for messages: the principal of a client certificate

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaAccess:
        """Validate the Kafka transport and SASL settings, build the TLS context and load the
        SASL password or token provider; ConfigError naming the setting if anything is wrong."""
        protocol = settings.kafka_security_protocol
        if protocol not in ("SSL", "SASL_SSL"):
            given = [env_name(name) for name in _SSL_FILES if getattr(settings, name)]
            if given:
                raise ConfigError(
                    given[0],
                    f"is set but {_PROTOCOL} is {protocol}, so it would be ignored; "
                    f"set {_PROTOCOL}=SSL (or SASL_SSL) to connect over TLS, or unset "
                    + ", ".join(given),
                )
            return cls(settings.bootstrap_servers, sasl=sasl_credentials(settings))
        sasl = sasl_credentials(settings)
        context = _ssl_context(
            settings.kafka_ssl_cafile, settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile
        )
        return cls(
            settings.bootstrap_servers,
            context,
            settings.kafka_ssl_cafile,
            sasl=sasl,
            certfile=settings.kafka_ssl_certfile,
        )

    @classmethod
    def of(cls, target: KafkaAccess | str) -> KafkaAccess:
        """`target` itself, or plaintext access to a bare "host:port[,...]" string."""
        return target if isinstance(target, KafkaAccess) else cls(target)

    @property
    def security_protocol(self) -> str:
        tls = self.ssl_context is not None
        if self.sasl is not None:
            return "SASL_SSL" if tls else "SASL_PLAINTEXT"
        return "SSL" if tls else "PLAINTEXT"

    @property
    def principal(self) -> str:
        """Whom the broker's ACLs see: the SASL user, the client certificate, or ANONYMOUS."""
        if self.sasl is not None:
            return self.sasl.principal
        if self.certfile:
            return _certificate_principal(self.certfile)
        return "User:ANONYMOUS"

    def client_kwargs(self) -> dict[str, Any]:
        """The connection arguments of an aiokafka consumer, producer or admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "ssl_context": self.ssl_context,
        }
        if self.sasl is not None:
            kwargs |= self.sasl.client_kwargs()
        return kwargs

    async def connection_error(self, exc: BaseException) -> ConfigError:
        """The error to report when a client could not start: why, and which setting to change.

        `exc` is what aiokafka raised. A TLS handshake and a SASL login of our own with each
        bootstrap server find out whether either was the reason (aiokafka only logs them).
        Never contains the password.
        """
        if isinstance(exc, SaslAuthenticationFailed | UnsupportedSaslMechanismError):
            return self._sasl_refused(self.bootstrap_servers, exc)
        for host, port, _ in collect_hosts(self.bootstrap_servers, randomize=False):
            if (problem := await self._tls_problem(host, port)) is not None:
                return problem
            if (problem := await self._login_problem(host, port)) is not None:
                return problem
        over = " over TLS" if self.ssl_context is not None else ""
        reason = self.sasl.redact(str(exc)) if self.sasl is not None else str(exc)
        return ConfigError(
            env_name("bootstrap_servers"),
            f"cannot reach the Kafka broker at {self.bootstrap_servers}{over}: {reason}",
        )

    def authorization_error(
        self,
        exc: BaseException,
        *,
        operation: str,
        topic: str | None = None,
        group: str | None = None,
        transactional_id: str | None = None,
    ) -> KafkaAuthorizationError | None:
        """What an authorization failure from aiokafka means, or None if `exc` is not one.

        `operation` is the ACL operation the client attempted: READ, WRITE, DESCRIBE, CREATE,
        ALTER... (a producer WRITEs a topic, a consumer READs a topic and its group).
        """
        if isinstance(exc, TopicAuthorizationFailedError):
            name = topic or _first_arg(exc)
            resource, acl = f"topic {name!r}", f"--topic {name}"
        elif isinstance(exc, GroupAuthorizationFailedError):
            name = group or _first_arg(exc)
            resource, acl = f"group {name!r}", f"--group {name}"
        elif isinstance(exc, TransactionalIdAuthorizationFailed):
            name = transactional_id or _first_arg(exc)
            resource, acl = f"transactional id {name!r}", f"--transactional-id {name}"
        elif isinstance(exc, ClusterAuthorizationFailedError):
            resource, acl = "the cluster", "--cluster"
        else:
            return None
        principal = self.principal
        setting = USERNAME if self.sasl is not None else _PROTOCOL
        if self.sasl is None and self.certfile:
            setting = _CERTFILE
        return KafkaAuthorizationError(
            setting,
            f"the Kafka broker refuses {operation} on {resource} to {principal} "
            f"({type(exc).__name__}); grant it (kafka-acls.sh --add --allow-principal "
            f"'{principal}' --operation {operation} {acl}), or connect as a principal "
            "that has it",
            principal=principal,
            operation=operation,
            resource=resource,
        )

    async def _login_problem(self, host: str, port: int) -> ConfigError | None:
        """Log in (or not) as our clients do and ask for metadata; what goes wrong, explained.

        None if it works, or if not even a connection can be made: not the login's fault.
        """
        where = f"the Kafka broker at {host}:{port}"
        sasl = self.sasl.client_kwargs() if self.sasl is not None else {}
        try:
            async with asyncio.timeout(_HANDSHAKE_SECONDS):
                conn = await create_conn(
                    host,
                    port,
                    client_id="envpipe-diagnosis",
                    request_timeout_ms=int(_HANDSHAKE_SECONDS * 1000),
                    ssl_context=self.ssl_context,
                    security_protocol=self.security_protocol,
                    **sasl,
                )
        except (SaslAuthenticationFailed, UnsupportedSaslMechanismError) as exc:
            return self._sasl_refused(f"{host}:{port}", exc)
        except IllegalSaslStateError:
            plain = "SSL" if self.ssl_context is not None else "PLAINTEXT"
            return ConfigError(
                _PROTOCOL,
                f"{where} refused the SASL handshake: it is not a SASL listener; connect to "
                f"the broker's SASL port, or set {_PROTOCOL}={plain} if it needs no login",
            )
        except (KafkaError, OSError, TimeoutError):
            return None
        try:
            async with asyncio.timeout(_HANDSHAKE_SECONDS):
                await conn.send(MetadataRequest([]))
        except (KafkaError, OSError, TimeoutError):
            if self.sasl is None:
                # ApiVersions was answered, the next request was not: a SASL listener does that
                # to a client that does not log in.
                return ConfigError(
                    _PROTOCOL,
                    f"{where} hung up on the first request after ApiVersions, as a SASL "
                    f"listener does when a client does not log in; set {_PROTOCOL}=SASL_SSL "
                    f"(or SASL_PLAINTEXT) and {MECHANISM}",
                )
        finally:
            conn.close()
        return None

    def _sasl_refused(self, where: str, exc: BaseException) -> ConfigError:
        """A login the broker refused: name the mechanism, the user and where the secret is."""
        sasl = self.sasl
        reason = sasl.redact(str(exc)) if sasl is not None else str(exc)
        if isinstance(exc, UnsupportedSaslMechanismError):
            return ConfigError(
                MECHANISM,
                f"the Kafka broker at {where} does not enable this SASL mechanism ({reason}); "
                f"set {MECHANISM} to one it enables",
            )
        if sasl is None:
            return ConfigError(_PROTOCOL, f"the Kafka broker at {where} refused us: {reason}")
        if sasl.mechanism == "OAUTHBEARER":
            return ConfigError(
                sasl.credential_setting,
                f"the Kafka broker at {where} refused the OAUTHBEARER token from "
                f"{sasl.token_provider_name} ({reason}); check that provider's credentials",
            )
        return ConfigError(
            sasl.credential_setting,
            f"the Kafka broker at {where} refused the {sasl.mechanism} login of user "
            f"{sasl.username!r} ({reason}); check {sasl.credential_setting} and {USERNAME}, "
            f"and that the broker has a {sasl.mechanism} credential for that user",
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


def _certificate_principal(certfile: str) -> str:
    """`User:<subject DN>`, as Kafka's default principal builder names a client certificate."""
    try:
        with open(certfile, "rb") as pem:
            cert = x509.load_pem_x509_certificate(pem.read())
    except (OSError, ValueError):
        return f"the principal of the client certificate {certfile}"
    return f"User:{cert.subject.rfc4514_string()}"


def _first_arg(exc: BaseException) -> str:
    """The name aiokafka put in an authorization error (`TopicAuthorizationFailedError(topic)`)."""
    return str(exc.args[0]) if exc.args else "?"


def _why(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
