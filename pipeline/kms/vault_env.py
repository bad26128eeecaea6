"""Where the Vault client connects, with what token and what trust: read from the environment.

Vault's own variables are honoured as Vault's CLI honours them (and OpenBao's `BAO_*` twins),
so a worker runs where `vault`/`bao` already works:

    VAULT_ADDR / BAO_ADDR            the server, http(s)://host:port (required)
    VAULT_TOKEN / BAO_TOKEN          the token; else ENVPIPE_VAULT_TOKEN_FILE (Agent's sink)
    VAULT_NAMESPACE / BAO_NAMESPACE  sent as X-Vault-Namespace
    ENVPIPE_KMS_CA_BUNDLE, VAULT_CACERT / BAO_CACERT, VAULT_CAPATH / BAO_CAPATH
                                     the CAs that sign the server's certificate
    VAULT_CLIENT_CERT, VAULT_CLIENT_KEY (BAO_*)  a client certificate, for mutual TLS
    ENVPIPE_KMS_VERIFY_TLS=false     no certificate check at all (a loud warning)
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.kms.vault_token import TOKEN_FILE_SETTING, TokenSource

__all__ = [
    "VAULT_VARIABLES",
    "ConnectionSettings",
    "connection_settings",
    "describe_vault_credentials",
]

#: Every environment variable the provider reads besides ENVPIPE_* settings.
VAULT_VARIABLES = (
    "VAULT_ADDR",
    "BAO_ADDR",
    "VAULT_TOKEN",
    "BAO_TOKEN",
    "VAULT_NAMESPACE",
    "BAO_NAMESPACE",
    "VAULT_CACERT",
    "BAO_CACERT",
    "VAULT_CAPATH",
    "BAO_CAPATH",
    "VAULT_CLIENT_CERT",
    "BAO_CLIENT_CERT",
    "VAULT_CLIENT_KEY",
    "BAO_CLIENT_KEY",
    "VAULT_SKIP_VERIFY",
    "BAO_SKIP_VERIFY",
)

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionSettings:
    """What `VaultKms.connect` needs, as read from the environment."""

    address: str
    token: TokenSource  # its repr hides the token
    namespace: str
    ssl_context: ssl.SSLContext | bool


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str]:
    """(name, value) of the first variable set to a non-empty value, else ("", "")."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return "", ""


def connection_settings(settings: Settings, environ: Mapping[str, str]) -> ConnectionSettings:
    """Read and check every variable; ConfigError names the one to fix."""
    return ConnectionSettings(
        address=_address(settings, environ),
        token=_token(settings, environ),
        namespace=_first(environ, "VAULT_NAMESPACE", "BAO_NAMESPACE")[1].strip("/"),
        ssl_context=_ssl_context(settings, environ),
    )


def describe_vault_credentials(settings: Settings, environ: Mapping[str, str]) -> str:
    """For `config show`: which variables supply address, token, namespace and CA; no token."""
    address = _first(environ, "VAULT_ADDR", "BAO_ADDR")
    token_name = _first(environ, "VAULT_TOKEN", "BAO_TOKEN")[0]
    if token_name:
        source = f"{token_name} (value redacted)"
    elif settings.vault_token_file:
        source = f"ENVPIPE_VAULT_TOKEN_FILE={settings.vault_token_file}"
    else:
        source = "none set (VAULT_TOKEN, BAO_TOKEN or ENVPIPE_VAULT_TOKEN_FILE)"
    parts = [
        f"address {address[0]}={address[1]}" if address[0] else "address: VAULT_ADDR not set",
        f"token {source}",
    ]
    namespace = _first(environ, "VAULT_NAMESPACE", "BAO_NAMESPACE")
    if namespace[0]:
        parts.append(f"namespace {namespace[0]}={namespace[1]}")
    ca = (
        ("ENVPIPE_KMS_CA_BUNDLE", settings.kms_ca_bundle)
        if settings.kms_ca_bundle
        else _first(environ, "VAULT_CACERT", "BAO_CACERT")
    )
    if not settings.kms_verify_tls:
        parts.append("TLS NOT verified (ENVPIPE_KMS_VERIFY_TLS=false)")
    elif ca[0]:
        parts.append(f"CA {ca[0]}={ca[1]}")
    return "; ".join(parts)


