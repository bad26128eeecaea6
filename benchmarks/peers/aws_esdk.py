"""`aws_esdk`: the AWS Encryption SDK for Python with a caching materials manager.

Configured as its documentation recommends for high-volume messages: a
`CachingCryptoMaterialsManager` over a `StrictAwsKmsMasterKeyProvider` for the same KMS key
envpipe uses, with envpipe's default DEK limits (300 s, 1,000,000 messages) and the same
encryption context. The algorithm suite is the SDK's default
(AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384: key commitment and a per-message ECDSA
signature), because that is what its users get. Each record is one ESDK message.
KMS requests are counted with a botocore `before-call` hook on the SDK's own session.
"""

from __future__ import annotations

import botocore.session

from benchmarks.crypto_impls import CONTEXT, ImplContext
from benchmarks.peers.botocore_counting import CountedPeer

_CACHE_CAPACITY = 100
_MAX_AGE_SECONDS = 300.0
_MAX_MESSAGES = 1_000_000


class AwsEsdk(CountedPeer):
    """One ESDK client and caching CMM, sealing each record as its own message."""

    note = (
        "EncryptionSDKClient(REQUIRE_ENCRYPT_REQUIRE_DECRYPT), default suite "
        "(HKDF-SHA512, key commitment, ECDSA P-384 signature per message), "
        "CachingCryptoMaterialsManager(LocalCryptoMaterialsCache(100), 300 s, 1M messages)"
    )

    def __init__(self, context: ImplContext) -> None:
        import aws_encryption_sdk  # type: ignore[import-untyped]  # noqa: PLC0415 - optional peer
        from aws_encryption_sdk import (  # noqa: PLC0415
            CachingCryptoMaterialsManager,
            CommitmentPolicy,
            LocalCryptoMaterialsCache,
            StrictAwsKmsMasterKeyProvider,
        )

        super().__init__()
        session = botocore.session.Session()
        # Clients the SDK creates from this session inherit the hook; the endpoint comes
        # from AWS_ENDPOINT_URL_KMS, which the harness sets to the embedded KMS.
        session.register("before-call.kms", self._counter)
        session.set_config_variable("region", context.region)
        provider = StrictAwsKmsMasterKeyProvider(
            key_ids=[context.kms_key_canonical], botocore_session=session
        )
        self._cmm = CachingCryptoMaterialsManager(
            master_key_provider=provider,
            cache=LocalCryptoMaterialsCache(capacity=_CACHE_CAPACITY),
            max_age=_MAX_AGE_SECONDS,
            max_messages_encrypted=_MAX_MESSAGES,
        )
        self._client = aws_encryption_sdk.EncryptionSDKClient(
            commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
        )

    def seal(self, value: bytes) -> bytes:
        ciphertext, _ = self._client.encrypt(
            source=value, materials_manager=self._cmm, encryption_context=CONTEXT
        )
        return bytes(ciphertext)

    def open(self, blob: bytes) -> bytes:
        plaintext, _ = self._client.decrypt(source=blob, materials_manager=self._cmm)
        return bytes(plaintext)


async def create(context: ImplContext) -> AwsEsdk:
    """The harness's factory."""
    return AwsEsdk(context)
