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

from pipeline.errors import KmsRequestError, KmsUnavailableError
from pipeline.kms import CountingKms, InMemoryKms
from pipeline.kms.memory import ARN_PREFIX
from pipeline.types import Kms

CONTEXT = {"envpipe:stream": "orders", "tenant": "acme"}
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
    reordered = dict(reversed(CONTEXT.items()))
    assert await kms.decrypt(key.key_id, key.wrapped, reordered) == key.plaintext


async def test_every_data_key_is_new(kms: InMemoryKms) -> None:
    keys = [await kms.generate_data_key("alias/envpipe-dev", CONTEXT) for _ in range(5)]
    assert len({k.plaintext for k in keys}) == len({k.wrapped for k in keys}) == 5


@pytest.mark.parametrize(
    "context",
    [
        {**CONTEXT, "tenant": "evil"},
        {"envpipe:stream": "orders"},
        {**CONTEXT, "extra": ""},
        {},
    ],
)
async def test_wrong_context_is_invalid_ciphertext(
    kms: InMemoryKms, context: dict[str, str]
) -> None:
    key = await kms.generate_data_key("alias/envpipe-dev", CONTEXT)

    with pytest.raises(KmsRequestError) as caught:
        await kms.decrypt(key.key_id, key.wrapped, context)

    assert (caught.value.operation, _code(caught)) == ("Decrypt", "InvalidCiphertextException")
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
        await kms.decrypt(key.key_id, tamper(key.wrapped), CONTEXT)
    assert _code(caught) == "InvalidCiphertextException"


async def test_blob_of_another_key_is_incorrect_key(kms: InMemoryKms) -> None:
    other = kms.create_key()
    key = await kms.generate_data_key("alias/envpipe-dev", CONTEXT)

    with pytest.raises(KmsRequestError) as caught:
        await kms.decrypt(other, key.wrapped, CONTEXT)
    assert _code(caught) == "IncorrectKeyException"


async def test_every_spelling_of_a_key_resolves_to_its_arn(kms: InMemoryKms) -> None:
    arn = await kms.resolve_key_id("alias/envpipe-dev")
    key_uuid = arn.rsplit("/", 1)[1]

    assert ARN.fullmatch(arn)
    for spelling in (arn, key_uuid, ARN_PREFIX + "alias/envpipe-dev"):
        assert await kms.resolve_key_id(spelling) == arn
    assert await kms.resolve_key_id("alias/envpipe-dev-signing") != arn


async def test_unknown_key_is_not_found(kms: InMemoryKms) -> None:
    with pytest.raises(KmsRequestError) as caught:
        await kms.generate_data_key("alias/nope", CONTEXT)
    assert _code(caught) == "NotFoundException"


def test_aliases_are_validated(kms: InMemoryKms) -> None:
    with pytest.raises(ValueError, match="alias"):
        kms.create_key(alias="alias/envpipe-dev")
    with pytest.raises(ValueError, match="alias"):
        kms.create_signing_key(alias="no-prefix")


async def test_signature_verifies_with_the_public_key(kms: InMemoryKms) -> None:
    message = b"header bytes S"
    signature = await kms.sign("alias/envpipe-dev-signing", message)
    public_key = serialization.load_der_public_key(
        await kms.get_public_key("alias/envpipe-dev-signing")
    )
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)

    public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public_key.verify(signature, message + b"!", ec.ECDSA(hashes.SHA256()))


async def test_sign_limits_raw_messages_like_kms(kms: InMemoryKms) -> None:
    await kms.sign("alias/envpipe-dev-signing", b"x" * 4096)
    with pytest.raises(KmsRequestError) as caught:
        await kms.sign("alias/envpipe-dev-signing", b"x" * 4097)
    assert _code(caught) == "ValidationException"


