"""An in-memory KMS for unit tests of pure logic: real cryptography, no network, no emulator.

Data keys are really wrapped (AES-256-GCM, encryption context as AAD) and headers really
signed (ECDSA P-256), so a wrong context, a wrong key or a tampered blob fail the way they do
against AWS KMS. `latency` and `fail_with`/`fail_ops` let cache tests simulate a slow or
failing KMS. Not for production: key material lives in process memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.errors import KmsError, KmsRequestError
from pipeline.types import DataKey

__all__ = ["ARN_PREFIX", "InMemoryKms"]

ARN_PREFIX = "arn:aws:kms:us-east-1:111122223333:"

_M = TypeVar("_M")

_KEY_ID_BYTES = 16  # wrapped blob = key uuid (16) || nonce (12) || AES-GCM(DEK) with tag
_NONCE_BYTES = 12
_MAX_SIGN_MESSAGE = 4096  # KMS's limit for MessageType=RAW


@dataclass(frozen=True, slots=True)
class _Key:
    uuid: uuid.UUID
    kek: bytes | None = field(default=None, repr=False)
    signer: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)

    @property
    def arn(self) -> str:
        return f"{ARN_PREFIX}key/{self.uuid}"


class InMemoryKms:
    """`pipeline.types.Kms` in process memory, with fault and latency injection.

    `latency` seconds are slept before every call (0 still yields to the loop). A failure in
    `fail_ops[operation]` (KMS API names: "GenerateDataKey", "Decrypt", "Sign", "GetPublicKey",
    "DescribeKey") or else `fail_with` is raised instead of performing the call.
    """

    def __init__(self, *, latency: float = 0.0, fail_with: KmsError | None = None) -> None:
        self.latency = latency
        self.fail_with = fail_with
        self.fail_ops: dict[str, KmsError] = {}
        self.closed = False
        # Every accepted spelling (key id, key ARN, alias, alias ARN) → key, as KMS accepts.
        self._keys: dict[str, _Key] = {}

    def create_key(self, alias: str | None = None) -> str:
        """A symmetric ENCRYPT_DECRYPT key; returns its ARN."""
        return self._add(_Key(uuid.uuid4(), kek=AESGCM.generate_key(bit_length=256)), alias)

    def create_signing_key(self, alias: str | None = None) -> str:
        """An ECC_NIST_P256 SIGN_VERIFY key; returns its ARN."""
        return self._add(_Key(uuid.uuid4(), signer=ec.generate_private_key(ec.SECP256R1())), alias)

    def _add(self, key: _Key, alias: str | None) -> str:
        names = [str(key.uuid), key.arn]
        if alias is not None:
            if not alias.startswith("alias/") or alias in self._keys:
                raise ValueError(f"alias must start with 'alias/' and be unused: {alias!r}")
            names += [alias, ARN_PREFIX + alias]
        self._keys.update(dict.fromkeys(names, key))
        return key.arn

    async def generate_data_key(self, key_id: str, context: Mapping[str, str]) -> DataKey:
        """A fresh 32-byte DEK wrapped under `key_id` with `context` as AAD."""
        key = await self._enter("GenerateDataKey", key_id)
        kek = self._require(key.kek, "GenerateDataKey")
        dek = os.urandom(32)
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(kek).encrypt(nonce, dek, _aad(context))
        return DataKey(key_id=key.arn, plaintext=dek, wrapped=key.uuid.bytes + nonce + sealed)

    async def decrypt(self, key_id: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        """Unwrap; a blob of another key, a wrong context or any tampering is refused."""
        key = await self._enter("Decrypt", key_id)
        kek = self._require(key.kek, "Decrypt")
        head, nonce, sealed = (
            wrapped[:_KEY_ID_BYTES],
            wrapped[_KEY_ID_BYTES : _KEY_ID_BYTES + _NONCE_BYTES],
            wrapped[_KEY_ID_BYTES + _NONCE_BYTES :],
        )
        if len(head) == _KEY_ID_BYTES and head != key.uuid.bytes:
            raise KmsRequestError("Decrypt", "IncorrectKeyException", "blob names another key")
        try:
            return AESGCM(kek).decrypt(nonce, sealed, _aad(context))
        except (InvalidTag, ValueError) as exc:
            raise KmsRequestError("Decrypt", "InvalidCiphertextException") from exc

    async def sign(self, key_id: str, message: bytes) -> bytes:
        """ECDSA_SHA_256 over the raw message; DER signature."""
        key = await self._enter("Sign", key_id)
        signer = self._require(key.signer, "Sign")
        if len(message) > _MAX_SIGN_MESSAGE:
            raise KmsRequestError("Sign", "ValidationException", "message longer than 4096 bytes")
        return signer.sign(message, ec.ECDSA(hashes.SHA256()))

    async def get_public_key(self, key_id: str) -> bytes:
        """DER SubjectPublicKeyInfo of a signing key."""
        key = await self._enter("GetPublicKey", key_id)
        if key.signer is None:
            raise KmsRequestError("GetPublicKey", "UnsupportedOperationException")
        return key.signer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    async def resolve_key_id(self, key_id: str) -> str:
        """The key's ARN for any accepted spelling."""
        return (await self._enter("DescribeKey", key_id)).arn

    async def close(self) -> None:
        """Mark closed; later calls fail like a closed `AwsKms`. Idempotent."""
        self.closed = True

    async def _enter(self, operation: str, key_id: str) -> _Key:
        """The common prologue: latency, injected failure, closed check, key lookup."""
        await asyncio.sleep(self.latency)
        failure = self.fail_ops.get(operation, self.fail_with)
        if failure is not None:
            raise failure.with_traceback(None)  # one instance may be raised many times
        if self.closed:
            raise KmsRequestError(operation, "ClientClosed", "InMemoryKms.close() was called")
        key = self._keys.get(key_id)
        if key is None:
            raise KmsRequestError(operation, "NotFoundException", f"key {key_id!r} not found")
        return key

    @staticmethod
    def _require(material: _M | None, operation: str) -> _M:
        """The key's material for this operation, or KMS's InvalidKeyUsageException."""
        if material is None:
            raise KmsRequestError(operation, "InvalidKeyUsageException")
        return material


def _aad(context: Mapping[str, str]) -> bytes:
    """Canonical encryption context: key order must not matter, any change must."""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode()
