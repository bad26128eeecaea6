"""Wire format v1: the Avro envelope, the signed header bytes S and the AAD. Sans-IO.

The schema is read from `schemas/envelope.avsc`, never re-typed here. The constants the fast
path needs (field order, nonce and DEK-id sizes, the algorithm symbol) are derived from it
at import time, so a schema edit that would break the byte layout fails loudly.

Every record sealed under one DEK shares one header, so its Avro bytes, S and SHA-256(S) are
computed once per DEK (`SealedHeader`). Per record, the envelope is the concatenation of the
header bytes, the 12-byte nonce and the Avro `bytes` encoding of the ciphertext, because
Avro's encoding of a record is the concatenation of its fields.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import fastavro

from pipeline.errors import DecryptionError, Reason

FORMAT_VERSION = 1
AAD_LABEL = b"envpipe.v1"
#: Kafka record header the workers add to every envelope record.
VERSION_HEADER = ("envpipe.v", b"1")
#: The default encryption-context key that names the stream.
STREAM_CONTEXT_KEY = "envpipe:stream"


def _schema_path() -> Path:
    """The installed wheel carries a copy next to the package; a checkout has it at the top."""
    here = Path(__file__).resolve().parent
    for folder in (here / "schemas", here.parent / "schemas"):
        if (folder / "envelope.avsc").is_file():
            return folder / "envelope.avsc"
    raise FileNotFoundError("schemas/envelope.avsc not found beside the pipeline package")


SCHEMA_PATH = _schema_path()
_RAW_SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
_NAMED: dict[str, Any] = {}
ENVELOPE_SCHEMA = fastavro.parse_schema(_RAW_SCHEMA, named_schemas=_NAMED)
HEADER_SCHEMA = _NAMED["envpipe.v1.Header"]


def _layout() -> tuple[int, int, str]:
    """Check the envelope's shape and return (nonce size, DEK-id size, algorithm symbol)."""
    names = [f["name"] for f in _RAW_SCHEMA["fields"]]
    if names != ["header", "nonce", "ciphertext"]:
        raise RuntimeError(f"envelope.avsc fields are {names}; the v1 fast path needs this order")
    nonce_size = int(_NAMED["envpipe.v1.Nonce"]["size"])
    dek_id_size = int(_NAMED["envpipe.v1.DekId"]["size"])
    (algorithm,) = _NAMED["envpipe.v1.Algorithm"]["symbols"]
    return nonce_size, dek_id_size, str(algorithm)


NONCE_SIZE, DEK_ID_SIZE, ALGORITHM = _layout()


@dataclass(frozen=True, slots=True)
class Header:
    """The envelope header: everything a reader needs to find and check the DEK."""

    kms_key_id: str
    wrapped_dek: bytes = field(repr=False)
    dek_id: bytes
    encryption_context: Mapping[str, str]
    signing_key_id: str
    signature: bytes = field(default=b"", repr=False)
    version: int = FORMAT_VERSION
    alg: str = ALGORITHM


def _sorted_context(context: Mapping[str, str]) -> dict[str, str]:
    """Keys in ascending UTF-8 byte order, as the signed bytes S require."""
    return dict(sorted(context.items(), key=lambda item: item[0].encode("utf-8")))


def encode_header(header: Header) -> bytes:
    """Avro binary encoding of `Header`; the context map is one block with sorted keys."""
    buffer = io.BytesIO()
    fastavro.schemaless_writer(
        buffer,
        HEADER_SCHEMA,
        {
            "version": header.version,
            "alg": header.alg,
            "kms_key_id": header.kms_key_id,
            "wrapped_dek": header.wrapped_dek,
            "dek_id": header.dek_id,
            "encryption_context": _sorted_context(header.encryption_context),
            "signing_key_id": header.signing_key_id,
            "signature": header.signature,
        },
    )
    return buffer.getvalue()


def signed_bytes(header: Header) -> bytes:
    """S: the header encoded with an empty signature. This is what the signing key signs."""
    return encode_header(replace(header, signature=b""))


def aad_prefix(signed: bytes) -> bytes:
    """The per-DEK part of the AAD: `b"envpipe.v1" || SHA-256(S)`."""
    return AAD_LABEL + hashlib.sha256(signed).digest()


