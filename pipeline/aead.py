"""AES-256-GCM for one DEK: the AESGCM object and the per-DEK AAD prefix are built once.

A `Sealer` owns the nonce sequence of its DEK: a counter from a random 96-bit start, so a
nonce never repeats under one key for up to 2^96 records (the DEK cache retires keys long
before, at `dek_max_records` <= 2^32). An `Opener` is the read side's twin.

Both formats share this code: a record is `prefix || nonce || length || ciphertext`, where
the prefix is the whole encoded header in v1 and the version byte plus `dek_id` in v2, and
the AAD is `label || SHA-256(S) || k` with the format's label. Pure: no IO, no clock.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.avro import encode_long
from pipeline.envelope import NONCE_SIZE, record_key_suffix
from pipeline.errors import DecryptionError, Reason

DEK_SIZE = 32
_NONCE_SPACE = 1 << (8 * NONCE_SIZE)


def _cipher(dek: bytes) -> AESGCM:
    if len(dek) != DEK_SIZE:
        raise ValueError(f"a data key must be {DEK_SIZE} bytes for AES-256-GCM")
    return AESGCM(dek)


class Sealer:
    """Seals records under one DEK whose header is already encoded and signed.

    `prefix` starts every record (v1: the header bytes; v2: version byte and dek_id);
    `aad_prefix` is `label || SHA-256(S)`; `header_bytes` the signed header itself.
    """

    __slots__ = (
        "__weakref__",
        "_aad_keyed",
        "_aad_null",
        "_aesgcm",
        "_next_nonce",
        "header_bytes",
        "prefix",
    )

    def __init__(self, dek: bytes, prefix: bytes, aad_prefix: bytes, header_bytes: bytes) -> None:
        self._aesgcm = _cipher(dek)
        self._aad_null = aad_prefix + record_key_suffix(None)
        self._aad_keyed = aad_prefix + record_key_suffix(b"")  # the key bytes follow
        self._next_nonce = secrets.randbits(8 * NONCE_SIZE)
        self.prefix = prefix
        self.header_bytes = header_bytes

    def seal(self, plaintext: bytes, key: bytes | None) -> bytes:
        """One record: prefix, fresh nonce, Avro-length-prefixed ciphertext."""
        counter = self._next_nonce
        self._next_nonce = (counter + 1) % _NONCE_SPACE
        nonce = counter.to_bytes(NONCE_SIZE, "big")
        aad = self._aad_null if key is None else self._aad_keyed + key
        ciphertext = self._aesgcm.encrypt(nonce, plaintext, aad)
        doubled = len(ciphertext) << 1  # Avro's zig-zag of a non-negative length
        if doubled < 0x4000:  # up to 8 KiB: one or two varint bytes, without the loop
            length = (
                bytes((doubled,))
                if doubled < 0x80
                else bytes(((doubled & 0x7F) | 0x80, doubled >> 7))
            )
        else:
            length = encode_long(len(ciphertext))
        return b"".join((self.prefix, nonce, length, ciphertext))


class Opener:
    """Opens records that start with `prefix` and whose verified header gave `aad_prefix`."""

    __slots__ = ("__weakref__", "_aad_prefix", "_aesgcm", "context", "prefix")

    def __init__(
        self,
        dek: bytes,
        prefix: bytes,
        aad_prefix: bytes,
        context: Mapping[str, str] | None = None,
    ) -> None:
        self._aesgcm = _cipher(dek)
        self._aad_prefix = aad_prefix
        self.prefix = prefix
        #: the verified header's encryption context (a rewrap seals under the same one)
        self.context: Mapping[str, str] = context or {}

    def open(self, nonce: bytes, ciphertext: bytes, key: bytes | None) -> bytes:
        """Plaintext, or `DecryptionError(bad_tag)` if anything bound by the AAD changed."""
        try:
            return self._aesgcm.decrypt(
                nonce, ciphertext, self._aad_prefix + record_key_suffix(key)
            )
        except InvalidTag as exc:
            raise DecryptionError(Reason.BAD_TAG) from exc
