"""AES-256-GCM for one DEK: the AESGCM object and the per-DEK AAD prefix are built once.

A `Sealer` owns the nonce sequence of its DEK: a counter from a random 96-bit start, so a
nonce never repeats under one key for up to 2^96 records (the DEK cache retires keys long
before, at `dek_max_records` <= 2^32). An `Opener` is the read side's twin.

Both formats share this code: a record is `prefix || nonce || length || ciphertext`, where
the prefix is the whole encoded header in v1 and the version byte plus `dek_id` in v2, and
the AAD is `label || SHA-256(S) || k` with the format's label. Pure: no IO, no clock.

This is the per-record path, so it is written for speed (measured with py-spy on the workers,
see `benchmarks.profile_worker`): `Sealer.seal_many` seals a batch in one loop with its
lookups hoisted, and the Avro length of a ciphertext (the same for every record of one size)
is encoded once per size, not per record; `Opener.open_value` checks a record's length bytes
against the one canonical encoding its size allows instead of decoding them.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.avro import encode_long, long_size
from pipeline.envelope import NONCE_SIZE, record_key_suffix, split_body
from pipeline.errors import DecryptionError, Reason

DEK_SIZE = 32
_NONCE_MASK = (1 << (8 * NONCE_SIZE)) - 1
_TAG_SIZE = 16
#: ciphertext lengths below this have their Avro length encoded once, then looked up
_CACHED_LENGTHS = 1 << 15
_LENGTHS: dict[int, bytes] = {}
#: (prefix length, record length) -> (ciphertext start, its length's only canonical bytes),
#: or None where no ciphertext length fits; bounded (few prefix lengths exist: v2's, and
#: v1's for each provider's header size)
_BODIES: dict[tuple[int, int], tuple[int, bytes] | None] = {}
_MAX_BODIES = 1 << 16
_UNSEEN = (-1, b"")


def _avro_length(length: int) -> bytes:
    """The Avro encoding of a ciphertext length, from a table filled on first use."""
    encoded = _LENGTHS.get(length)
    if encoded is None:
        encoded = encode_long(length)
        if length < _CACHED_LENGTHS:
            _LENGTHS[length] = encoded
    return encoded


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
        return self.seal_many(((plaintext, key),))[0]

    def seal_many(self, records: Iterable[tuple[bytes, bytes | None]]) -> list[bytes]:
        """`seal` for each (plaintext, key), in order, with consecutive nonces."""
        encrypt, prefix, join = self._aesgcm.encrypt, self.prefix, b"".join
        aad_null, aad_keyed = self._aad_null, self._aad_keyed
        lengths, to_bytes = _LENGTHS, int.to_bytes
        counter = self._next_nonce
        sealed: list[bytes] = []
        append = sealed.append
        try:
            for plaintext, key in records:
                nonce = to_bytes(counter, NONCE_SIZE, "big")
                counter = (counter + 1) & _NONCE_MASK
                ciphertext = encrypt(nonce, plaintext, aad_null if key is None else aad_keyed + key)
                length = lengths.get(len(ciphertext)) or _avro_length(len(ciphertext))
                append(join((prefix, nonce, length, ciphertext)))
        finally:
            self._next_nonce = counter  # a nonce handed to encrypt is never used again
        return sealed


class Opener:
    """Opens records that start with `prefix` and whose verified header gave `aad_prefix`."""

    __slots__ = ("__weakref__", "_aad_keyed", "_aad_null", "_aesgcm", "context", "prefix")

    def __init__(
        self,
        dek: bytes,
        prefix: bytes,
        aad_prefix: bytes,
        context: Mapping[str, str] | None = None,
    ) -> None:
        self._aesgcm = _cipher(dek)
        self._aad_null = aad_prefix + record_key_suffix(None)
        self._aad_keyed = aad_prefix + record_key_suffix(b"")  # the key bytes follow
        self.prefix = prefix
        #: the verified header's encryption context (a rewrap seals under the same one)
        self.context: Mapping[str, str] = context or {}

    def open(self, nonce: bytes, ciphertext: bytes, key: bytes | None) -> bytes:
        """Plaintext, or `DecryptionError(bad_tag)` if anything bound by the AAD changed."""
        aad = self._aad_null if key is None else self._aad_keyed + key
        try:
            return self._aesgcm.decrypt(nonce, ciphertext, aad)
        except InvalidTag as exc:
            raise DecryptionError(Reason.BAD_TAG) from exc

    def open_value(self, value: bytes, key: bytes | None) -> bytes:
        """Plaintext of a whole record value that starts with `prefix`.

        `malformed` unless the nonce, the canonical length and a ciphertext ending the value
        follow the prefix (as `pipeline.envelope.split_body` checks); `bad_tag` as `open`.
        """
        opened = self.open_many(((value, key),))[0]
        if isinstance(opened, DecryptionError):
            raise opened
        return opened

    def open_many(
        self, records: Iterable[tuple[bytes, bytes | None]]
    ) -> list[bytes | DecryptionError]:
        """`open_value` for each (value, key) in one loop, a `DecryptionError` in place of each
        record that does not open."""
        decrypt, prefix_size = self._aesgcm.decrypt, len(self.prefix)
        aad_null, aad_keyed = self._aad_null, self._aad_keyed
        bodies = _BODIES
        opened: list[bytes | DecryptionError] = []
        append = opened.append
        for value, key in records:
            body = bodies.get((prefix_size, len(value)), _UNSEEN)
            if body is _UNSEEN:
                body = _remember_body(prefix_size, len(value))
            if body is not None and value[body[0] - len(body[1]) : body[0]] == body[1]:
                start = body[0]
                nonce_end = start - len(body[1])
                nonce, ciphertext = value[nonce_end - NONCE_SIZE : nonce_end], value[start:]
            else:
                try:
                    nonce, ciphertext = split_body(value, prefix_size)
                except DecryptionError as exc:
                    append(exc)
                    continue
            try:
                append(decrypt(nonce, ciphertext, aad_null if key is None else aad_keyed + key))
            except InvalidTag:
                append(DecryptionError(Reason.BAD_TAG))
        return opened


def _remember_body(prefix_size: int, size: int) -> tuple[int, bytes] | None:
    """`_body_of`, kept in the bounded table."""
    body = _body_of(prefix_size, size)
    if len(_BODIES) < _MAX_BODIES:
        _BODIES[prefix_size, size] = body
    return body


def _body_of(prefix_size: int, size: int) -> tuple[int, bytes] | None:
    """For a record of `size` bytes after a prefix: where its ciphertext starts and the one
    canonical encoding of its length (a shorter or longer varint cannot fit both); None if
    no ciphertext of at least a tag fits, which `split_body` then judges."""
    nonce_end = prefix_size + NONCE_SIZE
    for width in range(1, 11):
        length = size - nonce_end - width
        if length >= _TAG_SIZE and long_size(length) == width:
            return nonce_end + width, encode_long(length)
    return None