def _address(settings: Settings, environ: Mapping[str, str]) -> str:
    name, address = _first(environ, "VAULT_ADDR", "BAO_ADDR")
    if not address:
        hint = " (ENVPIPE_KMS_ENDPOINT is AWS KMS's; Vault reads VAULT_ADDR)"
        raise ConfigError(
            "VAULT_ADDR",
            "ENVPIPE_KMS_PROVIDER=vault needs the server's address: set VAULT_ADDR "
            "(or BAO_ADDR), e.g. https://vault.example.com:8200"
            + (hint if settings.kms_endpoint else ""),
        )
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ConfigError(name, f"got {address!r}; expected http(s)://host:port")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ConfigError(name, f"got {address!r}: {exc}") from None
    if parts.scheme == "http" and not _loopback(parts.hostname):
        _log.warning(
            "%s uses http:// to %s: the Vault token and every data key cross the network in "
            "clear; use https://",
            name,
            parts.hostname,
        )
    return address.rstrip("/")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token(settings: Settings, environ: Mapping[str, str]) -> TokenSource:
    name, token = _first(environ, "VAULT_TOKEN", "BAO_TOKEN")
    if token:
        if settings.vault_token_file:
            _log.warning("%s is set, so %s is ignored", name, TOKEN_FILE_SETTING)
        return TokenSource.fixed(token, name)
    if settings.vault_token_file:
        return TokenSource.from_file(settings.vault_token_file)
    raise ConfigError(
        "VAULT_TOKEN",
        "no Vault token: set VAULT_TOKEN (or BAO_TOKEN), or ENVPIPE_VAULT_TOKEN_FILE to a "
        "file that holds one (such as Vault Agent's token sink)",
    )


def _ssl_context(settings: Settings, environ: Mapping[str, str]) -> ssl.SSLContext | bool:
    """True: system CAs; a context: our CAs (and client certificate); False: no checks."""
    skip_name, skip = _first(environ, "VAULT_SKIP_VERIFY", "BAO_SKIP_VERIFY")
    if not settings.kms_verify_tls:
        _log.warning(
            "ENVPIPE_KMS_VERIFY_TLS=false: the Vault server's certificate is NOT verified; "
            "anyone on the network path can impersonate it and read the token and data keys"
        )
        return False
    if skip.lower() in ("1", "true", "yes"):
        _log.warning(
            "%s is ignored: envpipe verifies TLS unless ENVPIPE_KMS_VERIFY_TLS=false", skip_name
        )
    ca_name, cafile = (
        ("ENVPIPE_KMS_CA_BUNDLE", settings.kms_ca_bundle)
        if settings.kms_ca_bundle
        else _first(environ, "VAULT_CACERT", "BAO_CACERT")
    )
    capath_name, capath = _first(environ, "VAULT_CAPATH", "BAO_CAPATH")
    cert_name, cert = _first(environ, "VAULT_CLIENT_CERT", "BAO_CLIENT_CERT")
    _, key = _first(environ, "VAULT_CLIENT_KEY", "BAO_CLIENT_KEY")
    if not (cafile or capath or cert):
        return True
    try:
        context = ssl.create_default_context(cafile=cafile or None, capath=capath or None)
    except (OSError, ssl.SSLError) as exc:
        name = ca_name if cafile else capath_name
        raise ConfigError(name, f"cannot load the CA bundle {cafile or capath}: {exc}") from None
    if cert:
        try:
            context.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(cert_name, f"cannot load the client certificate: {exc}") from None
    return context
