"""Wire format v2, compact: the signed header lives once per DEK in a keys topic. Sans-IO.

A v2 record value is the Avro encoding of `schemas/envelope_v2.avsc` (`envpipe.v2.Record`):
version 2 (so the first byte is 0x04, where v1 starts with 0x02), the 16-byte `dek_id`, the
12-byte nonce and the ciphertext. That is 1 + 16 + 12 + a length varint + the 16-byte GCM
tag: 47 bytes of overhead for values up to 8 KiB and at most 48 below 1 MiB.

The keys topic holds one record per DEK: key = `dek_id`, value = the v1 `Header` encoding
with version 2 (same schema, same signed bytes S, same signature rules). The AAD is
`b"envpipe.v2" || SHA-256(S) || k`, so a record cannot be moved between the formats.

As in v1 the schema is read, never re-typed: the constants the fast path needs are derived
from it at import time, so a schema edit that would break the byte layout fails loudly.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.avro import encode_long, read_long
from pipeline.envelope import (
    DEK_ID_SIZE,
    NONCE_SIZE,
    Header,
    decode_header,
    schema_path,
    split_body,
)
from pipeline.errors import DecryptionError, Reason

FORMAT_VERSION = 2
AAD_LABEL = b"envpipe.v2"
VERSION_HEADER = ("envpipe.v", b"2")
SCHEMA_PATH = schema_path("envelope_v2.avsc")
_RAW_SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))

#: The first byte of every v2 record value (Avro's zig-zag of version 2).
FIRST_BYTE = encode_long(FORMAT_VERSION)[0]
#: The first byte of a v1 envelope, for dispatch.
V1_FIRST_BYTE = encode_long(1)[0]


def _check_layout() -> int:
    """The length of the fixed prefix (version byte + dek_id), after checking the schema."""
    fields = [(f["name"], f["type"]) for f in _RAW_SCHEMA["fields"]]
    names = [name for name, _ in fields]
    if names != ["version", "dek_id", "nonce", "ciphertext"]:
        raise RuntimeError(
            f"envelope_v2.avsc fields are {names}; the v2 fast path needs this order"
        )
    sizes = {name: kind["size"] for name, kind in fields if isinstance(kind, dict)}
    if (sizes["dek_id"], sizes["nonce"]) != (DEK_ID_SIZE, NONCE_SIZE):
        raise RuntimeError("envelope_v2.avsc sizes differ from v1's DekId and Nonce")
    return len(encode_long(FORMAT_VERSION)) + DEK_ID_SIZE


PREFIX_SIZE = _check_layout()


def record_prefix(dek_id: bytes) -> bytes:
    """What every v2 record under one DEK starts with: the version byte and the dek_id."""
    return encode_long(FORMAT_VERSION) + dek_id


def decode_record(value: bytes) -> tuple[bytes, bytes, bytes]:
    """(dek_id, nonce, ciphertext) of a v2 record; `malformed` if it is not exactly one."""
    version, start = read_long(value, 0)
    if version != FORMAT_VERSION or len(value) < PREFIX_SIZE + NONCE_SIZE + 1:
        raise DecryptionError(Reason.MALFORMED)
    nonce, ciphertext = split_body(value, PREFIX_SIZE)
    return value[start:PREFIX_SIZE], nonce, ciphertext


def decode_keys_header(value: bytes, dek_id: bytes) -> Header:
    """The header a keys-topic record holds for `dek_id`.

    It must be one canonical v2 header with nothing after it, naming `dek_id` itself:
    anything else is `malformed` (a header filed under another dek_id included).
    """
    header, length = decode_header(value, FORMAT_VERSION)
    if length != len(value) or header.dek_id != dek_id:
        raise DecryptionError(Reason.MALFORMED)
    return header
