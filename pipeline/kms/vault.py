"""Vault / OpenBao transit: `VaultKms`, which calls go out, in which order, and its lifecycle.

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

Three rooms: this module orchestrates; `vault_http` owns the session, the token header and
its renewal (the only code that holds the token); `vault_transit` owns the message formats
(what goes into a body, what an answer must hold), without IO.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Any, Self

import aiohttp

from pipeline.config import Settings
from pipeline.errors import ConfigError, KmsRequestError
from pipeline.kms import vault_transit as transit
from pipeline.kms.vault_env import connection_settings
from pipeline.kms.vault_errors import truncate
from pipeline.kms.vault_http import VaultHttp, new_session
from pipeline.kms.vault_ids import VaultKeyRef, parse_key_id
from pipeline.kms.vault_token import TokenSource
from pipeline.kms.vault_transit import DEK_BYTES, SIGNING_TYPE, WRAPPING_TYPE
from pipeline.kms.vault_versions import SigningVersions
from pipeline.types import ClosedOnExit, DataKey, EncryptionContext, Operation

# The key types and the DEK size are transit's facts; still importable from here.
__all__ = ["DEK_BYTES", "SIGNING_TYPE", "WRAPPING_TYPE", "VaultKms"]

_KMS_KEY_SETTING = "ENVPIPE_KMS_KEY_ID"
_SIGNING_KEY_SETTING = "ENVPIPE_SIGNING_KEY_ID"


class VaultKms(ClosedOnExit):
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
        self._http = VaultHttp(address, session, token, namespace)
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
        session = new_session(
            ssl_context=ssl_context,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            total_timeout=total_timeout,
        )
        kms = cls(address, session, source, namespace)
        if renew:
            try:
                await kms._http.start_renewal()
            except BaseException:
                await kms.close()
                raise
        return kms

    async def close(self) -> None:
        """Stop token renewal and close the connection pool. Idempotent."""
        await self._http.close()

    def __repr__(self) -> str:
        http = self._http
        return f"VaultKms({http.address!r}, namespace={http.namespace!r}, token={http.token!r})"

    # -- the five operations ------------------------------------------------------------------

    async def generate_data_key(self, key_id: str, context: EncryptionContext) -> DataKey:
        """A DEK from the OS CSPRNG, encrypted by transit with C as associated_data."""
        operation = Operation.GENERATE_DATA_KEY
        ref = _ref(operation, key_id, version=False)
        await self._wrapping_key(operation, ref)
        dek = os.urandom(DEK_BYTES)
        body = await self._http.request(
            operation, "POST", ref.path("encrypt"), transit.encrypt_body(dek, context), ref=ref
        )
        wrapped = transit.wrapped_ciphertext(operation, body)
        return DataKey(key_id=ref.key_id, plaintext=dek, wrapped=wrapped)

    async def unwrap(self, key_id: str, wrapped: bytes, context: EncryptionContext) -> bytes:
        """Transit decrypt with C as associated_data; a wrong C fails the AEAD tag in Vault."""
        operation = Operation.UNWRAP
        ref = _ref(operation, key_id, version=False)
        payload = transit.decrypt_body(operation, wrapped, context)
        body = await self._http.request(operation, "POST", ref.path("decrypt"), payload, ref=ref)
        return transit.unwrapped_dek(operation, body)

    async def sign(self, key_id: str, message: bytes, digest: bytes) -> bytes:
        """Transit sign over the prehashed SHA-256, with the version named in `key_id`."""
        operation = Operation.SIGN
        ref = _ref(operation, key_id, version=True)
        payload = transit.sign_body(operation, digest, ref)
        path = ref.path("sign", "sha2-256")
        body = await self._http.request(operation, "POST", path, payload, ref=ref)
        return transit.signature_der(operation, body, ref)

    async def get_public_key(self, key_id: str) -> bytes:
        """The DER SubjectPublicKeyInfo of the version in `key_id`; KeyUnavailable if absent."""
        operation = Operation.PUBLIC_KEY
        ref = _ref(operation, key_id, version=True)
        data = await self._signing_versions.get(operation, ref)
        return transit.public_key_der(operation, ref, data)

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
        if problem := transit.signing_key_problem(ref, data):
            raise ConfigError(_SIGNING_KEY_SETTING, problem)
        return ref.at(transit.latest_version(Operation.RESOLVE, ref, data)).canonical

    # -- helpers --------------------------------------------------------------------------------

    async def _key(self, operation: str, ref: VaultKeyRef) -> Mapping[str, Any]:
        """GET keys/<name>: the key's metadata (a 404 means it does not exist)."""
        body = await self._http.request(operation, "GET", ref.path("keys"), None, ref=ref)
        return transit.key_data(operation, ref, body)

    async def _wrapping_key(
        self, operation: str, ref: VaultKeyRef, *, raise_type: bool = True
    ) -> str:
        """Check the key exists and suits wrapping; returns (or raises) what is wrong."""
        problem = transit.wrapping_key_problem(ref, await self._key(operation, ref))
        if problem and raise_type:
            raise KmsRequestError(operation, "wrong_key_type", problem)
        return problem


def _ref(operation: str, key_id: str, *, version: bool) -> VaultKeyRef:
    """Parse an id given at call time: a bad one is a refused request, not a config error."""
    try:
        return parse_key_id(key_id, version=version)
    except ValueError as exc:
        raise KmsRequestError(operation, "invalid_key_id", truncate(str(exc))) from None