def record_key_suffix(key: bytes | None) -> bytes:
    """The per-record part of the AAD: 0x00 for a null key, else 0x01 || key."""
    return b"\x00" if key is None else b"\x01" + key


def aad(signed: bytes, key: bytes | None) -> bytes:
    """The full AAD for one record, straight from the contract's definition."""
    return aad_prefix(signed) + record_key_suffix(key)


def encode_long(value: int) -> bytes:
    """Avro `long`: zig-zag, then base-128 varint, least significant group first."""
    number = (value << 1) ^ (value >> 63)
    out = bytearray()
    while number & ~0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _long_size(value: int) -> int:
    """Bytes in the minimal varint of a non-negative Avro long."""
    return max(1, ((value << 1).bit_length() + 6) // 7)


def encode_record(header_bytes: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    """One envelope: header bytes, nonce, Avro `bytes` ciphertext. No per-record Avro writer."""
    return b"".join((header_bytes, nonce, encode_long(len(ciphertext)), ciphertext))


def _read_long(data: bytes, offset: int) -> tuple[int, int]:
    """Decode an Avro long at `offset`; returns (value, next offset). Bounded to 10 bytes."""
    result = shift = 0
    for index in range(offset, min(offset + 10, len(data))):
        byte = data[index]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), index + 1
        shift += 7
    raise DecryptionError(Reason.MALFORMED)


def split_body(value: bytes, header_length: int) -> tuple[bytes, bytes]:
    """(nonce, ciphertext) after a header of known length; the ciphertext must end the value."""
    nonce_end = header_length + NONCE_SIZE
    length, start = _read_long(value, nonce_end)
    if length < 0 or start + length != len(value) or start - nonce_end != _long_size(length):
        raise DecryptionError(Reason.MALFORMED)
    return value[header_length:nonce_end], value[start:]


#: A first varint above this is not a future version but something that is not an envelope.
_MAX_PLAUSIBLE_VERSION = 255
# What fastavro's reader raises on input that is not an envelope.
_PARSE_ERRORS = (EOFError, ValueError, IndexError, KeyError, TypeError, OverflowError)


def decode_header(value: bytes) -> tuple[Header, int]:
    """Parse the header at the start of `value`; returns (header, its encoded length).

    The version is read first, so a future format gets `unknown_version`; anything else
    that is not a v1 header (plaintext JSON, random bytes, truncation) is `malformed`.
    """
    version, _ = _read_long(value, 0)
    if version != FORMAT_VERSION:
        plausible = 0 < version <= _MAX_PLAUSIBLE_VERSION
        raise DecryptionError(Reason.UNKNOWN_VERSION if plausible else Reason.MALFORMED)
    stream = io.BytesIO(value)
    try:
        raw = fastavro.schemaless_reader(stream, HEADER_SCHEMA, None)
    except _PARSE_ERRORS as exc:
        raise DecryptionError(Reason.MALFORMED) from exc
    if not isinstance(raw, dict) or len(raw["dek_id"]) != DEK_ID_SIZE:
        raise DecryptionError(Reason.MALFORMED)
    header = Header(
        version=raw["version"],
        alg=raw["alg"],
        kms_key_id=raw["kms_key_id"],
        wrapped_dek=raw["wrapped_dek"],
        dek_id=raw["dek_id"],
        encryption_context=raw["encryption_context"],
        signing_key_id=raw["signing_key_id"],
        signature=raw["signature"],
    )
    length = stream.tell()
    if encode_header(header) != value[:length]:
        # Same meaning, other bytes (a negative enum index, a non-minimal varint, an
        # unsorted context): refuse, so an envelope has exactly one encoding.
        raise DecryptionError(Reason.MALFORMED)
    return header, length


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed envelope: the header, where it ends, the nonce and the ciphertext."""

    header: Header
    header_bytes: bytes
    nonce: bytes
    ciphertext: bytes


def decode_envelope(value: bytes) -> Envelope:
    """Parse a whole envelope (the slow path, used once per header a reader has not seen)."""
    header, header_length = decode_header(value)
    nonce, ciphertext = split_body(value, header_length)
    return Envelope(header, value[:header_length], nonce, ciphertext)
