"""The interfaces, in one place: what the core needs from a cryptography service.

Implementations live in `pipeline.kms`: AWS KMS (aiobotocore), Vault / OpenBao transit
(aiohttp), a PKCS#11 HSM (python-pkcs11), and an in-memory one for unit tests. The core only
ever sees key *identifiers* and, briefly, plaintext data keys. Identifiers are canonical
(docs/format.md, "Cryptography services"): an ARN for aws, `vault:<mount>:<name>[:<version>]`
for vault, an RFC 7512 `pkcs11:` URI for pkcs11.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from pipeline.avro import encode_context


class Operation(StrEnum):
    """The five things every provider does; metric labels and error messages use these names."""

    GENERATE_DATA_KEY = "generate_data_key"
    UNWRAP = "unwrap"
    SIGN = "sign"
    PUBLIC_KEY = "public_key"
    RESOLVE = "resolve"


@dataclass(frozen=True, slots=True)
class EncryptionContext:
    """What a wrapped DEK is bound to: the map (AWS's EncryptionContext) and C, its bytes.

    C is computed by the core (`pipeline.avro.encode_context`), never by a provider, so every
    provider binds exactly the bytes the contract fixes. Vault passes C as
    `associated_data`; an HSM as the GCM AAD.
    """

    pairs: Mapping[str, str]
    encoded: bytes = field(repr=False)

    @classmethod
    def of(cls, pairs: Mapping[str, str]) -> EncryptionContext:
        """The context for `pairs`, with C computed once."""
        return cls(dict(pairs), encode_context(pairs))


@dataclass(frozen=True, slots=True)
class DataKey:
    """A freshly generated data key: the plaintext for local use, the blob for the envelope."""

    key_id: str  # canonical id of the wrapping key that wrapped it
    plaintext: bytes = field(repr=False)
    wrapped: bytes


@runtime_checkable
class Kms(Protocol):
    """A cryptography service: wrap, unwrap, sign, public key, resolve a name.

    Errors are translated at the boundary: implementations raise `KmsUnavailableError`
    (retriable), `KeyUnavailableError` (the key is gone or switched off),
    `KmsAccessDeniedError` (naming the permission) or `KmsRequestError` (any other refusal),
    never a foreign exception type.
    """

    #: "aws", "vault", "pkcs11" or "memory": the `provider` label of the metrics
    provider: str

    async def generate_data_key(self, key_id: str, context: EncryptionContext) -> DataKey:
        """A new 32-byte DEK, wrapped under `key_id` (a configured name or canonical id) and
        bound to `context`; `DataKey.key_id` is the canonical id that wrapped it."""
        ...

    async def unwrap(self, key_id: str, wrapped: bytes, context: EncryptionContext) -> bytes:
        """The DEK in `wrapped`, which must have been wrapped by `key_id` under `context`."""
        ...

    async def sign(self, key_id: str, message: bytes, digest: bytes) -> bytes:
        """ECDSA P-256 over SHA-256(`message`), DER-encoded. `digest` is that SHA-256, which
        the core has already computed: providers sign it (AWS signs the raw message while it
        fits KMS's 4096-byte limit, the digest above it)."""
        ...

    async def get_public_key(self, key_id: str) -> bytes:
        """The DER SubjectPublicKeyInfo of the canonical signing key `key_id`."""
        ...

    async def resolve_wrapping_key(self, name: str) -> str:
        """The canonical id of a configured wrapping-key name (alias, key name, label)."""
        ...

    async def resolve_signing_key(self, name: str) -> str:
        """The canonical id of a configured signing-key name, as of now (vault: the latest
        version). Called for every new DEK, so a re-pointed alias is picked up."""
        ...

    async def close(self) -> None:
        """Release connections. Idempotent."""
        ...


class ClosedOnExit:
    """`async with` for a service client: the block's end closes it, whatever happened."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


@runtime_checkable
class HeaderSink(Protocol):
    """Where a v2 writer stores each DEK's signed header: the keys topic, in production."""

    async def publish(self, dek_id: bytes, header: bytes) -> None:
        """Store `header` under `dek_id`; return only once it is durably acknowledged
        (acks=all), because records under that DEK are sent right after."""
        ...


@runtime_checkable
class HeaderSource(Protocol):
    """Where a v2 reader finds the signed header of a `dek_id`."""

    def get(self, dek_id: bytes) -> bytes | None:
        """The header bytes filed under `dek_id`, or None if none has arrived (yet)."""
        ...
