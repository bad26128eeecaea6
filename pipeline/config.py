"""Settings: one place for every default, every environment name and every bound.

Precedence is the contract's: command-line flags, then `ENVPIPE_*` environment variables,
then an optional TOML file, then the defaults below. Every value is validated when loaded,
and an error names the setting (as the environment variable a user would set), the bad value
and the allowed range. AWS credentials are never settings: they come only from the standard
AWS chain (`AWS_*` variables, profiles, instance roles).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

GIB = 1 << 30
MIB = 1 << 20
#: GCM with random or counter nonces: NIST SP 800-38D caps one key at 2^32 invocations.
MAX_RECORDS_PER_DEK = 1 << 32

#: The cryptography services (ENVPIPE_KMS_PROVIDER).
PROVIDERS = ("aws", "vault", "pkcs11")
#: Kafka's record-batch codecs (ENVPIPE_COMPRESSION); inputs in every one are always read.
COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")

ENV_PREFIX = "ENVPIPE_"
CONFIG_FILE_ENV = "ENVPIPE_CONFIG"


def _setting(
    default: Any,
    doc: str,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] = (),
    secret: bool = False,
) -> Any:
    """A setting: its default, its help, its bounds; `secret` ones are never printed."""
    return field(
        default=default,
        repr=not secret,
        metadata={"help": doc, "low": low, "high": high, "choices": choices, "secret": secret},
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """The effective configuration. Field `x` is set by `--x`, `ENVPIPE_X` or `x = ...` in TOML."""

    bootstrap_servers: str = _setting("localhost:9092", "Kafka bootstrap servers, host:port[,...]")
    kms_provider: str = _setting(
        "aws",
        "cryptography service: aws (KMS), vault (Vault/OpenBao transit) or pkcs11 (an HSM)",
        choices=PROVIDERS,
    )
    kms_endpoint: str = _setting("", "KMS endpoint URL; empty means real AWS KMS")
    kms_region: str = _setting("", "AWS region for the KMS; empty means the AWS default chain")
    kms_key_id: str = _setting(
        "",
        "wrapping key: ARN or alias (aws), vault:MOUNT:NAME (vault), pkcs11: URI (pkcs11); "
        "may hold {header:NAME} or {key} to pick a key per record",
    )
    signing_key_id: str = _setting(
        "", "ECDSA P-256 key that signs headers: ARN or alias, vault:MOUNT:NAME, pkcs11: URI"
    )
    allowed_kms_keys: tuple[str, ...] = _setting(
        (), "canonical wrapping-key ids readers accept; default: the configured key"
    )
    allowed_signing_keys: tuple[str, ...] = _setting(
        (), "canonical signing-key ids readers accept; default: the configured signing key"
    )
    kms_max_connections: int = _setting(
        10, "concurrent requests to the service (HTTP pool, or HSM sessions)", low=1, high=1000
    )
    kms_verify_tls: bool = _setting(True, "verify the KMS endpoint's TLS certificate")
    kms_ca_bundle: str = _setting("", "CA bundle (PEM) for the KMS endpoint; empty: system CAs")
    vault_token_file: str = _setting(
        "", "file holding the Vault token (read again when it changes, as Vault Agent's sink)"
    )
    pkcs11_module: str = _setting("", "path of the PKCS#11 library (libsofthsm2.so, say)")
    pkcs11_token: str = _setting("", "label of the PKCS#11 token holding the keys")
    pkcs11_pin: str = _setting(
        "", "the token's user PIN (prefer ENVPIPE_PKCS11_PIN_FILE)", secret=True
    )
    pkcs11_pin_file: str = _setting("", "file holding the token's user PIN")

    dek_max_age_seconds: float = _setting(300.0, "retire a DEK after this age", low=1, high=86400)
    dek_max_records: int = _setting(
        1_000_000, "retire a DEK after this many records", low=1, high=MAX_RECORDS_PER_DEK
    )
    dek_max_bytes: int = _setting(GIB, "retire a DEK after this many plaintext bytes", low=1)
    dek_refresh_at: float = _setting(
        0.8, "fetch the next DEK at this fraction of any limit", low=0.1, high=0.99
    )
    dek_grace_seconds: float = _setting(
        300.0, "while the KMS is down, let a DEK outlive its age/bytes limit", low=0, high=86400
    )
    encrypt_cache_size: int = _setting(
        1000, "live (key, context) DEKs kept by a writer (LRU)", low=1, high=10_000_000
    )
    decrypt_cache_size: int = _setting(10_000, "unwrapped DEKs kept by a reader", low=1)
    decrypt_cache_idle_seconds: float = _setting(
        3600.0, "drop an unwrapped DEK unused this long", low=1
    )
    negative_cache_seconds: float = _setting(
        10.0, "remember a failed unwrap this long, so bad input cannot flood the KMS", low=0
    )
    kms_retry_max_seconds: float = _setting(
        30.0, "longest pause between KMS retries (jittered exponential backoff)", low=0.01
    )

    batch_max_records: int = _setting(
        2000, "records fetched per consumer batch", low=1, high=100_000
    )
    batch_timeout_ms: int = _setting(100, "longest wait for a batch to fill", low=1, high=60_000)
    max_inflight_records: int = _setting(
        20_000, "records read but not yet acknowledged; above it, pause", low=1
    )
    max_inflight_bytes: int = _setting(
        64 * MIB, "bytes read but not yet acknowledged; above it, pause", low=1024
    )
    linger_ms: int = _setting(5, "producer linger before sending a batch", low=0, high=10_000)
    producer_max_batch_bytes: int = _setting(
        1 * MIB, "producer batch size per partition", low=1024, high=64 * MIB
    )

    format: str = _setting(
        "v1",
        "wire format written: v1 (header in every record) or v2 (keys topic)",
        choices=("v1", "v2"),
    )
    keys_topic: str = _setting("", "v2 keys topic; default: <encrypted topic>.keys")
    keys_cache_size: int = _setting(
        200_000, "v2 headers a reader keeps in memory (about 0.8 KiB each)", low=1
    )
    keys_wait_seconds: float = _setting(
        30.0, "how long a v2 reader waits for a missing header before header_missing", low=0
    )
    compression: str = _setting(
        "none",
        "compression of every topic envpipe writes: none, gzip, snappy, lz4 or zstd",
        choices=COMPRESSIONS,
    )
    exactly_once: bool = _setting(
        False, "consume-transform-produce in Kafka transactions (Apache Kafka only)"
    )

    kafka_security_protocol: str = _setting(
        "PLAINTEXT",
        "Kafka transport: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    )
    kafka_sasl_mechanism: str = _setting(
        "",
        "SASL mechanism: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER",
        choices=("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"),
    )
    kafka_sasl_username: str = _setting("", "SASL user name")
    kafka_sasl_password: str = _setting(
        "", "SASL password (prefer ENVPIPE_KAFKA_SASL_PASSWORD_FILE)", secret=True
    )
    kafka_sasl_password_file: str = _setting("", "file holding the SASL password")
    kafka_sasl_oauth_token_provider: str = _setting(
        "", "OAUTHBEARER token provider, module:attribute (an aiokafka AbstractTokenProvider)"
    )
    kafka_ssl_cafile: str = _setting("", "CA bundle (PEM) that signed the brokers' certificates")
    kafka_ssl_certfile: str = _setting("", "client certificate (PEM) for mutual TLS; optional")
    kafka_ssl_keyfile: str = _setting("", "client private key (PEM) for mutual TLS; optional")

    metrics_port: int = _setting(
        0, "serve Prometheus metrics on this port; 0 turns them off", low=0, high=65535
    )
    log_format: str = _setting("text", "log format: text or json", choices=("text", "json"))
    log_level: str = _setting("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def env_name(name: str) -> str:
    """`dek_max_age_seconds` -> `ENVPIPE_DEK_MAX_AGE_SECONDS`."""
    return ENV_PREFIX + name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _coerce(kind: type[Any], raw: object) -> object:
    """Turn a raw flag, env or TOML value into the field's type, or raise ValueError."""
    if isinstance(raw, str):
        parsers: dict[type[Any], Callable[[str], object]] = {
            bool: _parse_bool,
            int: lambda text: int(text.replace("_", "")),
            float: float,
            tuple: _parse_list,
            str: str,
        }
        return parsers[kind](raw)
    if kind is tuple and isinstance(raw, list | tuple):
        return tuple(str(item) for item in raw)
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    raise ValueError(f"expected {kind.__name__}")


