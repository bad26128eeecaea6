"""Where credentials come from, named but never shown (`envpipe config show`).

Credentials are not settings: AWS's come from its standard chain, Vault's token from
VAULT_TOKEN or a token file, an HSM's PIN from a variable or a file. These helpers name the
sources that are set, and take passwords out of URLs, so nothing secret is ever printed.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from pipeline.config import Settings, env_name

__all__ = ["CREDENTIAL_SOURCES", "describe_credentials", "redact_url"]


#: Where each provider's credentials can come from: variables or settings that hold a secret
#: or point at one. `config show` names those that are set, never their values.
CREDENTIAL_SOURCES = {
    "aws": (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ),
    "vault": (
        "VAULT_TOKEN",
        "BAO_TOKEN",
        "ENVPIPE_VAULT_TOKEN_FILE",
        "VAULT_ADDR",
        "BAO_ADDR",
        "VAULT_NAMESPACE",
        "BAO_NAMESPACE",
        "VAULT_CACERT",
        "BAO_CACERT",
    ),
    "pkcs11": (
        "ENVPIPE_PKCS11_PIN",
        "ENVPIPE_PKCS11_PIN_FILE",
        "ENVPIPE_PKCS11_MODULE",
        "ENVPIPE_PKCS11_TOKEN",
        "SOFTHSM2_CONF",
    ),
}
_FALLBACK = {
    "aws": "the standard AWS chain (config files, SSO, container or instance role)",
    "vault": "nothing set: VAULT_ADDR and VAULT_TOKEN (or ENVPIPE_VAULT_TOKEN_FILE) are needed",
    "pkcs11": "nothing set: ENVPIPE_PKCS11_MODULE, _TOKEN and _PIN (or _PIN_FILE) are needed",
}


def describe_credentials(settings: Settings, environ: Mapping[str, str]) -> str:
    """Where the selected provider's credentials come from: the sources set, not values."""
    provider = settings.kms_provider
    present = [name for name in CREDENTIAL_SOURCES[provider] if environ.get(name)]
    present += [
        env_name(name)
        for name in ("vault_token_file", "pkcs11_pin", "pkcs11_pin_file")
        if getattr(settings, name)
        and env_name(name) not in present
        and env_name(name) in CREDENTIAL_SOURCES[provider]
    ]
    if not present:
        return f"{provider}: {_FALLBACK[provider]}"
    return f"{provider}: set: {', '.join(present)} (values redacted)"


def redact_url(text: str) -> str:
    """Drop a password from a URL's user info (`https://user:pw@host` -> `user:***@host`)."""
    if "@" not in text or "://" not in text:
        return text
    parts = urlsplit(text)
    if parts.password is None:
        return text
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
