"""Hostile input on the decrypt path: the only outcome is one DecryptionError with a reason.

Pure logic with the in-memory KMS (no network); the same checks through moto and the
workers live in test_crypto_kms.py and test_stream.py.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.decryptor import Decryptor
from pipeline.encryptor import Encryptor
from pipeline.errors import DecryptionError, Reason
from pipeline.kms.counting import CountingKms
from pipeline.kms.memory import InMemoryKms


class Fixture:
    """One sealed record and a reader that trusts its keys."""

    def __init__(self) -> None:
        memory = InMemoryKms()
        wrap, sign = memory.create_key(), memory.create_signing_key()
        self.kms = CountingKms(memory)
        self.encryptor = Encryptor(self.kms, kms_key_id=wrap, signing_key_id=sign, stream="s")
        self.decryptor = Decryptor(self.kms, allowed_kms_keys=[wrap], allowed_signing_keys=[sign])
        self.sealed = asyncio.run(self.encryptor.seal(b"payload " * 8, b"key"))


FIXTURE = Fixture()


def open_sync(value: bytes, key: bytes | None = b"key") -> bytes:
    return asyncio.run(asyncio.wait_for(FIXTURE.decryptor.open(value, key), timeout=5))


def test_valid_envelope_opens() -> None:
    assert open_sync(FIXTURE.sealed) == b"payload " * 8


def test_every_single_bit_flip_is_refused_without_kms_calls() -> None:
    sealed = FIXTURE.sealed
    before = FIXTURE.kms.calls.copy()
    reasons: dict[Reason, int] = {}
    for bit in range(len(sealed) * 8):
        flipped = bytearray(sealed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecryptionError) as caught:
            open_sync(bytes(flipped))
        reasons[caught.value.reason] = reasons.get(caught.value.reason, 0) + 1
    assert FIXTURE.kms.calls == before, "a flipped envelope must cost no KMS call"
    assert {Reason.BAD_SIGNATURE, Reason.BAD_TAG, Reason.MALFORMED} <= set(reasons)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes(value: bytes) -> None:
    with pytest.raises(DecryptionError):
        open_sync(value)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(FIXTURE.sealed) - 1))
def test_truncations(cut: int) -> None:
    with pytest.raises(DecryptionError) as caught:
        open_sync(FIXTURE.sealed[:cut])
    assert caught.value.reason in {Reason.MALFORMED, Reason.UNKNOWN_VERSION}


@settings(max_examples=200, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=len(FIXTURE.sealed) - 1),
    varint=st.sampled_from([b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\xfe\xff\xff\xff\x0f"]),
)
def test_oversized_length_fields(position: int, varint: bytes) -> None:
    """A huge length spliced in anywhere: refused fast, never allocated."""
    value = FIXTURE.sealed[:position] + varint + FIXTURE.sealed[position:]
    with pytest.raises(DecryptionError):
        open_sync(value)


def test_replay_under_another_record_key_is_refused() -> None:
    for key in (b"other", None, b""):
        with pytest.raises(DecryptionError) as caught:
            open_sync(FIXTURE.sealed, key)
        assert caught.value.reason is Reason.BAD_TAG
