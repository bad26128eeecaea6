"""The interfaces, in one place: what the core needs from a KMS.

Implementations live in `pipeline.kms` (aiobotocore for AWS KMS, an in-memory one for unit
tests). The core only ever sees key *identifiers* and, briefly, plaintext data keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class DataKey:
    """A freshly generated data key: the plaintext for local use, the blob for the envelope."""

    key_id: str  # canonical id (ARN) of the wrapping key, as the KMS reports it
    plaintext: bytes = field(repr=False)
    wrapped: bytes


@runtime_checkable
class Kms(Protocol):
    """The four KMS operations envpipe needs, plus alias resolution.

    Errors are translated at the boundary: implementations raise `KmsUnavailableError`
    (retriable) or `KmsRequestError` (not), never a foreign exception type.
    """

    async def generate_data_key(self, key_id: str, context: Mapping[str, str]) -> DataKey:
        """GenerateDataKey(KeySpec=AES_256) bound to the encryption context."""
        ...

    async def decrypt(self, key_id: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        """Decrypt a wrapped DEK under `key_id`, with the context it was wrapped with."""
        ...

    async def sign(self, key_id: str, message: bytes) -> bytes:
        """Sign(MessageType=RAW, SigningAlgorithm=ECDSA_SHA_256); returns the DER signature."""
        ...

    async def get_public_key(self, key_id: str) -> bytes:
        """GetPublicKey: the DER SubjectPublicKeyInfo of an asymmetric key."""
        ...

    async def resolve_key_id(self, key_id: str) -> str:
        """DescribeKey: the canonical ARN for an alias, key id or ARN."""
        ...

    async def close(self) -> None:
        """Release connections. Idempotent."""
        ...
