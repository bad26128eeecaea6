"""Vault's answers and aiohttp's failures, translated into envpipe's KMS error tree.

Vault's status codes alone mislead: a key below `min_decryption_version` is a 400 like a
malformed request, a `key_version` above the latest is a 500 like a crashed backend, and an
expired token is the same 403 as a missing policy. So the message decides first:

    "permission denied" (any status, 403)          KmsAccessDeniedError, naming the path
    key not found, "... (too old)", no such version KeyUnavailableError
    404 on a key path / no mount there              KeyUnavailableError
    429, 412, 502, 503, 504, other 5xx              KmsUnavailableError (retriable)
    3xx (a standby's redirect: never followed)      KmsUnavailableError (retriable)
    500 whose message is a client error             KmsRequestError
    any other 4xx (bad tag, bad ciphertext, ...)    KmsRequestError
    timeout, refused, DNS, TLS, reset               KmsUnavailableError (retriable)

Messages keep Vault's own text (truncated), the address and the API path; never the token,
a plaintext, a DEK or a ciphertext (Vault's errors do not echo request bodies).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from pipeline.errors import (
    KeyUnavailableError,
    KmsAccessDeniedError,
    KmsError,
    KmsRequestError,
    KmsUnavailableError,
)
from pipeline.kms.vault_ids import VaultKeyRef

__all__ = ["DecodedResponse", "classify_response", "translate_transport", "truncate"]

MAX_MESSAGE = 200

#: The key (or the version asked for) is gone or refused by policy: `key_unavailable`.
_KEY_GONE = (
    "key not found",  # "encryption key not found": deleted, or never created
    "disallowed by policy (too old)",  # below min_decryption_version
    "no such key version",  # 500: a version archived or never made
    "higher than the latest key version",  # 500: sign with key_version > latest
    "soft delete",
    "soft-delete",
)
#: 500s that are really the caller's fault: retrying cannot help.
_CLIENT_500 = (
    "does not support",
    "not supported",
    "unsupported",
    "illegal base64",
    "invalid",
    "failed to parse",
    "must be",
)
_RETRIABLE_STATUS = frozenset({408, 412, 429, 502, 503, 504})
_BULLET = re.compile(r"^\s*\*\s*(.+?)\s*$", re.MULTILINE)
_SPACE = re.compile(r"\s+")


def truncate(text: str, limit: int = MAX_MESSAGE) -> str:
    """One line of at most `limit` characters."""
    text = _SPACE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _flatten(message: str) -> str:
    """`1 error occurred:\\n\\t* permission denied\\n\\n` (Go's multierror) → the bullets."""
    bullets = _BULLET.findall(message)
    return "; ".join(bullets) if bullets and "error" in message.split(":", 1)[0] else message


@dataclass(frozen=True, slots=True)
class DecodedResponse:
    """An HTTP answer: its status, the JSON object (if it was one), Vault's error texts."""

    status: int
    body: Mapping[str, Any] | None
    messages: tuple[str, ...]
    snippet: str = ""  # the start of a non-JSON body (a proxy's error page, say)

    @classmethod
    def parse(cls, status: int, raw: bytes) -> DecodedResponse:
        if not raw.strip():
            return cls(status, {} if status == 204 else None, ())
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            text = raw[:120].decode("utf-8", errors="replace")
            return cls(status, None, (), "" if "<" in text else truncate(text, 120))
        if not isinstance(body, dict):
            return cls(status, None, ())
        errors = body.get("errors")
        messages = (
            tuple(_flatten(str(item)) for item in errors if str(item).strip())
            if isinstance(errors, list)
            else ()
        )
        return cls(status, body, messages)


def classify_response(
    operation: str,
    response: DecodedResponse,
    *,
    path: str,
    capability: str,
    token_origin: str,
    ref: VaultKeyRef | None = None,
) -> KmsError:
    """The error for a non-2xx answer (or a 2xx without a JSON object)."""
    status = response.status
    text = "; ".join(response.messages)
    lowered = text.lower()
    said = truncate(text) if text else (response.snippet or "no error message")
    kind, message = _kind(status, lowered), said
    if 200 <= status < 300:
        message = f"{path}: the answer is not a JSON object"
    elif 300 <= status < 400:
        message = (
            f"Vault redirected {path} (as a standby node does); envpipe does not follow "
            "redirects with the token: point VAULT_ADDR at the active node or a load balancer"
        )
    elif kind is KmsAccessDeniedError:
        message = (
            f"the Vault token may not {capability} {path}; its policy must allow "
            f'"{capability}" on that path (or the token expired: check {token_origin})'
        )
    elif kind is KeyUnavailableError and ref is not None:
        if status == 404 and "no handler for route" in lowered:
            message = (
                f"no transit engine is mounted at {ref.mount}/ (check the mount in the key id, "
                "and VAULT_NAMESPACE)"
            )
        elif status == 404:
            message = f"Vault has no key {ref.key_id} (deleted, or never created)"
        else:
            message = f"{said} ({ref.key_id})"
    code = "bad_response" if 200 <= status < 300 else f"http_{status}"
    return kind(operation, code, message)


def _kind(status: int, lowered: str) -> type[KmsError]:
    """Which error class an answer is, by message first and status second."""
    if status == 403 or "permission denied" in lowered:
        return KmsAccessDeniedError
    if any(marker in lowered for marker in _KEY_GONE) or status == 404:
        # A 404 is a key (or mount) path that does not exist; other paths never 404 here.
        return KeyUnavailableError
    client_error = status == 500 and any(marker in lowered for marker in _CLIENT_500)
    if status in _RETRIABLE_STATUS or 300 <= status < 400 or (status >= 500 and not client_error):
        return KmsUnavailableError
    return KmsRequestError


def translate_transport(operation: str, address: str, exc: BaseException) -> KmsError:
    """A request that got no HTTP answer: all retriable, with a hint where one helps."""
    detail = truncate(str(exc)) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return KmsUnavailableError(
            operation,
            "tls_error",
            f"the TLS certificate of {address} is not trusted ({detail}); set VAULT_CACERT "
            "or ENVPIPE_KMS_CA_BUNDLE to the CA that signed it",
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return KmsUnavailableError(
            operation,
            "tls_error",
            f"TLS with {address} failed ({detail}); check that VAULT_ADDR's scheme "
            "(http/https) matches the server",
        )
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return KmsUnavailableError(operation, "dns_error", f"cannot resolve {address}: {detail}")
    if isinstance(exc, TimeoutError):  # aiohttp's own timeouts derive from it
        return KmsUnavailableError(
            operation, "timeout", f"no answer from {address} within the timeout"
        )
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
        exc.os_error, ConnectionRefusedError
    ):
        return KmsUnavailableError(operation, "connection_refused", f"nothing listens at {address}")
    return KmsUnavailableError(operation, "connection_error", f"{address}: {detail}")
