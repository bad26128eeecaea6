"""Vault / OpenBao transit through aiohttp: one pooled session, errors translated by message.

The five operations map to transit's HTTP API (docs/vault.md has the policy for each):

    generate_data_key  GET keys/<name> (it exists, aes256-gcm96), POST encrypt/<name>
    unwrap             POST decrypt/<name>
    sign               POST sign/<name>/sha2-256 (prehashed, asn1, key_version)
    get_public_key     GET keys/<name>, the PEM of the named version (read at most every
                       few seconds per key for an unknown version: `vault_versions`)
    resolve_*          GET keys/<name> (signing: latest_version)

generate_data_key reads the key first because transit's encrypt *creates* a missing key when
the token may: a crypto-shredded tenant key would silently come back to life. The DEK is made
here from the OS CSPRNG, so Vault's datakey endpoint (and its policy) is never needed.

Vault reports many client errors as 400 and some as 500 (a key version above the latest), and
an expired token as a plain 403, so errors are classified by message first, status second.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import ssl
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import aiohttp
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from pipeline.config import Settings
from pipeline.errors import ConfigError, KeyUnavailableError, KmsRequestError
from pipeline.kms.vault_env import connection_settings
from pipeline.kms.vault_errors import (
    DecodedResponse,
    classify_response,
    translate_transport,
    truncate,
)
from pipeline.kms.vault_ids import VaultKeyRef, parse_key_id
from pipeline.kms.vault_token import TokenRenewer, TokenSource
from pipeline.kms.vault_versions import SigningVersions
from pipeline.types import DataKey, EncryptionContext, Operation

__all__ = ["VaultKms"]

_log = logging.getLogger(__name__)

WRAPPING_TYPE = "aes256-gcm96"
SIGNING_TYPE = "ecdsa-p256"
DEK_BYTES = 32
_KMS_KEY_SETTING = "ENVPIPE_KMS_KEY_ID"
_SIGNING_KEY_SETTING = "ENVPIPE_SIGNING_KEY_ID"
_CAPABILITY = {"GET": "read", "POST": "update", "DELETE": "delete"}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class VaultKms:
    """`pipeline.types.Kms` on Vault or OpenBao transit.

    Create it once per process with `await VaultKms.open(settings)` (reads VAULT_ADDR, the
    token, namespace and CA from the environment) or `await VaultKms.connect(...)`; `close()`
    at shutdown.
    """

    provider = "vault"

    def __init__(
        self,
        address: str,
        session: aiohttp.ClientSession,
        token: TokenSource,
        namespace: str = "",
    ) -> None:
        """Wrap an open session. Prefer `open` or `connect`, which also start token renewal."""
        self._base = address.rstrip("/") + "/v1/"
        self._session: aiohttp.ClientSession | None = session
        self._token = token
        self._namespace = namespace
        self._renewer: TokenRenewer | None = None
        self._signing_versions = SigningVersions(self._key)

    @classmethod
    async def open(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> Self:
        """The process's client, configured as an operator would: from the environment.

        Reads VAULT_ADDR / BAO_ADDR, VAULT_TOKEN / BAO_TOKEN or ENVPIPE_VAULT_TOKEN_FILE,
        VAULT_NAMESPACE / BAO_NAMESPACE, and the CA (ENVPIPE_KMS_CA_BUNDLE, VAULT_CACERT,
        BAO_CACERT, VAULT_CAPATH), plus the kms_* settings. ConfigError names what is missing.
        """
        conn = connection_settings(settings, os.environ if environ is None else environ)
        return await cls.connect(
            conn.address,
            conn.token,
            namespace=conn.namespace,
            ssl_context=conn.ssl_context,
            max_connections=settings.kms_max_connections,
        )

    @classmethod
    async def connect(
        cls,
        address: str,
        token: TokenSource | str,
        *,
        namespace: str = "",
        ssl_context: ssl.SSLContext | bool = True,
        max_connections: int = 10,
        connect_timeout: float = 2.0,
        total_timeout: float = 5.0,
        renew: bool = True,
    ) -> Self:
        """A client with explicit arguments (tests, embedding). Must run inside the event loop.

        `ssl_context` True verifies with the system CAs, False does not verify. With `renew`
        the token is looked up now and, if renewable, renewed in the background.
        """
        source = (
            token
            if isinstance(token, TokenSource)
            else TokenSource.fixed(token, "the token given to VaultKms.connect")
        )
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, ssl=ssl_context),
            timeout=aiohttp.ClientTimeout(
                # Not `connect`: it would count the wait for a pooled connection too.
                total=total_timeout,
                sock_connect=connect_timeout,
            ),
            headers={"X-Vault-Request": "true"},
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
        )
        kms = cls(address, session, source, namespace)
        if renew:
            kms._renewer = TokenRenewer(source, kms._token_request)
            try:
                await kms._renewer.start()
            except BaseException:
                await kms.close()
                raise
        return kms

    async def close(self) -> None:
        """Stop token renewal and close the connection pool. Idempotent."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            await renewer.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return (
            f"VaultKms({self._base[:-4]!r}, namespace={self._namespace!r}, token={self._token!r})"
        )

    # -- the five operations ------------------------------------------------------------------

    async def generate_data_key(self, key_id: str, context: EncryptionContext) -> DataKey:
        """A DEK from the OS CSPRNG, encrypted by transit with C as associated_data."""
        operation = Operation.GENERATE_DATA_KEY
        ref = _ref(operation, key_id, version=False)
        await self._wrapping_key(operation, ref)
        dek = os.urandom(DEK_BYTES)
        body = await self._request(
            operation,
            "POST",
            ref.path("encrypt"),
            {"plaintext": _b64(dek), "associated_data": _b64(context.encoded)},
            ref=ref,
        )
        ciphertext = _field(operation, body, "ciphertext")
        if not ciphertext.startswith("vault:v"):
            raise KmsRequestError(
                operation, "bad_response", "encrypt returned no vault:vN: ciphertext"
            )
        return DataKey(key_id=ref.key_id, plaintext=dek, wrapped=ciphertext.encode("ascii"))

    async def unwrap(self, key_id: str, wrapped: bytes, context: EncryptionContext) -> bytes:
        """Transit decrypt with C as associated_data; a wrong C fails the AEAD tag in Vault."""
        operation = Operation.UNWRAP
        ref = _ref(operation, key_id, version=False)
        try:
            ciphertext = wrapped.decode("ascii")
        except UnicodeDecodeError:
            ciphertext = ""
        if not ciphertext.startswith("vault:v"):
            raise KmsRequestError(operation, "malformed_ciphertext", "not a vault:vN: ciphertext")
        body = await self._request(
            operation,
            "POST",
            ref.path("decrypt"),
            {"ciphertext": ciphertext, "associated_data": _b64(context.encoded)},
            ref=ref,
        )
        try:
            dek = base64.b64decode(_field(operation, body, "plaintext"), validate=True)
        except binascii.Error:
            dek = b""
        if len(dek) != DEK_BYTES:
            raise KmsRequestError(
                operation, "bad_plaintext", f"the unwrapped key is not {DEK_BYTES} bytes"
            )
        return dek

    async def sign(self, key_id: str, message: bytes, digest: bytes) -> bytes:
        """Transit sign over the prehashed SHA-256, with the version named in `key_id`."""
        operation = Operation.SIGN
        ref = _ref(operation, key_id, version=True)
        if len(digest) != 32:
            raise KmsRequestError(operation, "bad_digest", "the digest must be a 32-byte SHA-256")
        body = await self._request(
            operation,
            "POST",
            ref.path("sign", "sha2-256"),
            {
                "input": _b64(digest),
                "prehashed": True,
                "marshaling_algorithm": "asn1",
                "key_version": ref.version,
            },
            ref=ref,
        )
        prefix, _, encoded = _field(operation, body, "signature").rpartition(":")
        if prefix != f"vault:v{ref.version}":
            raise KmsRequestError(
                operation,
                "version_mismatch",
                f"Vault did not sign with version {ref.version} of {ref.key_id}",
            )
        try:
            signature = base64.b64decode(encoded, validate=True)
            decode_dss_signature(signature)
        except (binascii.Error, ValueError) as exc:
            raise KmsRequestError(operation, "bad_response", "the signature is not DER") from exc
        return signature

    async def get_public_key(self, key_id: str) -> bytes:
        """The DER SubjectPublicKeyInfo of the version in `key_id`; KeyUnavailable if absent."""
        operation = Operation.PUBLIC_KEY
        ref = _ref(operation, key_id, version=True)
        data = await self._signing_versions.get(operation, ref)
        if data.get("type") != SIGNING_TYPE:
            raise KmsRequestError(
                operation,
                "wrong_key_type",
                f"{ref.key_id} is a {data.get('type')} key, not {SIGNING_TYPE}",
            )
        versions = data.get("keys") or {}
        entry = versions.get(str(ref.version))
        if not isinstance(entry, Mapping) or not entry.get("public_key"):
            raise KeyUnavailableError(
                operation,
                "unknown_version",
                f"{ref.key_id} has no version {ref.version} (latest: "
                f"{data.get('latest_version')}; versions below min_decryption_version are "
                "archived)",
            )
        try:
            public = serialization.load_pem_public_key(str(entry["public_key"]).encode())
        except ValueError as exc:
            raise KmsRequestError(operation, "bad_response", "the public key is not PEM") from exc
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
            raise KmsRequestError(operation, "wrong_key_type", f"{ref.canonical} is not EC P-256")
        return public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    async def resolve_wrapping_key(self, name: str) -> str:
        """`vault:<mount>:<name>`, after checking the key exists and is aes256-gcm96."""
        try:
            ref = parse_key_id(name, version=False)
        except ValueError as exc:
            raise ConfigError(_KMS_KEY_SETTING, str(exc)) from None
        problem = await self._wrapping_key(Operation.RESOLVE, ref, raise_type=False)
        if problem:
            raise ConfigError(_KMS_KEY_SETTING, problem)
        return ref.key_id

    async def resolve_signing_key(self, name: str) -> str:
        """`vault:<mount>:<name>:<latest_version>` (one GET); a versioned id is returned as is."""
        try:
            ref = parse_key_id(name, version=None)
        except ValueError as exc:
            raise ConfigError(_SIGNING_KEY_SETTING, str(exc)) from None
        if ref.version is not None:
            return ref.canonical
        data = await self._key(Operation.RESOLVE, ref)
        self._signing_versions.remember(ref, data)  # so the writer's check needs no read
        if data.get("type") != SIGNING_TYPE:
            raise ConfigError(
                _SIGNING_KEY_SETTING,
                f"{ref.key_id} is a {data.get('type')} key; the signing key must be "
                f"{SIGNING_TYPE} (ECDSA P-256)",
            )
        latest = data.get("latest_version")
        if not isinstance(latest, int) or latest < 1:
            raise KmsRequestError(
                Operation.RESOLVE, "bad_response", f"{ref.key_id} has no latest_version"
            )
        return ref.at(latest).canonical

    # -- helpers --------------------------------------------------------------------------------

    async def _token_request(self, method: str, path: str, token: str) -> Mapping[str, Any]:
        """lookup-self / renew-self for `TokenRenewer`, with the token it is looking at."""
        return await self._request("token_renewal", method, path, None, token=token)

    async def _key(self, operation: str, ref: VaultKeyRef) -> Mapping[str, Any]:
        """GET keys/<name>: the key's metadata (a 404 means it does not exist)."""
        body = await self._request(operation, "GET", ref.path("keys"), None, ref=ref)
        data = body.get("data")
        if not isinstance(data, Mapping):
            raise KmsRequestError(operation, "bad_response", f"no key data for {ref.key_id}")
        return data

    async def _wrapping_key(
        self, operation: str, ref: VaultKeyRef, *, raise_type: bool = True
    ) -> str:
        """Check the key exists and suits wrapping; returns (or raises) what is wrong."""
        data = await self._key(operation, ref)
        problem = ""
        if data.get("type") != WRAPPING_TYPE:
            problem = (
                f"{ref.key_id} is a {data.get('type')} key; the wrapping key must be "
                f"{WRAPPING_TYPE} (an AEAD type, so associated_data binds the encryption context)"
            )
        elif data.get("derived"):
            problem = f"{ref.key_id} uses key derivation (derived=true), which envpipe does not use"
        if problem and raise_type:
            raise KmsRequestError(operation, "wrong_key_type", problem)
        return problem

    async def _request(
        self,
        operation: str,
        method: str,
        path: str,
        payload: Mapping[str, object] | None,
        *,
        ref: VaultKeyRef | None = None,
        token: str | None = None,
    ) -> Mapping[str, Any]:
        """One API call; every failure becomes a KmsError naming `path` and never the token."""
        session = self._session
        if session is None:
            raise KmsRequestError(operation, "client_closed", "VaultKms.close() was called")
        headers = {"X-Vault-Token": token if token is not None else self._token.current()}
        if self._namespace:
            headers["X-Vault-Namespace"] = self._namespace
        try:
            # No redirects: following one would hand the token to whatever host it names.
            async with session.request(
                method, self._base + path, json=payload, headers=headers, allow_redirects=False
            ) as response:
                status, raw = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise translate_transport(operation, self._base[:-4], exc) from exc
        decoded = DecodedResponse.parse(status, raw)
        if 200 <= status < 300 and decoded.body is not None:
            return decoded.body
        raise classify_response(
            operation,
            decoded,
            path=path,
            capability=_CAPABILITY.get(method, method.lower()),
            token_origin=self._token.origin,
            ref=ref,
        )


def _ref(operation: str, key_id: str, *, version: bool) -> VaultKeyRef:
    """Parse an id given at call time: a bad one is a refused request, not a config error."""
    try:
        return parse_key_id(key_id, version=version)
    except ValueError as exc:
        raise KmsRequestError(operation, "invalid_key_id", truncate(str(exc))) from None


def _field(operation: str, body: Mapping[str, Any], name: str) -> str:
    data = body.get("data")
    value = data.get(name) if isinstance(data, Mapping) else None
    if not isinstance(value, str):
        raise KmsRequestError(operation, "bad_response", f"Vault's answer has no data.{name}")
    return value
