"""An in-memory KMS for unit tests of pure logic: real cryptography, no network, no emulator.

Data keys are really wrapped (AES-256-GCM, with the context bytes C as AAD) and headers really
signed (ECDSA P-256 over the given SHA-256 digest), so a wrong context, a wrong key or a
tampered blob fail the way they do against a real service. `latency` and `fail_with` /
`fail_ops` let cache tests simulate a slow or failing service; `point_alias`, `disable` and
`destroy` model rotation and crypto-shredding. Not for production: key material lives in
process memory. Ids look like AWS ARNs, so the allowlist rules are exercised as for aws.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.errors import KeyUnavailableError, KmsError, KmsRequestError
from pipeline.types import ClosedOnExit, DataKey, EncryptionContext, Operation

__all__ = ["ARN_PREFIX", "InMemoryKms"]

ARN_PREFIX = "arn:aws:kms:us-east-1:111122223333:"

_M = TypeVar("_M")

_KEY_ID_BYTES = 16  # wrapped blob = key uuid (16) || nonce (12) || AES-GCM(DEK) with tag
_NONCE_BYTES = 12
_PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


@dataclass(slots=True)
class _Key:
    uuid: uuid.UUID
    kek: bytes | None = field(default=None, repr=False)
    signer: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    enabled: bool = True

    @property
    def arn(self) -> str:
        return f"{ARN_PREFIX}key/{self.uuid}"


class InMemoryKms(ClosedOnExit):
    """`pipeline.types.Kms` in process memory, with fault and latency injection.

    `latency` seconds are slept before every call (0 still yields to the loop). A failure in
    `fail_ops[operation]` (`pipeline.types.Operation` values) or else `fail_with` is raised
    instead of performing the call.
    """

    provider = "memory"

    def __init__(self, *, latency: float = 0.0, fail_with: KmsError | None = None) -> None:
        self.latency = latency
        self.fail_with = fail_with
        self.fail_ops: dict[str, KmsError] = {}
        self.closed = False
        # Every accepted spelling (key id, key ARN, alias, alias ARN) → key, as KMS accepts.
        self._keys: dict[str, _Key] = {}

    def create_key(self, alias: str | None = None) -> str:
        """A symmetric wrapping key; returns its ARN."""
        return self._add(_Key(uuid.uuid4(), kek=AESGCM.generate_key(bit_length=256)), alias)

    def create_signing_key(self, alias: str | None = None) -> str:
        """An ECDSA P-256 signing key; returns its ARN."""
        return self._add(_Key(uuid.uuid4(), signer=ec.generate_private_key(ec.SECP256R1())), alias)

    def point_alias(self, alias: str, arn: str) -> None:
        """Re-point an alias at another key (rotation by alias)."""
        self._keys[alias] = self._keys[ARN_PREFIX + alias] = self._keys[arn]

    def disable(self, arn: str) -> None:
        """Switch a key off: every use is then `KeyUnavailableError`, as a disabled KMS key."""
        self._keys[arn].enabled = False

    def destroy(self, arn: str) -> None:
        """Forget a key and every name of it (crypto-shredding)."""
        key = self._keys[arn]
        for name in [name for name, found in self._keys.items() if found is key]:
            del self._keys[name]

    def _add(self, key: _Key, alias: str | None) -> str:
        names = [str(key.uuid), key.arn]
        if alias is not None:
            if not alias.startswith("alias/") or alias in self._keys:
                raise ValueError(f"alias must start with 'alias/' and be unused: {alias!r}")
            names += [alias, ARN_PREFIX + alias]
        self._keys.update(dict.fromkeys(names, key))
        return key.arn

    async def generate_data_key(self, key_id: str, context: EncryptionContext) -> DataKey:
        """A fresh 32-byte DEK wrapped under `key_id` with C as AAD."""
        key = await self._enter(Operation.GENERATE_DATA_KEY, key_id)
        kek = self._require(key.kek, Operation.GENERATE_DATA_KEY)
        dek = os.urandom(32)
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(kek).encrypt(nonce, dek, context.encoded)
        return DataKey(key_id=key.arn, plaintext=dek, wrapped=key.uuid.bytes + nonce + sealed)

    async def unwrap(self, key_id: str, wrapped: bytes, context: EncryptionContext) -> bytes:
        """Unwrap; a blob of another key, a wrong context or any tampering is refused."""
        key = await self._enter(Operation.UNWRAP, key_id)
        kek = self._require(key.kek, Operation.UNWRAP)
        head, nonce, sealed = (
            wrapped[:_KEY_ID_BYTES],
            wrapped[_KEY_ID_BYTES : _KEY_ID_BYTES + _NONCE_BYTES],
            wrapped[_KEY_ID_BYTES + _NONCE_BYTES :],
        )
        if len(head) == _KEY_ID_BYTES and head != key.uuid.bytes:
            raise KmsRequestError(
                Operation.UNWRAP, "IncorrectKeyException", "blob names another key"
            )
        try:
            return AESGCM(kek).decrypt(nonce, sealed, context.encoded)
        except (InvalidTag, ValueError) as exc:
            raise KmsRequestError(Operation.UNWRAP, "InvalidCiphertextException") from exc

    async def sign(self, key_id: str, message: bytes, digest: bytes) -> bytes:
        """ECDSA P-256 over the SHA-256 digest; DER signature."""
        key = await self._enter(Operation.SIGN, key_id)
        signer = self._require(key.signer, Operation.SIGN)
        return signer.sign(digest, _PREHASHED)

    async def get_public_key(self, key_id: str) -> bytes:
        """DER SubjectPublicKeyInfo of a signing key."""
        key = await self._enter(Operation.PUBLIC_KEY, key_id)
        if key.signer is None:
            raise KmsRequestError(Operation.PUBLIC_KEY, "UnsupportedOperationException")
        return key.signer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    async def resolve_wrapping_key(self, name: str) -> str:
        """The key's ARN for any accepted spelling."""
        return (await self._enter(Operation.RESOLVE, name)).arn

    async def resolve_signing_key(self, name: str) -> str:
        """The key's ARN for any accepted spelling."""
        return (await self._enter(Operation.RESOLVE, name)).arn

    async def close(self) -> None:
        """Mark closed; later calls fail like a closed client. Idempotent."""
        self.closed = True

    async def _enter(self, operation: Operation, key_id: str) -> _Key:
        """The common prologue: latency, injected failure, closed check, key lookup."""
        await asyncio.sleep(self.latency)
        failure = self.fail_ops.get(operation, self.fail_with)
        if failure is not None:
            raise failure.with_traceback(None)  # one instance may be raised many times
        if self.closed:
            raise KmsRequestError(operation, "ClientClosed", "InMemoryKms.close() was called")
        key = self._keys.get(key_id)
        if key is None:
            raise KeyUnavailableError(operation, "NotFoundException", f"key {key_id!r} not found")
        if not key.enabled:
            raise KeyUnavailableError(operation, "DisabledException", f"{key.arn} is disabled")
        return key

    @staticmethod
    def _require(material: _M | None, operation: Operation) -> _M:
        """The key's material for this operation, or KMS's InvalidKeyUsageException."""
        if material is None:
            raise KmsRequestError(operation, "InvalidKeyUsageException")
        return material
