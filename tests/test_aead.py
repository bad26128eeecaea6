"""`pipeline.aead`: one DEK's sealer and opener, byte for byte and against tampering."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.aead import Opener, Sealer
from pipeline.avro import encode_long
from pipeline.envelope import NONCE_SIZE, split_body
from pipeline.errors import DecryptionError, Reason

DEK = os.urandom(32)
PREFIX = b"\x04" + bytes(range(16))  # a v2 prefix; v1 would be the header bytes
AAD_PREFIX = b"envpipe.v2" + hashlib.sha256(b"S").digest()


def test_a_record_is_prefix_nonce_length_ciphertext() -> None:
    sealer = Sealer(DEK, PREFIX, AAD_PREFIX, b"header")
    for size in (0, 1, 63, 64, 8_000, 9_000, 70_000):  # one-, two- and three-byte lengths
        plaintext = os.urandom(size)
        record = sealer.seal(plaintext, b"key")
        nonce, ciphertext = split_body(record, len(PREFIX))
        assert record.startswith(PREFIX)
        assert record[len(PREFIX) : len(PREFIX) + NONCE_SIZE] == nonce
        assert record[len(PREFIX) + NONCE_SIZE :].startswith(encode_long(len(ciphertext)))
        aad = AAD_PREFIX + b"\x01key"
        assert AESGCM(DEK).decrypt(nonce, ciphertext, aad) == plaintext


def test_nonces_count_up_from_a_random_start_and_never_repeat() -> None:
    sealer = Sealer(DEK, PREFIX, AAD_PREFIX, b"header")
    nonces = [split_body(sealer.seal(b"x", None), len(PREFIX))[0] for _ in range(1000)]
    assert len(set(nonces)) == 1000
    numbers = [int.from_bytes(nonce, "big") for nonce in nonces]
    assert numbers == [(numbers[0] + i) % (1 << 96) for i in range(1000)]
    other = Sealer(DEK, PREFIX, AAD_PREFIX, b"header")
    assert split_body(other.seal(b"x", None), len(PREFIX))[0] != nonces[0]  # random start


def test_the_opener_opens_and_names_every_change_bad_tag() -> None:
    sealer, opener = Sealer(DEK, PREFIX, AAD_PREFIX, b"h"), Opener(DEK, PREFIX, AAD_PREFIX)
    record = sealer.seal(b"payload", b"k")
    nonce, ciphertext = split_body(record, len(PREFIX))
    assert opener.open(nonce, ciphertext, b"k") == b"payload"
    changes = [
        (nonce, ciphertext, b"other"),  # another record key
        (nonce, ciphertext, None),  # a null key is not an empty one
        (nonce, ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]), b"k"),
        (bytes(12), ciphertext, b"k"),
    ]
    for changed in changes:
        with pytest.raises(DecryptionError) as caught:
            opener.open(*changed)
        assert caught.value.reason is Reason.BAD_TAG
    with pytest.raises(DecryptionError):  # another DEK's AAD prefix (another header)
        Opener(DEK, PREFIX, b"envpipe.v1" + AAD_PREFIX[10:]).open(nonce, ciphertext, b"k")


def test_a_dek_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Sealer(b"short", PREFIX, AAD_PREFIX, b"h")
