"""Settings: flags > environment > TOML > defaults, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.config import MAX_RECORDS_PER_DEK, Settings, load_settings
from pipeline.errors import ConfigError
from workers.cli import main


def test_defaults_match_the_contract() -> None:
    settings = Settings()
    assert settings.dek_max_age_seconds == 300
    assert settings.dek_max_records == 1_000_000
    assert settings.dek_max_bytes == 1 << 30
    assert settings.dek_refresh_at == 0.8
    assert settings.decrypt_cache_size == 10_000
    assert settings.decrypt_cache_idle_seconds == 3600


def test_precedence_flags_then_env_then_toml(tmp_path: Path) -> None:
    config = tmp_path / "envpipe.toml"
    config.write_text(
        'dek_max_records = 10\ndek_max_bytes = 2048\nkms_key_id = "alias/from-file"\n'
        'allowed_kms_keys = ["arn:a", "arn:b"]\n'
    )
    environ = {"ENVPIPE_DEK_MAX_RECORDS": "20", "ENVPIPE_DEK_MAX_BYTES": "4096"}
    settings = load_settings({"dek_max_records": "30"}, environ=environ, config_file=config)
    assert settings.dek_max_records == 30  # flag
    assert settings.dek_max_bytes == 4096  # environment
    assert settings.kms_key_id == "alias/from-file"  # file
    assert settings.allowed_kms_keys == ("arn:a", "arn:b")
    assert settings.dek_max_age_seconds == 300  # default


def test_config_file_from_environment_and_envpipe_table(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[envpipe]\nbatch_max_records = 42\n")
    settings = load_settings(environ={"ENVPIPE_CONFIG": str(config)})
    assert settings.batch_max_records == 42


def test_lists_and_booleans_from_environment() -> None:
    settings = load_settings(
        environ={
            "ENVPIPE_ALLOWED_SIGNING_KEYS": "arn:1, arn:2,,",
            "ENVPIPE_KMS_VERIFY_TLS": "false",
        }
    )
    assert settings.allowed_signing_keys == ("arn:1", "arn:2")
    assert settings.kms_verify_tls is False


@pytest.mark.parametrize(
    ("environ", "setting", "fragment"),
    [
        ({"ENVPIPE_DEK_MAX_RECORDS": "0"}, "ENVPIPE_DEK_MAX_RECORDS", "between 1 and"),
        (
            {"ENVPIPE_DEK_MAX_RECORDS": str(MAX_RECORDS_PER_DEK + 1)},
            "ENVPIPE_DEK_MAX_RECORDS",
            "4,294,967,296",
        ),
        ({"ENVPIPE_DEK_MAX_AGE_SECONDS": "soon"}, "ENVPIPE_DEK_MAX_AGE_SECONDS", "'soon'"),
        ({"ENVPIPE_KMS_VERIFY_TLS": "maybe"}, "ENVPIPE_KMS_VERIFY_TLS", "true or false"),
        ({"ENVPIPE_DEK_REFRESH_AT": "1.5"}, "ENVPIPE_DEK_REFRESH_AT", "between 0.1 and 0.99"),
    ],
)
def test_errors_name_the_setting_value_and_range(
    environ: dict[str, str], setting: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    assert caught.value.setting == setting
    assert str(caught.value).startswith(setting)
    assert fragment in str(caught.value)


def test_unknown_and_invalid_toml(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("dek_max_recs = 5\n")
    with pytest.raises(ConfigError, match="dek_max_recs"):
        load_settings(environ={}, config_file=config)
    config.write_text("dek_max_records = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(environ={}, config_file=config)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(environ={}, config_file=tmp_path / "missing.toml")


def test_cli_reports_config_errors_in_one_line() -> None:
    result = CliRunner().invoke(main, ["config", "show", "--dek-max-records", "-5"])
    assert result.exit_code == 2
    assert "ENVPIPE_DEK_MAX_RECORDS" in result.output
    assert "Traceback" not in result.output


def test_cli_config_show_uses_flags_and_env() -> None:
    result = CliRunner().invoke(
        main,
        ["config", "show", "--batch-max-records", "77"],
        env={"ENVPIPE_DEK_MAX_RECORDS": "123"},
    )
    assert result.exit_code == 0, result.output
    values = {line.split()[0]: line.split()[1] for line in result.output.splitlines()}
    assert values["batch_max_records"] == "77"
    assert values["dek_max_records"] == "123"


def test_cli_config_show_says_where_values_came_from_and_redacts_credentials(
    tmp_path: Path,
) -> None:
    config = tmp_path / "envpipe.toml"
    config.write_text('linger_ms = 9\nkms_endpoint = "https://operator:hunter2@kms.internal"\n')
    result = CliRunner().invoke(
        main,
        ["config", "show", "--config", str(config), "--batch-max-records", "77"],
        env={
            "ENVPIPE_DEK_MAX_RECORDS": "123",
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID0001",
            "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-secret-example",
            "AWS_SESSION_TOKEN": "session-token-example",
        },
    )
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()}
    assert rows["batch_max_records"].endswith("--batch-max-records")
    assert rows["dek_max_records"].endswith("ENVPIPE_DEK_MAX_RECORDS")
    assert rows["linger_ms"].endswith(f"linger_ms in {config}")
    assert rows["dek_max_age_seconds"].endswith("default")
    assert "operator:***@kms.internal" in rows["kms_endpoint"]
    assert "AWS_SECRET_ACCESS_KEY" in rows["credentials"]
    for secret in ("hunter2", "AKIAEXAMPLEKEYID0001", "wJalrXUtnFEMI", "session-token-example"):
        assert secret not in result.output


@pytest.mark.parametrize(
    ("provider", "environ", "named", "secrets"),
    [
        (
            "vault",
            {"VAULT_ADDR": "https://vault:8200", "VAULT_TOKEN": "hvs.secret-token-value"},
            ("VAULT_TOKEN", "VAULT_ADDR"),
            ("hvs.secret-token-value",),
        ),
        (
            "pkcs11",
            {"ENVPIPE_PKCS11_PIN": "pin-0000-secret", "ENVPIPE_PKCS11_MODULE": "/lib/p11.so"},
            ("ENVPIPE_PKCS11_PIN", "ENVPIPE_PKCS11_MODULE"),
            ("pin-0000-secret",),
        ),
    ],
)
def test_cli_config_show_names_each_providers_credential_sources(
    provider: str, environ: dict[str, str], named: tuple[str, ...], secrets: tuple[str, ...]
) -> None:
    result = CliRunner().invoke(
        main, ["config", "show"], env={"ENVPIPE_KMS_PROVIDER": provider, **environ}
    )
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()}
    assert rows["credentials"].split()[1] == f"{provider}:"
    for name in named:
        assert name in rows["credentials"]
    for secret in secrets:
        assert secret not in result.output


def test_choices_match_without_case_and_name_the_allowed_values() -> None:
    settings = load_settings(
        environ={"ENVPIPE_LOG_FORMAT": "JSON", "ENVPIPE_KAFKA_SECURITY_PROTOCOL": "ssl"}
    )
    assert (settings.log_format, settings.kafka_security_protocol) == ("json", "SSL")
    with pytest.raises(ConfigError, match=r"ENVPIPE_LOG_FORMAT.*'yaml'.*text, json"):
        load_settings(environ={"ENVPIPE_LOG_FORMAT": "yaml"})


def test_decrypt_refuses_to_start_without_a_dead_letter_topic() -> None:
    result = CliRunner().invoke(main, ["decrypt", "--source", "a", "--dest", "b", "--group", "g"])
    assert result.exit_code == 2
    assert "Missing option '--dlq'" in result.output
