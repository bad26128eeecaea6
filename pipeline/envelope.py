"""Wire format v1: the Avro envelope, the signed header bytes S and the AAD. Sans-IO.

The header codec here serves both formats: a v1 envelope starts with its header (version 1),
and a v2 keys-topic record is the same header with version 2 (`pipeline.envelope_v2`).

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

from pipeline.avro import encode_long, long_size, read_long, sorted_context
from pipeline.errors import DecryptionError, Reason

FORMAT_VERSION = 1
AAD_LABEL = b"envpipe.v1"
#: The Kafka record header naming the format of an envelope record, and its v1 value.
VERSION_HEADER_NAME = "envpipe.v"
VERSION_HEADER = (VERSION_HEADER_NAME, b"1")
#: The default encryption-context key that names the stream.
STREAM_CONTEXT_KEY = "envpipe:stream"


def schema_path(filename: str) -> Path:
    """The installed wheel carries a copy next to the package; a checkout has it at the top."""
    here = Path(__file__).resolve().parent
    for folder in (here / "schemas", here.parent / "schemas"):
        if (folder / filename).is_file():
            return folder / filename
    raise FileNotFoundError(f"schemas/{filename} not found beside the pipeline package")


SCHEMA_PATH = schema_path("envelope.avsc")
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
            "encryption_context": sorted_context(header.encryption_context),
            "signing_key_id": header.signing_key_id,
            "signature": header.signature,
        },
    )
    return buffer.getvalue()


def signed_bytes(header: Header) -> bytes:
    """S: the header encoded with an empty signature. This is what the signing key signs."""
    return encode_header(replace(header, signature=b""))


def aad_prefix(signed: bytes, label: bytes = AAD_LABEL) -> bytes:
    """The per-DEK part of the AAD: `label || SHA-256(S)` (label `envpipe.v1` or `envpipe.v2`)."""
    return label + hashlib.sha256(signed).digest()


def record_key_suffix(key: bytes | None) -> bytes:
    """The per-record part of the AAD: 0x00 for a null key, else 0x01 || key."""
    return b"\x00" if key is None else b"\x01" + key


def aad(signed: bytes, key: bytes | None) -> bytes:
    """The full AAD for one record, straight from the contract's definition."""
    return aad_prefix(signed) + record_key_suffix(key)


def encode_record(header_bytes: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    """One envelope: header bytes, nonce, Avro `bytes` ciphertext. No per-record Avro writer."""
    return b"".join((header_bytes, nonce, encode_long(len(ciphertext)), ciphertext))


def split_body(value: bytes, header_length: int) -> tuple[bytes, bytes]:
    """(nonce, ciphertext) after a header of known length; the ciphertext must end the value."""
    nonce_end = header_length + NONCE_SIZE
    length, start = read_long(value, nonce_end)
    if length < 0 or start + length != len(value) or start - nonce_end != long_size(length):
        raise DecryptionError(Reason.MALFORMED)
    return value[header_length:nonce_end], value[start:]


#: A first varint above this is not a future version but something that is not an envelope.
_MAX_PLAUSIBLE_VERSION = 255
# What fastavro's reader raises on input that is not an envelope.
_PARSE_ERRORS = (EOFError, ValueError, IndexError, KeyError, TypeError, OverflowError)


def decode_header(value: bytes, version: int = FORMAT_VERSION) -> tuple[Header, int]:
    """Parse the header at the start of `value`; returns (header, its encoded length).

    `version` is the one expected: 1 at the start of a v1 envelope, 2 for a v2 keys-topic
    header. It is read first, so a future format gets `unknown_version`; anything else that
    is not such a header (plaintext JSON, random bytes, truncation) is `malformed`.
    """
    found, _ = read_long(value, 0)
    if found != version:
        plausible = 0 < found <= _MAX_PLAUSIBLE_VERSION
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
