"""The crypto-stage implementations and how the harness drives them.

Each implementation seals and opens one record value at a time; `floor` and the peers are
synchronous, envpipe's API is async and is awaited exactly as a caller would. Everything is
built inside the implementation's own process (see `crypto_stage`), from an `ImplContext`.
"""

from __future__ import annotations

import importlib
import io
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import fastavro
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.config import load_settings
from pipeline.decryptor import Decryptor
from pipeline.encryptor import Encryptor
from pipeline.envelope import (
    ENVELOPE_SCHEMA,
    NONCE_SIZE,
    aad_prefix,
    decode_header,
    record_key_suffix,
    signed_bytes,
)
from pipeline.errors import SealError
from pipeline.kms import CountingKms, open_kms

#: The encryption context every implementation binds (envpipe's default for stream "bench").
STREAM = "bench"
CONTEXT = {"envpipe:stream": STREAM}


@dataclass(frozen=True)
class ImplContext:
    """What an implementation needs to know about the run (keys come from the environment)."""

    kms_endpoint: str
    region: str
    kms_key_canonical: str
    #: one real envpipe envelope, so `floor` encodes a header of exactly the real size
    sample_envelope: bytes


class Impl(Protocol):
    """Common to every implementation."""

    asynchronous: ClassVar[bool]
    #: how this implementation was configured, for the report
    note: str

    def kms_calls(self) -> int:
        """KMS requests made so far."""
        ...

    async def close(self) -> None:
        """Release clients and keys."""
        ...


class SyncImpl(Impl, Protocol):
    """An implementation with a blocking API (the floor and both peers)."""

    def seal(self, value: bytes) -> bytes: ...
    def open(self, blob: bytes) -> bytes: ...


class AsyncImpl(Impl, Protocol):
    """An implementation with an async API (envpipe)."""

    async def seal(self, value: bytes) -> bytes: ...
    async def open(self, blob: bytes) -> bytes: ...


class AeadOnly:
    """AES-256-GCM alone, nonce and AAD computed beforehand: the limit of any Python sealer.

    One nonce for every record: never do this with a real key. It is a measurement of what
    `AESGCM.encrypt` itself costs, with no framing, no nonce sequence and no cache lookup.
    """

    asynchronous: ClassVar[bool] = False
    note = "AESGCM.encrypt/decrypt, one precomputed nonce and AAD, no framing (the Python limit)"

    def __init__(self, context: ImplContext) -> None:
        header, _ = decode_header(context.sample_envelope)
        self._aesgcm = AESGCM(AESGCM.generate_key(bit_length=256))
        self._nonce = os.urandom(NONCE_SIZE)
        self._aad = aad_prefix(signed_bytes(header)) + record_key_suffix(None)

    def seal(self, value: bytes) -> bytes:
        return self._aesgcm.encrypt(self._nonce, value, self._aad)

    def open(self, blob: bytes) -> bytes:
        return self._aesgcm.decrypt(self._nonce, blob, self._aad)

    async def seal_batch(self, values: list[bytes]) -> list[bytes]:
        encrypt, nonce, aad = self._aesgcm.encrypt, self._nonce, self._aad
        return [encrypt(nonce, value, aad) for value in values]

    def kms_calls(self) -> int:
        return 0

    async def close(self) -> None:
        return None


class Floor:
    """AES-256-GCM with a fresh random nonce plus fastavro's whole-envelope encoding.

    No KMS, no cache lookup, no signature check: the practical limit of a Python sealer that
    writes the v1 format with a general-purpose Avro encoder.
    """

    asynchronous: ClassVar[bool] = False
    note = "AESGCM + os.urandom nonce + fastavro schemaless_writer/reader of the whole envelope"

    def __init__(self, context: ImplContext) -> None:
        header, _ = decode_header(context.sample_envelope)
        self._header = {
            "version": header.version,
            "alg": header.alg,
            "kms_key_id": header.kms_key_id,
            "wrapped_dek": header.wrapped_dek,
            "dek_id": header.dek_id,
            "encryption_context": dict(header.encryption_context),
            "signing_key_id": header.signing_key_id,
            "signature": header.signature,
        }
        self._aesgcm = AESGCM(AESGCM.generate_key(bit_length=256))
        self._aad = aad_prefix(signed_bytes(header)) + record_key_suffix(None)

    def seal(self, value: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        ciphertext = self._aesgcm.encrypt(nonce, value, self._aad)
        buffer = io.BytesIO()
        fastavro.schemaless_writer(
            buffer,
            ENVELOPE_SCHEMA,
            {"header": self._header, "nonce": nonce, "ciphertext": ciphertext},
        )
        return buffer.getvalue()

    def open(self, blob: bytes) -> bytes:
        envelope: Any = fastavro.schemaless_reader(io.BytesIO(blob), ENVELOPE_SCHEMA, None)
        return self._aesgcm.decrypt(envelope["nonce"], envelope["ciphertext"], self._aad)

    def kms_calls(self) -> int:
        return 0

    async def close(self) -> None:
        return None


class Envpipe:
    """`Encryptor.seal` / `Decryptor.open` with their caches, through AwsKms at the KMS."""

    asynchronous: ClassVar[bool] = True
    note = "Encryptor/Decryptor from settings (default DEK limits), CountingKms(AwsKms)"

    def __init__(self, kms: CountingKms, encryptor: Encryptor, decryptor: Decryptor) -> None:
        self._kms = kms
        self._encryptor = encryptor
        self._decryptor = decryptor

    @classmethod
    async def create(cls, context: ImplContext) -> Envpipe:
        """Build it the way the workers do: settings from the `ENVPIPE_*` environment."""
        settings = load_settings()
        kms = CountingKms(await open_kms(settings))
        encryptor = await Encryptor.from_settings(kms, settings, stream=STREAM)
        decryptor = await Decryptor.from_settings(kms, settings)
        return cls(kms, encryptor, decryptor)

    async def seal(self, value: bytes) -> bytes:
        return await self._encryptor.seal(value)

    async def open(self, blob: bytes) -> bytes:
        return await self._decryptor.open(blob)

    async def seal_batch(self, values: list[bytes]) -> list[bytes | SealError]:
        """`Encryptor.seal_many` over a worker-sized batch, as the encrypt worker calls it."""
        return await self._encryptor.seal_many([(value, None) for value in values])

    def kms_calls(self) -> int:
        return sum(self._kms.calls.values())

    async def close(self) -> None:
        await self._encryptor.close()
        await self._decryptor.close()
        await self._kms.close()


#: Implementation name -> "module:factory"; a factory is `async (ImplContext) -> impl`.
FACTORIES = {
    "aead_only": "benchmarks.crypto_impls:create_aead_only",
    "floor": "benchmarks.crypto_impls:create_floor",
    "envpipe": "benchmarks.crypto_impls:create_envpipe",
    "aws_esdk": "benchmarks.peers.aws_esdk:create",
    "confluent_csfle": "benchmarks.peers.confluent_csfle:create",
}


async def create_aead_only(context: ImplContext) -> AeadOnly:
    """AES-GCM alone needs no service."""
    return AeadOnly(context)


async def create_floor(context: ImplContext) -> Floor:
    """The floor needs no service."""
    return Floor(context)


async def create_envpipe(context: ImplContext) -> Envpipe:
    """envpipe against the embedded KMS."""
    return await Envpipe.create(context)


async def create(name: str, context: ImplContext) -> SyncImpl | AsyncImpl:
    """Import and build one implementation (peers are imported only here, in their process)."""
    module_name, factory_name = FACTORIES[name].split(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    impl: SyncImpl | AsyncImpl = await factory(context)
    return impl