_FIELD_TYPES: dict[str, type[Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "tuple[str, ...]": tuple,
}


def _canonical_choice(value: object, choices: tuple[str, ...]) -> object:
    """Choices match without regard to case (`ssl`, `SSL`); keep the documented spelling."""
    if isinstance(value, str):
        for choice in choices:
            if choice.lower() == value.lower():
                return choice
    return value


def _validate(
    name: str, value: object, low: float | None, high: float | None, choices: tuple[str, ...]
) -> None:
    if choices and value not in choices:
        raise ConfigError(env_name(name), f"got {value!r}; must be one of {', '.join(choices)}")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (
            f"between {_number(low)} and {_number(high)}"
            if high is not None
            else f"at least {_number(low)}"
        )
        raise ConfigError(env_name(name), f"got {value!r}; must be {bounds}")


def _number(bound: float | None) -> str:
    return f"{bound:,.0f}" if bound is not None and bound == int(bound) else f"{bound}"


def read_toml(path: Path) -> dict[str, object]:
    """Read a TOML config file; settings may sit at top level or under `[envpipe]`."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(CONFIG_FILE_ENV, f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(CONFIG_FILE_ENV, f"config file {path} is not valid TOML: {exc}") from exc
    section = data.get("envpipe", data)
    if not isinstance(section, dict):
        raise ConfigError(CONFIG_FILE_ENV, f"[envpipe] in {path} must be a table")
    return section


def load_settings(
    flags: Mapping[str, object | None] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Build validated Settings from flags, then environment, then a TOML file.

    `flags` maps field names to values; None means "flag not given". The TOML file is
    `config_file`, else `$ENVPIPE_CONFIG` if set.
    """
    return load_settings_explained(flags, environ, config_file)[0]


def load_settings_explained(
    flags: Mapping[str, object | None] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> tuple[Settings, dict[str, str]]:
    """`load_settings`, plus where each value came from (a flag, a variable, the file)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(CONFIG_FILE_ENV):
        config_file = Path(environ[CONFIG_FILE_ENV])
    from_file = read_toml(config_file) if config_file else {}
    known = {f.name for f in fields(Settings)}
    unknown = sorted((set(flags) | set(from_file)) - known)
    if unknown:
        where = f"config file {config_file}" if set(unknown) & set(from_file) else "flags"
        known_list = ", ".join(sorted(known))
        raise ConfigError(unknown[0], f"unknown setting in {where}; known: {known_list}")

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for spec in fields(Settings):
        name = spec.name
        if name in flags:
            raw, source = flags[name], f"--{name.replace('_', '-')}"
        elif env_name(name) in environ:
            raw, source = environ[env_name(name)], env_name(name)
        elif name in from_file:
            raw, source = from_file[name], f"{name} in {config_file}"
        else:
            continue
        kind = _FIELD_TYPES[str(spec.type)]
        try:
            value = _coerce(kind, raw)
        except ValueError as exc:
            raise ConfigError(env_name(name), f"bad value {raw!r} from {source}: {exc}") from exc
        value = _canonical_choice(value, spec.metadata["choices"])
        _validate(
            name, value, spec.metadata["low"], spec.metadata["high"], spec.metadata["choices"]
        )
        values[name] = value
        sources[name] = source
    return replace(Settings(), **values), sources


def describe_settings() -> list[tuple[str, str, str]]:
    """(environment name, default, help) for every setting: for `--help` and the docs."""
    rows = []
    for spec in fields(Settings):
        default = spec.default if spec.default is not MISSING else ""
        shown = ",".join(default) if isinstance(default, tuple) else str(default)
        rows.append((env_name(spec.name), shown, str(spec.metadata["help"])))
    return rows


def require(settings: Settings, name: str, purpose: str) -> str:
    """Return a string setting that must be set for `purpose`, or say how to set it."""
    value = getattr(settings, name)
    if not value:
        raise ConfigError(
            env_name(name), f"must be set to {purpose} (flag --{name.replace('_', '-')})"
        )
    return str(value)
