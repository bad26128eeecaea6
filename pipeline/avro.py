"""The few Avro binary encodings envpipe writes by hand, and the canonical context bytes C.

Pure functions, no IO. fastavro encodes whole headers; these serve the per-record fast path
(a varint per record) and the context bytes C that Vault and an HSM bind a wrapped DEK to:
the Avro encoding of the encryption-context map exactly as it appears inside the signed
header bytes S (one block, keys in ascending UTF-8 byte order, then the 0 terminator).
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.errors import DecryptionError, Reason

__all__ = [
    "encode_context",
    "encode_long",
    "encode_string",
    "long_size",
    "read_long",
    "sorted_context",
]

#: An Avro long takes at most 10 bytes; a longer varint is not Avro.
_MAX_LONG_BYTES = 10


def encode_long(value: int) -> bytes:
    """Avro `long`: zig-zag, then base-128 varint, least significant group first."""
    number = (value << 1) ^ (value >> 63)
    out = bytearray()
    while number & ~0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def long_size(value: int) -> int:
    """Bytes in the minimal varint of a non-negative Avro long."""
    return max(1, ((value << 1).bit_length() + 6) // 7)


def read_long(data: bytes, offset: int) -> tuple[int, int]:
    """Decode an Avro long at `offset`; returns (value, next offset). Bounded to 10 bytes.

    Anything that does not end within the data or the bound is `malformed`.
    """
    result = shift = 0
    for index in range(offset, min(offset + _MAX_LONG_BYTES, len(data))):
        byte = data[index]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), index + 1
        shift += 7
    raise DecryptionError(Reason.MALFORMED)


def encode_string(text: str) -> bytes:
    """Avro `string`: the UTF-8 length as a long, then the bytes."""
    data = text.encode("utf-8")
    return encode_long(len(data)) + data


def sorted_context(context: Mapping[str, str]) -> dict[str, str]:
    """Keys in ascending UTF-8 byte order, as the signed bytes S require."""
    return dict(sorted(context.items(), key=lambda item: item[0].encode("utf-8")))


def encode_context(context: Mapping[str, str]) -> bytes:
    """C: the context map as one Avro block with sorted keys, then 0 (empty map: b"\\x00")."""
    if not context:
        return b"\x00"
    parts = [encode_long(len(context))]
    for key, value in sorted_context(context).items():
        parts += (encode_string(key), encode_string(value))
    parts.append(b"\x00")
    return b"".join(parts)
