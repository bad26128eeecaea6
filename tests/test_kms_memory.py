"""InMemoryKms behaves like KMS where the core can tell, and CountingKms counts honestly."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pipeline.errors import KeyUnavailableError, KmsRequestError, KmsUnavailableError
from pipeline.kms import CountingKms, InMemoryKms
from pipeline.kms.memory import ARN_PREFIX
from pipeline.types import EncryptionContext, Kms

CONTEXT = EncryptionContext.of({"envpipe:stream": "orders", "tenant": "acme"})
ARN = re.compile(r"arn:aws:kms:us-east-1:111122223333:key/[0-9a-f-]{36}")


@pytest.fixture
def kms() -> InMemoryKms:
    kms = InMemoryKms()
    kms.create_key(alias="alias/envpipe-dev")
    kms.create_signing_key(alias="alias/envpipe-dev-signing")
    return kms


def _code(caught: pytest.ExceptionInfo[KmsRequestError]) -> str:
    return caught.value.code


async def test_implements_the_protocol(kms: InMemoryKms) -> None:
    assert isinstance(kms, Kms)
    assert isinstance(CountingKms(kms), Kms)


async def test_data_key_round_trip(kms: InMemoryKms) -> None:
    key = await kms.generate_data_key("alias/envpipe-dev", CONTEXT)

    assert ARN.fullmatch(key.key_id)
    assert len(key.plaintext) == 32
    assert key.plaintext not in key.wrapped
    assert "plaintext" not in repr(key)
    reordered = EncryptionContext.of(dict(reversed(CONTEXT.pairs.items())))
    assert await kms.unwrap(key.key_id, key.wrapped, reordered) == key.plaintext


async def test_every_data_key_is_new(kms: InMemoryKms) -> None:
    keys = [await kms.generate_data_key("alias/envpipe-dev", CONTEXT) for _ in range(5)]
    assert len({k.plaintext for k in keys}) == len({k.wrapped for k in keys}) == 5


@pytest.mark.parametrize(
    "context",
    [
        {**CONTEXT.pairs, "tenant": "evil"},
        {"envpipe:stream": "orders"},
        {**CONTEXT.pairs, "extra": ""},
        {},
    ],
)
async def test_wrong_context_is_invalid_ciphertext(
    kms: InMemoryKms, context: dict[str, str]
) -> None:
    key = await kms.generate_data_key("alias/envpipe-dev", CONTEXT)

    with pytest.raises(KmsRequestError) as caught:
        await kms.unwrap(key.key_id, key.wrapped, EncryptionContext.of(context))

    assert (caught.value.operation, _code(caught)) == ("unwrap", "InvalidCiphertextException")
    assert not caught.value.retriable


@pytest.mark.parametrize(
    "tamper",
    [
        lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]),  # tag
        lambda blob: blob[:20] + bytes([blob[20] ^ 1]) + blob[21:],  # nonce
        lambda blob: blob[:-5],  # truncated
        lambda blob: b"",
    ],
)
async def test_tampered_blob_is_invalid_ciphertext(
    kms: InMemoryKms, tamper: Callable[[bytes], bytes]
) -> None:
    key = await kms.generate_data_key("alias/envpipe-dev", CONTEXT)

    with pytest.raises(KmsRequestError) as caught:
        await kms.unwrap(key.key_id, tamper(key.wrapped), CONTEXT)
    assert _code(caught) == "InvalidCiphertextException"


async def test_blob_of_another_key_is_incorrect_key(kms: InMemoryKms) -> None:
    other = kms.create_key()
    key = await kms.generate_data_key("alias/envpipe-dev", CONTEXT)

    with pytest.raises(KmsRequestError) as caught:
        await kms.unwrap(other, key.wrapped, CONTEXT)
    assert _code(caught) == "IncorrectKeyException"


async def test_every_spelling_of_a_key_resolves_to_its_arn(kms: InMemoryKms) -> None:
    arn = await kms.resolve_wrapping_key("alias/envpipe-dev")
    key_uuid = arn.rsplit("/", 1)[1]

    assert ARN.fullmatch(arn)
    for spelling in (arn, key_uuid, ARN_PREFIX + "alias/envpipe-dev"):
        assert await kms.resolve_wrapping_key(spelling) == arn
    assert await kms.resolve_signing_key("alias/envpipe-dev-signing") != arn


async def test_unknown_key_is_unavailable(kms: InMemoryKms) -> None:
    with pytest.raises(KeyUnavailableError) as caught:
        await kms.generate_data_key("alias/nope", CONTEXT)
    assert _code(caught) == "NotFoundException"


async def test_a_repointed_alias_names_the_new_key(kms: InMemoryKms) -> None:
    old = await kms.resolve_wrapping_key("alias/envpipe-dev")
    new = kms.create_key()
    kms.point_alias("alias/envpipe-dev", new)
    assert (await kms.generate_data_key("alias/envpipe-dev", CONTEXT)).key_id == new
    assert await kms.resolve_wrapping_key("alias/envpipe-dev") != old


@pytest.mark.parametrize(
    ("action", "code"), [("disable", "DisabledException"), ("destroy", "NotFoundException")]
)
async def test_disabled_and_destroyed_keys_are_unavailable(
    kms: InMemoryKms, action: str, code: str
) -> None:
    key = await kms.generate_data_key("alias/envpipe-dev", CONTEXT)
    getattr(kms, action)(key.key_id)
    for call in (
        kms.unwrap(key.key_id, key.wrapped, CONTEXT),
        kms.generate_data_key(key.key_id, CONTEXT),
    ):
        with pytest.raises(KeyUnavailableError) as caught:
            await call
        assert _code(caught) == code
        assert not caught.value.retriable


def test_aliases_are_validated(kms: InMemoryKms) -> None:
    with pytest.raises(ValueError, match="alias"):
        kms.create_key(alias="alias/envpipe-dev")
    with pytest.raises(ValueError, match="alias"):
        kms.create_signing_key(alias="no-prefix")


def _sha256(message: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(message)
    return digest.finalize()


async def test_signature_verifies_with_the_public_key(kms: InMemoryKms) -> None:
    message = b"header bytes S"
    signature = await kms.sign("alias/envpipe-dev-signing", message, _sha256(message))
    public_key = serialization.load_der_public_key(
        await kms.get_public_key("alias/envpipe-dev-signing")
    )
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)

    public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public_key.verify(signature, message + b"!", ec.ECDSA(hashes.SHA256()))


async def test_sign_signs_the_digest_it_is_given(kms: InMemoryKms) -> None:
    """The core hands providers SHA-256(S); a wrong digest makes a signature over S fail."""
    message = b"x" * 10_000  # no 4096-byte limit: only the digest is signed
    public_key = serialization.load_der_public_key(
        await kms.get_public_key("alias/envpipe-dev-signing")
    )
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    good = await kms.sign("alias/envpipe-dev-signing", message, _sha256(message))
    public_key.verify(good, message, ec.ECDSA(hashes.SHA256()))
    wrong = await kms.sign("alias/envpipe-dev-signing", message, _sha256(b"other"))
    with pytest.raises(InvalidSignature):
        public_key.verify(wrong, message, ec.ECDSA(hashes.SHA256()))


async def test_key_usage_is_enforced(kms: InMemoryKms) -> None:
    calls = [
        kms.generate_data_key("alias/envpipe-dev-signing", CONTEXT),
        kms.unwrap("alias/envpipe-dev-signing", b"x" * 60, CONTEXT),
        kms.sign("alias/envpipe-dev", b"m", _sha256(b"m")),
        kms.get_public_key("alias/envpipe-dev"),
    ]
    codes = []
    for call in calls:
        with pytest.raises(KmsRequestError) as caught:
            await call
        codes.append(_code(caught))
    assert codes == ["InvalidKeyUsageException"] * 3 + ["UnsupportedOperationException"]


async def test_latency_is_applied_to_every_call(kms: InMemoryKms) -> None:
    kms.latency = 0.05
    start = time.perf_counter()
    await asyncio.gather(*(kms.resolve_wrapping_key("alias/envpipe-dev") for _ in range(10)))
    elapsed = time.perf_counter() - start

    assert 0.05 <= elapsed < 0.5  # concurrent calls overlap, as with a real KMS


async def test_fail_with_applies_to_every_operation(kms: InMemoryKms) -> None:
    kms.fail_with = KmsUnavailableError("any", "ThrottlingException")
    for _ in range(2):  # the same instance may be raised repeatedly
        with pytest.raises(KmsUnavailableError):
            await kms.generate_data_key("alias/envpipe-dev", CONTEXT)
    with pytest.raises(KmsUnavailableError):
        await kms.get_public_key("alias/envpipe-dev-signing")

    kms.fail_with = None
    await kms.generate_data_key("alias/envpipe-dev", CONTEXT)


async def test_fail_ops_target_one_operation(kms: InMemoryKms) -> None:
    failure = KmsRequestError("unwrap", "AccessDeniedException")
    kms.fail_ops["unwrap"] = failure
    key = await kms.generate_data_key("alias/envpipe-dev", CONTEXT)

    with pytest.raises(KmsRequestError) as caught:
        await kms.unwrap(key.key_id, key.wrapped, CONTEXT)
    assert caught.value is failure

    del kms.fail_ops["unwrap"]
    assert await kms.unwrap(key.key_id, key.wrapped, CONTEXT) == key.plaintext


async def test_close_is_idempotent_and_final(kms: InMemoryKms) -> None:
    await kms.close()
    await kms.close()
    with pytest.raises(KmsRequestError) as caught:
        await kms.resolve_wrapping_key("alias/envpipe-dev")
    assert _code(caught) == "ClientClosed"


async def test_async_with_closes_the_client_even_when_the_block_raises(kms: InMemoryKms) -> None:
    async def fail_inside() -> None:
        async with kms as entered:
            assert entered is kms
            assert not kms.closed
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_inside()
    assert kms.closed


# --- CountingKms ------------------------------------------------------------------------------


async def test_counting_counts_calls_failures_and_time(kms: InMemoryKms) -> None:
    counting = CountingKms(kms)
    kms.latency = 0.01

    key = await counting.generate_data_key("alias/envpipe-dev", CONTEXT)
    assert await counting.unwrap(key.key_id, key.wrapped, CONTEXT) == key.plaintext
    signature = await counting.sign("alias/envpipe-dev-signing", b"m", _sha256(b"m"))
    assert signature
    await counting.get_public_key("alias/envpipe-dev-signing")
    await counting.resolve_wrapping_key("alias/envpipe-dev")
    await counting.resolve_signing_key("alias/envpipe-dev-signing")
    with pytest.raises(KmsRequestError):
        await counting.unwrap(key.key_id, key.wrapped, EncryptionContext.of({}))

    assert counting.provider == "memory"
    assert counting.calls == {
        "generate_data_key": 1,
        "unwrap": 2,
        "sign": 1,
        "public_key": 1,
        "resolve": 2,
    }
    assert counting.failures == {"unwrap": 1}
    assert set(counting.seconds) == set(counting.calls)
    assert counting.seconds["resolve"] >= 0.02
    assert counting.seconds["unwrap"] >= 0.02  # the failure's time counts too


async def test_counting_passes_errors_through_and_ignores_cancellation(kms: InMemoryKms) -> None:
    counting = CountingKms(kms)
    kms.fail_ops["sign"] = KmsUnavailableError("sign", "ThrottlingException")
    with pytest.raises(KmsUnavailableError):
        await counting.sign("alias/envpipe-dev-signing", b"m", _sha256(b"m"))

    kms.latency = 10
    task = asyncio.create_task(counting.resolve_wrapping_key("alias/envpipe-dev"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert counting.failures == {"sign": 1}
    assert counting.calls == {"sign": 1, "resolve": 1}


async def test_counting_close_delegates(kms: InMemoryKms) -> None:
    await CountingKms(kms).close()
    assert kms.closed
