"""How every envpipe process reaches Kafka: bootstrap servers, transport and login, in one value.

`KafkaAccess.from_settings` checks the TLS and SASL settings once, at start, and builds the one
`ssl.SSLContext` all clients of a process share (`workers.kafka_tls`) and the SASL credentials
(`workers.kafka_sasl`). `client_kwargs()` is what every aiokafka consumer, producer and admin
client is built with, so no client can be created without TLS or SASL when they are configured.

aiokafka reports a failed TLS handshake or a refused login only in a log line and then raises
a bare "Unable to bootstrap", so `connection_error` looks again, with one connection of its own
per bootstrap server (a TLS handshake, `workers.kafka_tls`, then a login), and turns what it
finds into an error that names the setting to change. `authorization_error` does the same for
a broker that knows who we are but refuses an operation: it names the principal, the
operation and the topic or group.
"""

from __future__ import annotations

import asyncio
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

from pipeline.config import Settings, env_name
from pipeline.errors import ConfigError
from workers.kafka_sasl import (
    MECHANISM,
    PROTOCOL,
    USERNAME,
    SaslCredentials,
    login_refused,
    sasl_credentials,
)
from workers.kafka_tls import (
    CERTFILE,
    HANDSHAKE_SECONDS,
    TLS_PROTOCOLS,
    certificate_principal,
    client_context,
    handshake_problem,
    refuse_ignored_tls_files,
)

__all__ = ["KafkaAccess", "KafkaAuthorizationError"]


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
        if settings.kafka_security_protocol not in TLS_PROTOCOLS:
            refuse_ignored_tls_files(settings)
            return cls(settings.bootstrap_servers, sasl=sasl_credentials(settings))
        sasl = sasl_credentials(settings)
        return cls(
            settings.bootstrap_servers,
            client_context(settings),
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
            return certificate_principal(self.certfile)
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
            return login_refused(self.sasl, self.bootstrap_servers, exc)
        for host, port, _ in collect_hosts(self.bootstrap_servers, randomize=False):
            if self.ssl_context is not None:
                problem = await handshake_problem(host, port, self.ssl_context, self.cafile)
                if problem is not None:
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
        setting = USERNAME if self.sasl is not None else PROTOCOL
        if self.sasl is None and self.certfile:
            setting = CERTFILE
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
            async with asyncio.timeout(HANDSHAKE_SECONDS):
                conn = await create_conn(
                    host,
                    port,
                    client_id="envpipe-diagnosis",
                    request_timeout_ms=int(HANDSHAKE_SECONDS * 1000),
                    ssl_context=self.ssl_context,
                    security_protocol=self.security_protocol,
                    **sasl,
                )
        except (SaslAuthenticationFailed, UnsupportedSaslMechanismError) as exc:
            return login_refused(self.sasl, f"{host}:{port}", exc)
        except IllegalSaslStateError:
            plain = "SSL" if self.ssl_context is not None else "PLAINTEXT"
            return ConfigError(
                PROTOCOL,
                f"{where} refused the SASL handshake: it is not a SASL listener; connect to "
                f"the broker's SASL port, or set {PROTOCOL}={plain} if it needs no login",
            )
        except (KafkaError, OSError, TimeoutError):
            return None
        try:
            async with asyncio.timeout(HANDSHAKE_SECONDS):
                await conn.send(MetadataRequest([]))
        except (KafkaError, OSError, TimeoutError):
            if self.sasl is None:
                # ApiVersions was answered, the next request was not: a SASL listener does that
                # to a client that does not log in.
                return ConfigError(
                    PROTOCOL,
                    f"{where} hung up on the first request after ApiVersions, as a SASL "
                    f"listener does when a client does not log in; set {PROTOCOL}=SASL_SSL "
                    f"(or SASL_PLAINTEXT) and {MECHANISM}",
                )
        finally:
            conn.close()
        return None


def _first_arg(exc: BaseException) -> str:
    """The name aiokafka put in an authorization error (`TopicAuthorizationFailedError(topic)`)."""
    return str(exc.args[0]) if exc.args else "?"
