"""The knob-free top layer: `Encryptor.seal` and `Decryptor.open`.

The encrypt side asks the KMS for a data key and a header signature once per DEK, never per
record. The read side checks both key ids against its allowlists and verifies the header
signature locally, with a cached public key, before it ever asks the KMS to unwrap: a forged
or foreign header costs no KMS call. Every way a record can fail to open is one
`DecryptionError` with a reason code; a KMS outage is a retriable `KmsError` instead, so a
worker pauses rather than dead-lettering good records.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from pipeline.aead import DEK_SIZE, Opener, Sealer
from pipeline.cache import DecryptDekCache, DekPolicy, EncryptDekCache
from pipeline.config import Settings, require
from pipeline.envelope import (
    DEK_ID_SIZE,
    STREAM_CONTEXT_KEY,
    Header,
    decode_header,
    encode_header,
    signed_bytes,
    split_body,
)
from pipeline.errors import ConfigError, DecryptionError, KmsRequestError, Reason
from pipeline.types import Kms

Record = tuple[bytes, bytes | None]  # (value, key)
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_PLACEHOLDER = DecryptionError(Reason.MALFORMED)  # replaced before open_many returns


def stream_context(stream: str) -> dict[str, str]:
    """The default encryption context: the stream's name, bound into every wrapped DEK."""
    return {STREAM_CONTEXT_KEY: stream}


class Encryptor:
    """Seals record values under KMS-generated DEKs, one signed header per DEK."""

    def __init__(
        self,
        kms: Kms,
        *,
        kms_key_id: str,
        signing_key_id: str,
        stream: str,
        policy: DekPolicy | None = None,
        cache: EncryptDekCache | None = None,
    ) -> None:
        self.kms = kms
        self.kms_key_id = kms_key_id
        self.signing_key_id = signing_key_id
        self.stream = stream
        self.cache = cache if cache is not None else EncryptDekCache(policy or DekPolicy())
        self._signing_arn: str | None = None
        self._contexts: dict[str, tuple[tuple[tuple[str, str], ...], dict[str, str]]] = {}

    @classmethod
    def from_settings(cls, kms: Kms, settings: Settings, *, stream: str) -> Encryptor:
        """An Encryptor for `stream` with the configured keys and DEK limits."""
        policy = DekPolicy(
            max_age_seconds=settings.dek_max_age_seconds,
            max_records=settings.dek_max_records,
            max_bytes=settings.dek_max_bytes,
            refresh_at=settings.dek_refresh_at,
            grace_seconds=settings.dek_grace_seconds,
            retry_max_seconds=settings.kms_retry_max_seconds,
        )
        return cls(
            kms,
            kms_key_id=require(settings, "kms_key_id", "name the KMS key that wraps data keys"),
            signing_key_id=require(settings, "signing_key_id", "name the header signing key"),
            stream=stream,
            policy=policy,
        )

    def _context(self, stream: str | None) -> tuple[tuple[tuple[str, str], ...], dict[str, str]]:
        name = stream or self.stream
        found = self._contexts.get(name)
        if found is None:
            context = stream_context(name)
            found = self._contexts[name] = (tuple(sorted(context.items())), context)
        return found

    async def seal(
        self, value: bytes, key: bytes | None = None, *, stream: str | None = None
    ) -> bytes:
        """Seal one record value; `key` is the Kafka record key, bound by the AAD."""
        cache_key, context = self._context(stream)
        sealer = self.cache.try_reserve(cache_key, len(value)) or await self.cache.reserve(
            cache_key, lambda: self._mint(context), len(value)
        )
        return sealer.seal(value, key)

    async def seal_many(
        self, records: Iterable[Record], *, stream: str | None = None
    ) -> list[bytes]:
        """Seal a batch of (value, key) records, in order."""
        cache_key, context = self._context(stream)
        batch = records if isinstance(records, Sequence) else list(records)
        whole = self.cache.try_reserve(cache_key, sum(len(value) for value, _ in batch), len(batch))
        if whole is not None:
            seal = whole.seal
            return [seal(value, key) for value, key in batch]
        sealed = []
        for value, key in batch:
            sealer = self.cache.try_reserve(cache_key, len(value)) or await self.cache.reserve(
                cache_key, lambda: self._mint(context), len(value)
            )
            sealed.append(sealer.seal(value, key))
        return sealed

    async def _mint(self, context: Mapping[str, str]) -> Sealer:
        """Two KMS calls per DEK: GenerateDataKey, then Sign over the header bytes S."""
        data_key = await self.kms.generate_data_key(self.kms_key_id, context)
        if self._signing_arn is None:
            self._signing_arn = await self.kms.resolve_key_id(self.signing_key_id)
        header = Header(
            kms_key_id=data_key.key_id,
            wrapped_dek=data_key.wrapped,
            dek_id=secrets.token_bytes(DEK_ID_SIZE),
            encryption_context=dict(context),
            signing_key_id=self._signing_arn,
        )
        signed = signed_bytes(header)
        signature = await self.kms.sign(self._signing_arn, signed)
        return Sealer(
            data_key.plaintext, encode_header(replace(header, signature=signature)), signed
        )

    async def close(self) -> None:
        """Stop background DEK refreshes and drop every DEK."""
        await self.cache.close()


