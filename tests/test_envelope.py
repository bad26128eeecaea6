"""The sans-IO codec: Avro layout, signed bytes, AAD and the fast-path record encoding."""

from __future__ import annotations

import io
import json

import fastavro
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import envelope
from pipeline.envelope import Header
from pipeline.errors import DecryptionError, Reason

HEADER = Header(
    kms_key_id="arn:aws:kms:us-east-1:111122223333:key/wrap",
    wrapped_dek=b"\x01" * 184,
    dek_id=bytes(range(16)),
    encryption_context={"zeta": "z", "envpipe:stream": "orders", "Alpha": "ä"},
    signing_key_id="arn:aws:kms:us-east-1:111122223333:key/sign",
    signature=b"\x30" * 71,
)


def plain_schema() -> object:
    """The schema straight from the file, parsed by fastavro alone (no envpipe code)."""
    with open(envelope.SCHEMA_PATH, encoding="utf-8") as handle:
        return fastavro.parse_schema(json.load(handle))


def test_record_encoding_decodes_with_plain_fastavro() -> None:
    header_bytes = envelope.encode_header(HEADER)
    value = envelope.encode_record(header_bytes, b"N" * 12, b"C" * 300)
    decoded = fastavro.schemaless_reader(io.BytesIO(value), plain_schema(), None)
    assert decoded["nonce"] == b"N" * 12
    assert decoded["ciphertext"] == b"C" * 300
    assert decoded["header"]["dek_id"] == HEADER.dek_id
    assert decoded["header"]["version"] == 1
    assert decoded["header"]["alg"] == "AES_256_GCM"
    assert decoded["header"]["encryption_context"] == dict(HEADER.encryption_context)


def test_signed_bytes_sort_context_keys_by_byte_order_and_empty_the_signature() -> None:
    signed = envelope.signed_bytes(HEADER)
    expected = io.BytesIO()
    named: dict[str, object] = {}
    with open(envelope.SCHEMA_PATH, encoding="utf-8") as handle:
        fastavro.parse_schema(json.load(handle), named_schemas=named)
    fastavro.schemaless_writer(
        expected,
        named["envpipe.v1.Header"],
        {
            "version": 1,
            "alg": "AES_256_GCM",
            "kms_key_id": HEADER.kms_key_id,
            "wrapped_dek": HEADER.wrapped_dek,
            "dek_id": HEADER.dek_id,
            # "Alpha" < "envpipe:stream" < "zeta" in byte order (uppercase first)
            "encryption_context": {"Alpha": "ä", "envpipe:stream": "orders", "zeta": "z"},
            "signing_key_id": HEADER.signing_key_id,
            "signature": b"",
        },
    )
    assert signed == expected.getvalue()
    # one map block: count 3 (zig-zag 6), three entries, then the 0 terminator
    assert b"\x06\x0aAlpha" in signed


def test_aad_is_label_digest_and_key_marker() -> None:
    import hashlib

    signed = envelope.signed_bytes(HEADER)
    digest = hashlib.sha256(signed).digest()
    assert envelope.aad(signed, None) == b"envpipe.v1" + digest + b"\x00"
    assert envelope.aad(signed, b"k") == b"envpipe.v1" + digest + b"\x01k"
    assert envelope.aad(signed, b"") == b"envpipe.v1" + digest + b"\x01"


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_encode_long_matches_avro(number: int) -> None:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, "long", number)
    assert envelope.encode_long(number) == out.getvalue()


def test_decode_envelope_round_trip() -> None:
    header_bytes = envelope.encode_header(HEADER)
    value = envelope.encode_record(header_bytes, b"N" * 12, b"ciphertext")
    parsed = envelope.decode_envelope(value)
    assert parsed.header == HEADER
    assert parsed.header_bytes == header_bytes
    assert (parsed.nonce, parsed.ciphertext) == (b"N" * 12, b"ciphertext")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", Reason.MALFORMED),
        (b"\x04", Reason.UNKNOWN_VERSION),  # version 2
        (b"\x02\x02", Reason.MALFORMED),  # enum index 1 does not exist
        (b"\xfe\x01", Reason.UNKNOWN_VERSION),  # version 127: a future format
        (b"\x80\x04", Reason.MALFORMED),  # version 256: not a version at all
        (b'{"plain": "json"}', Reason.MALFORMED),  # 0x7b would be version -62
        (b"\x02" + b"\xff" * 20, Reason.MALFORMED),
    ],
)
def test_non_envelopes_are_refused_with_a_reason(value: bytes, reason: Reason) -> None:
    with pytest.raises(DecryptionError) as caught:
        envelope.decode_envelope(value)
    assert caught.value.reason is reason


def test_truncation_and_trailing_bytes_are_malformed() -> None:
    value = envelope.encode_record(envelope.encode_header(HEADER), b"N" * 12, b"C" * 40)
    for cut in (1, 10, len(value) // 2, len(value) - 1):
        with pytest.raises(DecryptionError) as caught:
            envelope.decode_envelope(value[:cut])
        assert caught.value.reason is Reason.MALFORMED
    with pytest.raises(DecryptionError):
        envelope.decode_envelope(value + b"x")


def test_error_message_is_opaque() -> None:
    error = DecryptionError(Reason.BAD_TAG)
    assert str(error) == "record could not be decrypted (reason=bad_tag)"


def test_non_canonical_encodings_are_malformed() -> None:
    header_bytes = envelope.encode_header(HEADER)
    value = envelope.encode_record(header_bytes, b"N" * 12, b"C" * 5)
    negative_enum = value[:1] + b"\x01" + value[2:]  # enum index -1 would alias index 0
    long_version = b"\x82\x00" + value[1:]  # version 1 as a two-byte varint
    long_length = header_bytes + b"N" * 12 + b"\x8a\x00" + b"C" * 5  # length 5, two bytes
    for bad in (negative_enum, long_version, long_length):
        with pytest.raises(DecryptionError) as caught:
            envelope.decode_envelope(bad)
        assert caught.value.reason is Reason.MALFORMED
