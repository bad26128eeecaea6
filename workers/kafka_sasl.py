"""SASL credentials from the settings: checked once at start, the password never shown.

`sasl_credentials(settings)` returns None unless ENVPIPE_KAFKA_SECURITY_PROTOCOL is SASL_*,
and refuses SASL settings that would be silently ignored. PLAIN and SCRAM need a user name
and exactly one of ENVPIPE_KAFKA_SASL_PASSWORD and ENVPIPE_KAFKA_SASL_PASSWORD_FILE;
OAUTHBEARER needs ENVPIPE_KAFKA_SASL_OAUTH_TOKEN_PROVIDER, `module:attribute` naming an
aiokafka `AbstractTokenProvider` subclass (built with no arguments) or instance.
`login_refused` explains a login the broker refused by the setting that holds the secret.

aiokafka logs each SaslAuthenticate request at DEBUG, PLAIN's password and OAUTHBEARER's token
included; `redact_sasl_logs` (installed with any SASL credentials) cuts those payloads out.
aiokafka 0.14 also takes a refused OAUTHBEARER token for a login: Kafka answers it with an
RFC 7628 error challenge and waits for the client's %x01, which aiokafka never sends, so the
connection is left half-open and every request after it fails obscurely. `_answer_oauth_errors`
(installed with OAUTHBEARER) sends it, so the broker fails the login with an error instead.

The password file is read once, here: aiokafka keeps the password it was built with, so a
rotated password takes effect when the worker restarts (Kafka keeps accepting the old SCRAM
credential until it is changed on the broker, so a rolling restart loses nothing).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiokafka.conn
from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import UnsupportedSaslMechanismError

from pipeline.config import Settings, env_name
from pipeline.errors import ConfigError

__all__ = ["SaslCredentials", "login_refused", "redact_sasl_logs", "sasl_credentials"]

PROTOCOL = env_name("kafka_security_protocol")
MECHANISM = env_name("kafka_sasl_mechanism")
USERNAME = env_name("kafka_sasl_username")
PASSWORD = env_name("kafka_sasl_password")
PASSWORD_FILE = env_name("kafka_sasl_password_file")
TOKEN_PROVIDER = env_name("kafka_sasl_oauth_token_provider")
_SASL_SETTINGS = (
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_sasl_password_file",
    "kafka_sasl_oauth_token_provider",
)
_MECHANISMS = "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER"


@dataclass(frozen=True, slots=True)
class SaslCredentials:
    """Who a client logs in as. `repr` shows the mechanism and user, never the password."""

    mechanism: str
    username: str = ""
    password: str = field(default="", repr=False)
    #: the variable the password came from (…_PASSWORD or …_PASSWORD_FILE), for messages
    password_setting: str = PASSWORD
    token_provider: AbstractTokenProvider | None = field(default=None, repr=False, compare=False)
    token_provider_name: str = ""  # module:attribute, for messages

    @property
    def principal(self) -> str:
        """The principal the broker authorizes, as ACLs name it."""
        if self.mechanism == "OAUTHBEARER":
            return "the principal of the OAUTHBEARER token (its `sub` claim by default)"
        return f"User:{self.username}"

    @property
    def credential_setting(self) -> str:
        """The setting that holds the secret: what to fix when a login is refused."""
        return TOKEN_PROVIDER if self.mechanism == "OAUTHBEARER" else self.password_setting

    def client_kwargs(self) -> dict[str, Any]:
        """aiokafka's SASL arguments."""
        oauth = self.mechanism == "OAUTHBEARER"
        return {
            "sasl_mechanism": self.mechanism,
            "sasl_plain_username": None if oauth else self.username,
            "sasl_plain_password": None if oauth else self.password,
            "sasl_oauth_token_provider": self.token_provider,
        }

    def redact(self, text: str) -> str:
        """`text` with the password replaced, should a broker or library ever echo it."""
        return text.replace(self.password, "***") if self.password else text


def login_refused(sasl: SaslCredentials | None, where: str, exc: BaseException) -> ConfigError:
    """A login the broker at `where` refused: name the mechanism, the user and the setting that
    holds the secret (never the secret itself)."""
    reason = sasl.redact(str(exc)) if sasl is not None else str(exc)
    if isinstance(exc, UnsupportedSaslMechanismError):
        return ConfigError(
            MECHANISM,
            f"the Kafka broker at {where} does not enable this SASL mechanism ({reason}); "
            f"set {MECHANISM} to one it enables",
        )
    if sasl is None:
        return ConfigError(PROTOCOL, f"the Kafka broker at {where} refused us: {reason}")
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


class _RedactSaslPayload(logging.Filter):
    """Cuts the SASL payload (a password, a token) out of aiokafka's request log lines."""

    MARK = "sasl_auth_bytes="

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.MARK in message:
            record.msg = message.partition(self.MARK)[0] + self.MARK + "<redacted>)"
            record.args = ()
        return True


_REDACTION = _RedactSaslPayload()


def redact_sasl_logs() -> None:
    """Make aiokafka's connection log safe at DEBUG: no SASL payload in it (idempotent)."""
    logger = logging.getLogger("aiokafka.conn")
    if _REDACTION not in logger.filters:
        logger.addFilter(_REDACTION)


