"""SASL settings: checked at start, every error names its setting, the password never shows.

No broker needed; logins against a real one are in test_apache_kafka.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from pipeline.config import env_name, load_settings
from pipeline.errors import ConfigError
from workers.kafka_access import KafkaAccess, KafkaAuthorizationError
from workers.kafka_sasl import redact_sasl_logs

SECRET = "s3cret-never-shown"
PROTOCOL = "ENVPIPE_KAFKA_SECURITY_PROTOCOL"
MECHANISM = "ENVPIPE_KAFKA_SASL_MECHANISM"
USERNAME = "ENVPIPE_KAFKA_SASL_USERNAME"
PASSWORD = "ENVPIPE_KAFKA_SASL_PASSWORD"
PASSWORD_FILE = "ENVPIPE_KAFKA_SASL_PASSWORD_FILE"
TOKEN_PROVIDER = "ENVPIPE_KAFKA_SASL_OAUTH_TOKEN_PROVIDER"


class StaticToken(AbstractTokenProvider):  # type: ignore[misc]
    """A provider built with no arguments, as `module:Class` is."""

    async def token(self) -> str:
        return "token"


INSTANCE = StaticToken()
NOT_A_PROVIDER = object()


class Exploding(AbstractTokenProvider):  # type: ignore[misc]
    def __init__(self) -> None:
        raise RuntimeError("no credentials in this environment")

    async def token(self) -> str:  # pragma: no cover - never built
        return ""


def access(**settings: str) -> KafkaAccess:
    environ = {env_name(name): value for name, value in settings.items()}
    return KafkaAccess.from_settings(
        load_settings(environ={"ENVPIPE_BOOTSTRAP_SERVERS": "h:1", **environ})
    )


def sasl(mechanism: str = "SCRAM-SHA-512", **settings: str) -> KafkaAccess:
    return access(
        kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism=mechanism, **settings
    )


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_password_logins_pass_user_and_password(mechanism: str) -> None:
    kafka = sasl(mechanism, kafka_sasl_username="alice", kafka_sasl_password=SECRET)
    assert kafka.client_kwargs() == {
        "bootstrap_servers": "h:1",
        "security_protocol": "SASL_PLAINTEXT",
        "ssl_context": None,
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "alice",
        "sasl_plain_password": SECRET,
        "sasl_oauth_token_provider": None,
    }
    assert kafka.principal == "User:alice"
    assert SECRET not in repr(kafka)
    assert SECRET not in str(kafka)


def test_sasl_ssl_builds_the_tls_context_too() -> None:
    kafka = access(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="key",
        kafka_sasl_password=SECRET,
    )
    kwargs = kafka.client_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["ssl_context"] is not None
    assert kwargs["ssl_context"].check_hostname


def test_password_file_is_read_once_without_its_newline(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(SECRET + "\n")
    kafka = sasl(kafka_sasl_username="alice", kafka_sasl_password_file=str(secret))
    assert kafka.client_kwargs()["sasl_plain_password"] == SECRET
    assert kafka.sasl is not None
    assert kafka.sasl.credential_setting == PASSWORD_FILE


@pytest.mark.parametrize(
    ("settings", "setting", "fragment"),
    [
        ({"kafka_sasl_mechanism": ""}, MECHANISM, "must be set when"),
        ({"kafka_sasl_username": ""}, USERNAME, "must be set"),
        ({"kafka_sasl_password": ""}, PASSWORD_FILE, "needs a password"),
        ({"kafka_sasl_password_file": "/x"}, PASSWORD, "both set"),
        (
            {"kafka_sasl_password": "", "kafka_sasl_password_file": "/no/such"},
            PASSWORD_FILE,
            "cannot read /no/such",
        ),
        ({"kafka_sasl_oauth_token_provider": "m:a"}, TOKEN_PROVIDER, "only used with"),
    ],
)
def test_bad_sasl_settings_name_the_setting(
    settings: dict[str, str], setting: str, fragment: str
) -> None:
    base = {
        "kafka_sasl_mechanism": "SCRAM-SHA-256",
        "kafka_sasl_username": "alice",
        "kafka_sasl_password": SECRET,
    }
    with pytest.raises(ConfigError) as caught:
        access(kafka_security_protocol="SASL_SSL", **{**base, **settings})
    assert caught.value.setting == setting
    assert fragment in str(caught.value)
    assert SECRET not in str(caught.value)


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError) as caught:
        sasl(kafka_sasl_username="a", kafka_sasl_password_file=str(tmp_path / "empty"))
    assert caught.value.setting == PASSWORD_FILE
    assert "is empty" in str(caught.value)


def test_sasl_settings_without_sasl_are_refused_not_ignored() -> None:
    with pytest.raises(ConfigError) as caught:
        access(kafka_sasl_username="alice", kafka_sasl_password=SECRET)
    assert caught.value.setting == USERNAME
    assert f"set {PROTOCOL}=SASL_SSL" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "spec", [f"{__name__}:StaticToken", f"{__name__}:INSTANCE"], ids=["class", "instance"]
)
def test_oauthbearer_takes_a_provider_class_or_instance(spec: str) -> None:
    kafka = sasl("OAUTHBEARER", kafka_sasl_oauth_token_provider=spec)
    kwargs = kafka.client_kwargs()
    assert isinstance(kwargs["sasl_oauth_token_provider"], StaticToken)
    assert kwargs["sasl_plain_password"] is None
    assert "OAUTHBEARER token" in kafka.principal


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "must be set for OAUTHBEARER"),
        ("no_colon", "not of the form module:attribute"),
        ("no_such_module_xyz:P", "cannot import 'no_such_module_xyz'"),
        (f"{__name__}:Missing", "has no attribute 'Missing'"),
        (f"{__name__}:NOT_A_PROVIDER", "not an aiokafka AbstractTokenProvider"),
        (f"{__name__}:Exploding", "could not be built (RuntimeError: no credentials"),
    ],
)
def test_a_bad_token_provider_names_the_setting(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        sasl("OAUTHBEARER", kafka_sasl_oauth_token_provider=spec)
    assert caught.value.setting == TOKEN_PROVIDER
    assert fragment in str(caught.value)


def test_oauthbearer_refuses_a_password_it_would_ignore() -> None:
    with pytest.raises(ConfigError) as caught:
        sasl(
            "OAUTHBEARER",
            kafka_sasl_oauth_token_provider=f"{__name__}:INSTANCE",
            kafka_sasl_password=SECRET,
        )
    assert caught.value.setting == PASSWORD
    assert SECRET not in str(caught.value)


def test_plaintext_keeps_its_three_arguments() -> None:
    assert access().client_kwargs() == {
        "bootstrap_servers": "h:1",
        "security_protocol": "PLAINTEXT",
        "ssl_context": None,
    }
    assert access().principal == "User:ANONYMOUS"


@pytest.mark.parametrize(
    ("exc", "kwargs", "resource"),
    [
        (TopicAuthorizationFailedError("orders"), {}, "topic 'orders'"),
        (GroupAuthorizationFailedError(), {"group": "g1"}, "group 'g1'"),
        (TransactionalIdAuthorizationFailed("tx-1"), {}, "transactional id 'tx-1'"),
        (ClusterAuthorizationFailedError(), {}, "the cluster"),
    ],
)
def test_authorization_errors_name_principal_operation_and_resource(
    exc: Exception, kwargs: dict[str, str], resource: str
) -> None:
    kafka = sasl(kafka_sasl_username="alice", kafka_sasl_password=SECRET)
    error = kafka.authorization_error(exc, operation="READ", **kwargs)
    assert isinstance(error, KafkaAuthorizationError)
    assert (error.principal, error.operation, error.resource) == ("User:alice", "READ", resource)
    assert error.setting == USERNAME
    assert f"refuses READ on {resource} to User:alice" in str(error)
    assert SECRET not in str(error)


def test_other_errors_are_not_authorization_errors() -> None:
    assert access().authorization_error(RuntimeError("x"), operation="WRITE") is None


def test_sasl_payloads_are_cut_from_aiokafka_debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    redact_sasl_logs()
    redact_sasl_logs()  # idempotent
    assert len(logging.getLogger("aiokafka.conn").filters) == 1
    with caplog.at_level(logging.DEBUG, logger="aiokafka.conn"):
        logging.getLogger("aiokafka.conn").debug(
            "Request to %s:%s %s: %s",
            "h",
            1,
            3,
            f"SaslAuthenticateRequest_v1(sasl_auth_bytes=b'alice\\x00alice\\x00{SECRET}')",
        )
    assert SECRET not in caplog.text
    assert "sasl_auth_bytes=<redacted>" in caplog.text
