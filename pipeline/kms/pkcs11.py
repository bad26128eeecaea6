"""`pipeline.types.Kms` on a PKCS#11 token (an HSM; SoftHSM2 in development) via python-pkcs11.

The byte layout is the contract's (docs/pkcs11.md): a DEK and an IV from `C_GenerateRandom`,
`wrapped` = IV (12) || `C_Encrypt(CKM_AES_GCM, KEK, DEK, AAD=C, 128-bit tag)` (SoftHSM2
cannot wrap with GCM, hence C_Encrypt); a signature is `CKM_ECDSA` over the 32-byte digest
(SoftHSM2 refuses the combined ECDSA-SHA256), r||s re-encoded as DER.

Sessions and threads: every call runs in a bounded pool (`kms_max_connections` threads),
never on the event loop; each thread opens its own session on first use and keeps it, the
token is logged in once, and calls into the module are serialised by a per-module lock,
because python-pkcs11 initialises modules without locking callbacks (`pkcs11_token`). Objects
are found by label on every call (well under a millisecond on SoftHSM2), so a re-labelled or
destroyed key is noticed at once and no handle cache can go stale.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, Session
from pkcs11.mechanisms import GCMParams
from pkcs11.types import DecryptMixin, EncryptMixin, Object, PublicKey, SignMixin
from pkcs11.util.ec import encode_ec_public_key

from pipeline.config import Settings
from pipeline.errors import ConfigError, KeyUnavailableError, KmsRequestError
from pipeline.kms.pkcs11_calls import TokenCalls
from pipeline.kms.pkcs11_keys import SIGNING, WRAPPING, KeyRef, Role, key_ref, token_from_key_ids
from pipeline.kms.pkcs11_token import TokenSessions, load_module, read_pin
from pipeline.types import ClosedOnExit, DataKey, EncryptionContext, Operation

__all__ = ["Pkcs11Kms"]

_log = logging.getLogger(__name__)

DEK_BYTES = 32
IV_BYTES = 12
TAG_BYTES = 16
WRAPPED_BYTES = IV_BYTES + DEK_BYTES + TAG_BYTES
DIGEST_BYTES = 32
_P256_COORDINATE = 32


@dataclass(frozen=True, slots=True)
class _Lookup:
    """One key to find on the token: its label (and id), class and type, and how messages
    name it. Found again on every call, so a destroyed or re-labelled key is noticed at once."""

    ref: KeyRef
    object_class: ObjectClass
    key_type: KeyType
    what: str

    def find(self, session: Session, sessions: TokenSessions, operation: str) -> Object:
        """The one object with this label, class and type; a lost login is repaired once."""
        template: dict[Attribute, Any] = {
            Attribute.CLASS: self.object_class,
            Attribute.KEY_TYPE: self.key_type,
            Attribute.LABEL: self.ref.label,
        }
        if self.ref.id is not None:
            template[Attribute.ID] = self.ref.id
        found = list(session.get_objects(template))
        if not found and sessions.ensure_login(session):
            _log.warning("PKCS#11 token %r had been logged out; logged in again", self.ref.token)
            found = list(session.get_objects(template))
        if not found:
            raise KeyUnavailableError(
                operation, "NoSuchKey", f"no {self.what} on token {self.ref.token!r}"
            )
        if len(found) > 1:
            raise KmsRequestError(
                operation,
                "MultipleObjectsReturned",
                f"{len(found)} objects match {self.what}; labels must be unique",
            )
        return found[0]

    def refused(self, operation: str, attribute: str) -> KmsRequestError:
        """The key exists but its attributes forbid this use."""
        return KmsRequestError(
            operation, "CKR_KEY_FUNCTION_NOT_PERMITTED", f"{self.what} does not allow {attribute}"
        )


class Pkcs11Kms(ClosedOnExit):
    """The `Kms` of one token. Create with `await Pkcs11Kms.open(settings)` (or `connect`).

    One process, one module configuration: python-pkcs11 initialises a module once per
    process and SoftHSM2 reads `SOFTHSM2_CONF` only then, so every `Pkcs11Kms` in a process
    (and every other python-pkcs11 user in it, tests included) must share one SOFTHSM2_CONF;
    a different one is a ConfigError. Closing the process's last session on a token logs the
    token out for the whole process, which the next call notices and repairs by logging in.
    """

    provider = "pkcs11"

    def __init__(self, sessions: TokenSessions, pool: ThreadPoolExecutor, max_sessions: int):
        """Wrap logged-in `sessions`, run on `pool`. Prefer `open` or `connect`."""
        self._sessions = sessions
        self._calls = TokenCalls(sessions, pool)
        self._max_sessions = max_sessions

    def __repr__(self) -> str:
        return (
            f"Pkcs11Kms(module={self._sessions.module.path!r}, token={self._sessions.label!r}, "
            f"max_sessions={self._max_sessions})"
        )

    @classmethod
    async def open(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> Pkcs11Kms:
        """Open the token `settings` name, with the PIN from ENVPIPE_PKCS11_PIN or _PIN_FILE.

        The token is ENVPIPE_PKCS11_TOKEN, else the `token=` of the configured key ids.
        `environ` (default os.environ) supplies SOFTHSM2_CONF, needed before the module loads.
        """
        environ = os.environ if environ is None else environ
        module = settings.pkcs11_module.strip()
        if not module:
            raise ConfigError(
                "ENVPIPE_PKCS11_MODULE",
                "not set; give the path of the PKCS#11 library "
                "(SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)",
            )
        pin, pin_setting = read_pin(settings.pkcs11_pin, settings.pkcs11_pin_file)
        token = settings.pkcs11_token or token_from_key_ids(
            settings.kms_key_id, settings.signing_key_id
        )
        return await cls.connect(
            module=module,
            token=token,
            pin=pin,
            pin_setting=pin_setting,
            max_sessions=settings.kms_max_connections,
            softhsm_conf=environ.get("SOFTHSM2_CONF") or None,
        )

    @classmethod
    async def connect(
        cls,
        *,
        module: str,
        token: str,
        pin: str,
        pin_setting: str = "ENVPIPE_PKCS11_PIN",
        max_sessions: int = 10,
        softhsm_conf: str | None = None,
    ) -> Pkcs11Kms:
        """Load `module`, find `token`, log in; the explicit-argument constructor.

        `pin_setting` is the setting a wrong PIN is reported against. Fails with ConfigError
        (module, token or PIN), or KmsUnavailableError if the token does not answer.
        """
        if max_sessions < 1:
            raise ConfigError("ENVPIPE_KMS_MAX_CONNECTIONS", "must be at least 1")
        pool = ThreadPoolExecutor(max_workers=max_sessions, thread_name_prefix="envpipe-pkcs11")
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(
                pool, load_module, module, softhsm_conf
            )
            kms = cls(TokenSessions(loaded, token, pin, pin_setting), pool, max_sessions)
            login = f"logging in to {token!r}"
            await kms._calls.run(Operation.RESOLVE, lambda _session: None, login)
        except BaseException:
            pool.shutdown(wait=False)
            raise
        _log.info(
            "PKCS#11 token %r open (module %s, up to %d sessions)", token, module, max_sessions
        )
        return kms

    async def close(self) -> None:
        """Wait for calls in flight, close every session, stop the pool. Idempotent."""
        await self._calls.close()

    # -- the five operations ------------------------------------------------------------

    async def resolve_wrapping_key(self, name: str) -> str:
        return await self._resolve(name, WRAPPING)

    async def resolve_signing_key(self, name: str) -> str:
        return await self._resolve(name, SIGNING)

    async def generate_data_key(self, key_id: str, context: EncryptionContext) -> DataKey:
        op = Operation.GENERATE_DATA_KEY
        lookup = self._lookup(key_id, WRAPPING, op)
        aad = context.encoded

        def work(session: Session) -> DataKey:
            kek = lookup.find(session, self._sessions, op)
            if not isinstance(kek, EncryptMixin):
                raise lookup.refused(op, "CKA_ENCRYPT")
            dek = session.generate_random(DEK_BYTES * 8)
            iv = session.generate_random(IV_BYTES * 8)
            sealed = kek.encrypt(
                dek, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad, TAG_BYTES * 8)
            )
            wrapped = iv + _as_bytes(sealed, op)
            if len(dek) != DEK_BYTES or len(wrapped) != WRAPPED_BYTES:
                raise KmsRequestError(op, "unexpected_length", "the token returned short output")
            return DataKey(key_id=lookup.ref.canonical, plaintext=dek, wrapped=wrapped)

        return await self._calls.run(op, work, f"wrapping under {lookup.ref.label!r}")

    async def unwrap(self, key_id: str, wrapped: bytes, context: EncryptionContext) -> bytes:
        op = Operation.UNWRAP
        lookup = self._lookup(key_id, WRAPPING, op)
        if len(wrapped) != WRAPPED_BYTES:
            raise KmsRequestError(
                op, "malformed_wrapped_key", f"{len(wrapped)} bytes, expected {WRAPPED_BYTES}"
            )
        params = GCMParams(wrapped[:IV_BYTES], context.encoded, TAG_BYTES * 8)

        def work(session: Session) -> bytes:
            kek = lookup.find(session, self._sessions, op)
            if not isinstance(kek, DecryptMixin):
                raise lookup.refused(op, "CKA_DECRYPT")
            dek = _as_bytes(
                kek.decrypt(
                    wrapped[IV_BYTES:], mechanism=Mechanism.AES_GCM, mechanism_param=params
                ),
                op,
            )
            if len(dek) != DEK_BYTES:
                raise KmsRequestError(op, "unexpected_length", "the unwrapped key is not 32 bytes")
            return dek

        return await self._calls.run(op, work, f"unwrapping under {lookup.ref.label!r}")

    async def sign(self, key_id: str, message: bytes, digest: bytes) -> bytes:
        op = Operation.SIGN
        lookup = self._lookup(key_id, SIGNING, op)
        if len(digest) != DIGEST_BYTES:
            raise KmsRequestError(op, "bad_digest", f"the digest is {len(digest)} bytes, not 32")

        def work(session: Session) -> bytes:
            key = lookup.find(session, self._sessions, op)
            if not isinstance(key, SignMixin):
                raise lookup.refused(op, "CKA_SIGN")
            return key.sign(digest, mechanism=Mechanism.ECDSA)

        raw = await self._calls.run(op, work, f"signing with {lookup.ref.label!r}")
        if len(raw) != 2 * _P256_COORDINATE:
            raise KmsRequestError(op, "not_p256", f"{lookup.what} is not an EC P-256 key")
        r = int.from_bytes(raw[:_P256_COORDINATE], "big")
        s = int.from_bytes(raw[_P256_COORDINATE:], "big")
        return encode_dss_signature(r, s)

    async def get_public_key(self, key_id: str) -> bytes:
        op = Operation.PUBLIC_KEY
        signing = self._lookup(key_id, SIGNING, op)
        lookup = _Lookup(signing.ref, ObjectClass.PUBLIC_KEY, KeyType.EC, "public key")

        def work(session: Session) -> bytes:
            key = lookup.find(session, self._sessions, op)
            if not isinstance(key, PublicKey):
                raise KmsRequestError(op, "not_public_key", "the object is not a public key")
            return encode_ec_public_key(key)

        der = await self._calls.run(op, work, f"reading the public key {lookup.ref.label!r}")
        try:
            public = load_der_public_key(der)
        except (ValueError, TypeError) as exc:
            raise KmsRequestError(
                op, "invalid_public_key", "the token's EC point is invalid"
            ) from exc
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
            raise KmsRequestError(op, "not_p256", f"{lookup.ref.label!r} is not an EC P-256 key")
        return public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    # -- plumbing -------------------------------------------------------------------------

    async def _resolve(self, name: str, role: Role) -> str:
        lookup = self._lookup(name, role, Operation.RESOLVE)

        def work(session: Session) -> str:
            lookup.find(session, self._sessions, Operation.RESOLVE)
            return lookup.ref.canonical

        return await self._calls.run(Operation.RESOLVE, work, f"looking up {lookup.ref.label!r}")

    def _lookup(self, name: str, role: Role, operation: str) -> _Lookup:
        ref = key_ref(name, role, self._sessions.label, operation)
        return _Lookup(ref, role.object_class, role.key_type, role.describe(ref))


def _as_bytes(value: bytes | object, operation: str) -> bytes:
    """python-pkcs11 returns bytes for bytes input; anything else is a bug worth naming."""
    if not isinstance(value, bytes):
        raise KmsRequestError(operation, "unexpected_output", type(value).__name__)
    return value