class _OAuthAnsweringErrors(aiokafka.conn.OAuthAuthenticator):  # type: ignore[misc]
    """aiokafka's OAUTHBEARER client, plus RFC 7628 section 3.2.3: a server message after the
    token is an error challenge, answered with %x01 so the broker ends the login with an error."""

    async def step(self, payload: bytes | None) -> tuple[bytes, bool] | None:
        if self._token_sent and payload and not getattr(self, "_answered", False):
            self._answered = True
            return b"\x01", True
        result: tuple[bytes, bool] | None = await super().step(payload)
        return result


def _answer_oauth_errors() -> None:
    """Install `_OAuthAnsweringErrors` where aiokafka's connection builds its authenticator,
    only while that is still the very class it extends (idempotent)."""
    if aiokafka.conn.OAuthAuthenticator is _OAuthAnsweringErrors.__mro__[1]:
        aiokafka.conn.OAuthAuthenticator = _OAuthAnsweringErrors


def sasl_credentials(settings: Settings) -> SaslCredentials | None:
    """The SASL credentials the settings ask for; ConfigError naming the setting if wrong."""
    credentials = _credentials(settings)
    if credentials is not None:
        redact_sasl_logs()
        if credentials.mechanism == "OAUTHBEARER":
            _answer_oauth_errors()
    return credentials


def _credentials(settings: Settings) -> SaslCredentials | None:
    protocol = settings.kafka_security_protocol
    if not protocol.startswith("SASL_"):
        given = [env_name(name) for name in _SASL_SETTINGS if getattr(settings, name)]
        if given:
            raise ConfigError(
                given[0],
                f"is set but {PROTOCOL} is {protocol}, so it would be ignored; set "
                f"{PROTOCOL}=SASL_SSL (or SASL_PLAINTEXT) to log in with SASL, or unset "
                + ", ".join(given),
            )
        return None
    mechanism = settings.kafka_sasl_mechanism
    if not mechanism:
        raise ConfigError(MECHANISM, f"must be set when {PROTOCOL} is {protocol}: {_MECHANISMS}")
    if mechanism == "OAUTHBEARER":
        return _oauth(settings)
    if settings.kafka_sasl_oauth_token_provider:
        raise ConfigError(
            TOKEN_PROVIDER,
            f"is only used with {MECHANISM}=OAUTHBEARER, not {mechanism}; unset it",
        )
    if not settings.kafka_sasl_username:
        raise ConfigError(USERNAME, f"must be set: {mechanism} logs in with a user name")
    password, source = _password(settings, mechanism)
    return SaslCredentials(mechanism, settings.kafka_sasl_username, password, source)


def _password(settings: Settings, mechanism: str) -> tuple[str, str]:
    """The password and the variable it came from."""
    if settings.kafka_sasl_password and settings.kafka_sasl_password_file:
        raise ConfigError(PASSWORD, f"and {PASSWORD_FILE} are both set; set only one")
    if settings.kafka_sasl_password:
        return settings.kafka_sasl_password, PASSWORD
    path = settings.kafka_sasl_password_file
    if not path:
        raise ConfigError(
            PASSWORD_FILE,
            f"or {PASSWORD} must be set: {mechanism} needs a password (prefer the file)",
        )
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(PASSWORD_FILE, f"cannot read {path} ({why})") from None
    # One trailing newline, as `echo` and most secret stores write it, is not part of it.
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ConfigError(PASSWORD_FILE, f"{path} is empty")
    return password, PASSWORD_FILE


def _oauth(settings: Settings) -> SaslCredentials:
    for name in ("kafka_sasl_username", "kafka_sasl_password", "kafka_sasl_password_file"):
        if getattr(settings, name):
            raise ConfigError(
                env_name(name),
                f"is not used with {MECHANISM}=OAUTHBEARER (the token provider logs in); unset it",
            )
    spec = settings.kafka_sasl_oauth_token_provider
    if not spec:
        raise ConfigError(
            TOKEN_PROVIDER,
            "must be set for OAUTHBEARER: module:attribute naming an aiokafka "
            "AbstractTokenProvider subclass or instance (see docs/kafka.md)",
        )
    return SaslCredentials(
        "OAUTHBEARER", token_provider=load_token_provider(spec), token_provider_name=spec
    )


def load_token_provider(spec: str) -> AbstractTokenProvider:
    """Import `module:attribute` and make sure it is (or builds) an AbstractTokenProvider."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(TOKEN_PROVIDER, f"{spec!r} is not of the form module:attribute")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is this setting's problem
        raise ConfigError(
            TOKEN_PROVIDER, f"cannot import {module_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(
                TOKEN_PROVIDER, f"{module_name!r} has no attribute {attribute!r}"
            ) from None
    if isinstance(target, type) and issubclass(target, AbstractTokenProvider):
        try:
            target = target()
        except Exception as exc:  # the provider's own error, explained
            raise ConfigError(
                TOKEN_PROVIDER, f"{spec} could not be built ({type(exc).__name__}: {exc})"
            ) from exc
    if not isinstance(target, AbstractTokenProvider):
        raise ConfigError(
            TOKEN_PROVIDER,
            f"{spec} is a {type(target).__name__}, not an aiokafka AbstractTokenProvider "
            "subclass or instance",
        )
    return target
