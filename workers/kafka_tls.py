"""TLS to Kafka: the client context built from the settings, and what a failed handshake means.

`client_context(settings)` checks ENVPIPE_KAFKA_SSL_CAFILE, _CERTFILE and _KEYFILE once, at
start, and builds the one `ssl.SSLContext` a process's clients share: certificate and hostname
verification on, the system CAs unless a CA file names others, a client certificate for mutual
TLS. `refuse_ignored_tls_files` stops a process whose TLS files would be silently ignored.

aiokafka only logs a failed TLS handshake, so `handshake_problem` makes one of its own with a
broker and turns the failure into a ConfigError naming the setting to change. It lives apart
from `workers.kafka_access` because none of it depends on SASL or on the Kafka protocol: it is
plain TLS, with Kafka's settings in its messages. Keys are loaded by OpenSSL and never shown.
"""

from __future__ import annotations

import asyncio
import os
import ssl

from cryptography import x509

from pipeline.config import Settings, env_name
from pipeline.errors import ConfigError

__all__ = [
    "CAFILE",
    "CERTFILE",
    "HANDSHAKE_SECONDS",
    "KEYFILE",
    "PROTOCOL",
    "TLS_PROTOCOLS",
    "certificate_principal",
    "client_context",
    "handshake_problem",
    "refuse_ignored_tls_files",
]

PROTOCOL = env_name("kafka_security_protocol")
CAFILE = env_name("kafka_ssl_cafile")
CERTFILE = env_name("kafka_ssl_certfile")
KEYFILE = env_name("kafka_ssl_keyfile")
_SSL_FILES = ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
#: The values of ENVPIPE_KAFKA_SECURITY_PROTOCOL that connect over TLS.
TLS_PROTOCOLS = ("SSL", "SASL_SSL")
#: Bound a diagnostic connection and handshake, and the wait for a server's alert after it
#: (TLS 1.3 servers refuse a client certificate after the client thinks the handshake is done).
HANDSHAKE_SECONDS = 5.0
_ALERT_SECONDS = 0.5
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = {62, 64}


def refuse_ignored_tls_files(settings: Settings) -> None:
    """ConfigError if a TLS file is set while the protocol does not use TLS (it would be
    ignored, and the operator believes the connection is encrypted)."""
    protocol = settings.kafka_security_protocol
    given = [env_name(name) for name in _SSL_FILES if getattr(settings, name)]
    if protocol not in TLS_PROTOCOLS and given:
        raise ConfigError(
            given[0],
            f"is set but {PROTOCOL} is {protocol}, so it would be ignored; "
            f"set {PROTOCOL}=SSL (or SASL_SSL) to connect over TLS, or unset " + ", ".join(given),
        )


def client_context(settings: Settings) -> ssl.SSLContext:
    """A client context that verifies the broker; with certfile and keyfile, for mutual TLS."""
    cafile = settings.kafka_ssl_cafile
    certfile = settings.kafka_ssl_certfile
    keyfile = settings.kafka_ssl_keyfile
    if bool(certfile) != bool(keyfile):
        missing = KEYFILE if certfile else CERTFILE
        raise ConfigError(
            missing, f"must be set too: mutual TLS needs both {CERTFILE} and {KEYFILE}"
        )
    for setting, path in ((CAFILE, cafile), (CERTFILE, certfile), (KEYFILE, keyfile)):
        if path and not os.path.isfile(path):
            raise ConfigError(setting, f"{path} does not exist or is not a file")
    try:
        # Certificate and hostname verification on; TLS 1.2 at least.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            CAFILE, f"{cafile} is not a CA bundle of PEM certificates ({_why(exc)})"
        ) from exc
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                CERTFILE,
                f"cannot load the client certificate {certfile} with the key {keyfile} "
                f"({KEYFILE}): {_why(exc)}; both must be PEM and belong together",
            ) from exc
    return context


def certificate_principal(certfile: str) -> str:
    """`User:<subject DN>`, as Kafka's default principal builder names a client certificate."""
    try:
        with open(certfile, "rb") as pem:
            cert = x509.load_pem_x509_certificate(pem.read())
    except (OSError, ValueError):
        return f"the principal of the client certificate {certfile}"
    return f"User:{cert.subject.rfc4514_string()}"


async def handshake_problem(
    host: str, port: int, context: ssl.SSLContext, cafile: str
) -> ConfigError | None:
    """The TLS error a handshake with `host:port` runs into, explained; None if none.

    `cafile` is the CA bundle the context trusts ("" for the system CAs), for the message.
    """
    failure = await _handshake_failure(host, port, context)
    return None if failure is None else _explain(host, port, failure, cafile)


async def _handshake_failure(
    host: str, port: int, context: ssl.SSLContext
) -> ssl.SSLError | TimeoutError | None:
    """What a TLS handshake with `host:port` runs into (TimeoutError: no TLS answer at all).

    None if it works, or if not even a TCP connection can be made: that is not TLS's fault.
    """
    try:
        async with asyncio.timeout(HANDSHAKE_SECONDS):
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return None
    try:
        try:
            async with asyncio.timeout(HANDSHAKE_SECONDS):
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


def _explain(host: str, port: int, exc: ssl.SSLError | TimeoutError, cafile: str) -> ConfigError:
    """The setting behind a failed handshake: the CA file, the client certificate, the
    bootstrap address (a certificate for another name) or the protocol (not a TLS listener)."""
    where = f"the Kafka broker at {host}:{port}"
    if isinstance(exc, TimeoutError):
        return ConfigError(
            PROTOCOL,
            f"{where} accepted a connection but gave no TLS answer within "
            f"{HANDSHAKE_SECONDS:g} s; is it a TLS listener? ({PROTOCOL}=SSL needs one)",
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
            CAFILE,
            f"the certificate of {where} was not trusted ({exc.verify_message}; trusted: "
            f"{cafile or 'the system CAs'}); set {CAFILE} to the CA bundle (PEM) that signed it",
        )
    if "CERTIFICATE_REQUIRED" in reason:
        return ConfigError(
            CERTFILE,
            f"{where} wants a client certificate (mutual TLS); set {CERTFILE} and {KEYFILE}",
        )
    if any(alert in reason for alert in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN")):
        return ConfigError(
            CERTFILE,
            f"{where} refused our client certificate ({reason}); set {CERTFILE} and "
            f"{KEYFILE} to a certificate the broker trusts",
        )
    return ConfigError(
        PROTOCOL,
        f"the TLS handshake with {where} failed ({reason}); is it a TLS listener? "
        f"({PROTOCOL}=SSL needs one)",
    )


def _why(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