async def test_key_usage_is_enforced(kms: InMemoryKms) -> None:
    calls = [
        kms.generate_data_key("alias/envpipe-dev-signing", CONTEXT),
        kms.decrypt("alias/envpipe-dev-signing", b"x" * 60, CONTEXT),
        kms.sign("alias/envpipe-dev", b"m"),
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
    await asyncio.gather(*(kms.resolve_key_id("alias/envpipe-dev") for _ in range(10)))
    elapsed = time.perf_counter() - start

    assert 0.05 <= elapsed < 0.5  # concurrent calls overlap, as with a real KMS


async def test_fail_with_applies_to_every_operation(kms: InMemoryKms) -> None:
    kms.fail_with = KmsUnavailableError("Any", "ThrottlingException")
    for _ in range(2):  # the same instance may be raised repeatedly
        with pytest.raises(KmsUnavailableError):
            await kms.generate_data_key("alias/envpipe-dev", CONTEXT)
    with pytest.raises(KmsUnavailableError):
        await kms.get_public_key("alias/envpipe-dev-signing")

    kms.fail_with = None
    await kms.generate_data_key("alias/envpipe-dev", CONTEXT)


async def test_fail_ops_target_one_operation(kms: InMemoryKms) -> None:
    failure = KmsRequestError("Decrypt", "AccessDeniedException")
    kms.fail_ops["Decrypt"] = failure
    key = await kms.generate_data_key("alias/envpipe-dev", CONTEXT)

    with pytest.raises(KmsRequestError) as caught:
        await kms.decrypt(key.key_id, key.wrapped, CONTEXT)
    assert caught.value is failure

    del kms.fail_ops["Decrypt"]
    assert await kms.decrypt(key.key_id, key.wrapped, CONTEXT) == key.plaintext


async def test_close_is_idempotent_and_final(kms: InMemoryKms) -> None:
    await kms.close()
    await kms.close()
    with pytest.raises(KmsRequestError) as caught:
        await kms.resolve_key_id("alias/envpipe-dev")
    assert _code(caught) == "ClientClosed"


# --- CountingKms ------------------------------------------------------------------------------


async def test_counting_counts_calls_failures_and_time(kms: InMemoryKms) -> None:
    counting = CountingKms(kms)
    kms.latency = 0.01

    key = await counting.generate_data_key("alias/envpipe-dev", CONTEXT)
    assert await counting.decrypt(key.key_id, key.wrapped, CONTEXT) == key.plaintext
    signature = await counting.sign("alias/envpipe-dev-signing", b"m")
    assert signature
    await counting.get_public_key("alias/envpipe-dev-signing")
    await counting.resolve_key_id("alias/envpipe-dev")
    await counting.resolve_key_id("alias/envpipe-dev")
    with pytest.raises(KmsRequestError):
        await counting.decrypt(key.key_id, key.wrapped, {})

    assert counting.calls == {
        "GenerateDataKey": 1,
        "Decrypt": 2,
        "Sign": 1,
        "GetPublicKey": 1,
        "DescribeKey": 2,
    }
    assert counting.failures == {"Decrypt": 1}
    assert set(counting.seconds) == set(counting.calls)
    assert counting.seconds["DescribeKey"] >= 0.02
    assert counting.seconds["Decrypt"] >= 0.02  # the failure's time counts too


async def test_counting_passes_errors_through_and_ignores_cancellation(kms: InMemoryKms) -> None:
    counting = CountingKms(kms)
    kms.fail_ops["Sign"] = KmsUnavailableError("Sign", "ThrottlingException")
    with pytest.raises(KmsUnavailableError):
        await counting.sign("alias/envpipe-dev-signing", b"m")

    kms.latency = 10
    task = asyncio.create_task(counting.resolve_key_id("alias/envpipe-dev"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert counting.failures == {"Sign": 1}
    assert counting.calls == {"Sign": 1, "DescribeKey": 1}


async def test_counting_close_delegates(kms: InMemoryKms) -> None:
    await CountingKms(kms).close()
    assert kms.closed