class Decryptor:
    """Opens envelopes: allowlist, local signature check, then (once per DEK) KMS unwrap."""

    def __init__(
        self,
        kms: Kms,
        *,
        allowed_kms_keys: Iterable[str],
        allowed_signing_keys: Iterable[str],
        cache: DecryptDekCache | None = None,
        recent_headers: int = 8,
    ) -> None:
        self.kms = kms
        self.allowed_kms_keys = frozenset(allowed_kms_keys)
        self.allowed_signing_keys = frozenset(allowed_signing_keys)
        self.cache = cache if cache is not None else DecryptDekCache()
        self._public_keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._recent: list[bytes] = []
        self._recent_limit = recent_headers

    @classmethod
    async def from_settings(cls, kms: Kms, settings: Settings) -> Decryptor:
        """A Decryptor whose allowlists default to the configured keys (resolved to ARNs).

        Public keys of every allowed signing key are fetched here, so a wrong allowlist
        fails at start with the setting's name rather than on the first record.
        """
        kms_keys = await _resolve_allowlist(
            kms, settings.allowed_kms_keys, settings.kms_key_id, "allowed_kms_keys", "kms_key_id"
        )
        signing_keys = await _resolve_allowlist(
            kms,
            settings.allowed_signing_keys,
            settings.signing_key_id,
            "allowed_signing_keys",
            "signing_key_id",
        )
        decryptor = cls(
            kms,
            allowed_kms_keys=kms_keys,
            allowed_signing_keys=signing_keys,
            cache=DecryptDekCache(
                max_entries=settings.decrypt_cache_size,
                idle_seconds=settings.decrypt_cache_idle_seconds,
                negative_seconds=settings.negative_cache_seconds,
            ),
        )
        for key_id in signing_keys:
            try:
                await decryptor.public_key(key_id)
            except KmsRequestError as exc:
                raise ConfigError(
                    "ENVPIPE_ALLOWED_SIGNING_KEYS",
                    f"cannot fetch the public key of {key_id}: {exc}",
                ) from exc
        return decryptor

    async def open(self, value: bytes, key: bytes | None = None) -> bytes:
        """The plaintext of one envelope, or `DecryptionError` with a reason code."""
        opener = self._recent_opener(value) or await self._opener(value)
        nonce, ciphertext = split_body(value, len(opener.header_bytes))
        return opener.open(nonce, ciphertext, key)

    async def open_many(self, records: Sequence[Record]) -> list[bytes | DecryptionError]:
        """Open a batch; a record that fails yields its `DecryptionError` in its place.

        Records whose DEK is cached open at once; the distinct unseen headers are verified
        and unwrapped concurrently, so one slow KMS call does not serialize the batch. A
        retriable KMS error fails the whole call, so the caller can retry the batch.
        """
        results: list[bytes | DecryptionError] = []
        unseen: dict[bytes, tuple[Header, list[int]]] = {}
        for index, (value, key) in enumerate(records):
            opener = self._recent_opener(value)
            if opener is not None:
                results.append(_open_with(opener, value, key))
                continue
            results.append(_PLACEHOLDER)
            header_bytes = next((seen for seen in unseen if value.startswith(seen)), None)
            if header_bytes is None:
                try:
                    header, header_length = decode_header(value)
                except DecryptionError as exc:
                    results[index] = exc
                    continue
                header_bytes = value[:header_length]
                unseen[header_bytes] = (header, [])
            unseen[header_bytes][1].append(index)
        loaded = await asyncio.gather(
            *(self._load(header_bytes, header) for header_bytes, (header, _) in unseen.items()),
            return_exceptions=True,
        )
        for (_, indexes), outcome in zip(unseen.values(), loaded, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, DecryptionError):
                raise outcome
            for index in indexes:
                results[index] = (
                    outcome
                    if isinstance(outcome, DecryptionError)
                    else _open_with(outcome, *records[index])
                )
        return results

    def _recent_opener(self, value: bytes) -> Opener | None:
        """Match the value against recently verified headers before any parsing."""
        for header_bytes in self._recent:
            if value.startswith(header_bytes):
                return self.cache.get(header_bytes)
        return None

    async def _opener(self, value: bytes) -> Opener:
        header, header_length = decode_header(value)
        return await self._load(value[:header_length], header)

    async def _load(self, header_bytes: bytes, header: Header) -> Opener:
        """The opener for a parsed header: cached, or admitted once (single-flight)."""
        opener = self.cache.get(header_bytes) or await self.cache.load(
            header_bytes, lambda: self._admit(header, header_bytes)
        )
        recent = self._recent
        if opener.header_bytes in recent:
            recent.remove(opener.header_bytes)
        recent.insert(0, opener.header_bytes)
        del recent[self._recent_limit :]
        return opener

    async def check_header(self, header: Header) -> Reason | None:
        """Allowlists and the local signature check; None if the header is trustworthy.

        Costs no KMS call for a header that fails (public keys are fetched only for
        allowlisted signing keys, and then cached).
        """
        return await self._check(header, signed_bytes(header))

    async def _check(self, header: Header, signed: bytes) -> Reason | None:
        """`check_header` with the signed bytes S already encoded."""
        if (
            header.kms_key_id not in self.allowed_kms_keys
            or header.signing_key_id not in self.allowed_signing_keys
        ):
            return Reason.KEY_NOT_ALLOWED
        public_key = await self.public_key(header.signing_key_id)
        try:
            public_key.verify(header.signature, signed, _ECDSA_SHA256)
        except (InvalidSignature, ValueError):
            return Reason.BAD_SIGNATURE
        return None

    async def _admit(self, header: Header, header_bytes: bytes) -> Opener:
        signed = signed_bytes(header)  # once: for the signature check and the AAD
        reason = await self._check(header, signed)
        if reason is not None:
            raise DecryptionError(reason)
        try:
            dek = await self.kms.decrypt(
                header.kms_key_id, header.wrapped_dek, header.encryption_context
            )
        except KmsRequestError as exc:
            raise DecryptionError(Reason.UNWRAP_FAILED) from exc
        if len(dek) != DEK_SIZE:
            raise DecryptionError(Reason.UNWRAP_FAILED)
        return Opener(dek, header_bytes, signed)

    async def public_key(self, signing_key_id: str) -> ec.EllipticCurvePublicKey:
        """The cached public key of an allowlisted signing key (GetPublicKey once)."""
        public_key = self._public_keys.get(signing_key_id)
        if public_key is None:
            loaded = load_der_public_key(await self.kms.get_public_key(signing_key_id))
            if not isinstance(loaded, ec.EllipticCurvePublicKey):
                raise ConfigError(
                    "ENVPIPE_ALLOWED_SIGNING_KEYS", f"{signing_key_id} is not an ECC_NIST_P256 key"
                )
            public_key = self._public_keys[signing_key_id] = loaded
        return public_key

    def close(self) -> None:
        """Drop every unwrapped DEK."""
        self.cache.clear()


def _open_with(opener: Opener, value: bytes, key: bytes | None) -> bytes | DecryptionError:
    try:
        nonce, ciphertext = split_body(value, len(opener.header_bytes))
        return opener.open(nonce, ciphertext, key)
    except DecryptionError as exc:
        return exc


async def _resolve_allowlist(
    kms: Kms, listed: Sequence[str], configured: str, list_name: str, key_name: str
) -> frozenset[str]:
    names = listed or ((configured,) if configured else ())
    if not names:
        raise ConfigError(
            f"ENVPIPE_{list_name.upper()}",
            f"is empty: list the accepted key ARNs, or set ENVPIPE_{key_name.upper()}",
        )
    return frozenset([await kms.resolve_key_id(name) for name in names])
