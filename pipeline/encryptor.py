"""The write side's knob-free top layer: `Encryptor.seal` and `Encryptor.seal_many`.

The service is asked for a data key and a header signature once per DEK, never per record:
three calls per DEK (generate-and-wrap, resolve the signing key, sign), in the background
ahead of need (`pipeline.cache`). The signing key is resolved again for every new DEK and the
wrapping key is named by its configured alias, so a re-pointed alias or a rotated key is in
use within one `dek_max_age_seconds`, without a restart. Each DEK's signature is verified
locally before the DEK is used (`pipeline.trust`).

`kms_key_id` may be a template (`alias/tenant-{header:tenant}`): every filled key gets DEKs
and signed headers of its own, in an LRU of `cache_size` live (key, context) entries. A record
whose placeholder cannot be filled, or whose per-record key the service reports gone, is a
`SealError` in its place; a fixed key that is gone stops the caller instead, because sending
every record to a plaintext dead-letter topic would be worse than waiting.

In v2 (`format="v2"`) each DEK's header is published to a `HeaderSink` and acknowledged before
the DEK seals its first record; a fetch-ahead DEK is published ahead too.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from operator import itemgetter
from typing import Literal, cast

from pipeline import envelope, envelope_v2
from pipeline.aead import Sealer
from pipeline.cache import DekPolicy, EncryptDekCache
from pipeline.config import Settings, env_name, require
from pipeline.envelope import DEK_ID_SIZE, STREAM_CONTEXT_KEY, Header, encode_header, signed_bytes
from pipeline.errors import (
    ConfigError,
    KeyUnavailableError,
    KmsRequestError,
    Reason,
    SealError,
)
from pipeline.keyids import KeyAllowlist, KeyTemplate
from pipeline.trust import HeaderVerifier
from pipeline.types import EncryptionContext, HeaderSink, Kms

__all__ = ["Encryptor", "Format", "Record", "stream_context"]

Record = tuple[bytes, bytes | None]  # (value, key)
Headers = Sequence[tuple[str, bytes]]
Format = Literal["v1", "v2"]
_Slot = tuple[str, tuple[tuple[str, str], ...]]
#: Encoded contexts kept for reuse (a rewrap meets one per source stream).
_MAX_CONTEXTS = 10_000
_value_of = itemgetter(0)


def stream_context(stream: str) -> dict[str, str]:
    """The default encryption context: the stream's name, bound into every wrapped DEK."""
    return {STREAM_CONTEXT_KEY: stream}


def policy_from_settings(settings: Settings) -> DekPolicy:
    """The DEK limits and retry bounds the settings name."""
    return DekPolicy(
        max_age_seconds=settings.dek_max_age_seconds,
        max_records=settings.dek_max_records,
        max_bytes=settings.dek_max_bytes,
        refresh_at=settings.dek_refresh_at,
        grace_seconds=settings.dek_grace_seconds,
        retry_max_seconds=settings.kms_retry_max_seconds,
    )


class _Contexts:
    """Encryption contexts built once per stream or context: the record path neither sorts
    nor encodes one. Bounded, oldest first out."""

    def __init__(self) -> None:
        self._built: dict[object, tuple[tuple[tuple[str, str], ...], EncryptionContext]] = {}

    def lookup(
        self, context: Mapping[str, str] | None, stream: str
    ) -> tuple[tuple[tuple[str, str], ...], EncryptionContext]:
        """(sorted items, encoded context) for `context`, or for `stream`'s default one."""
        key: object = stream if context is None else tuple(sorted(context.items()))
        found = self._built.get(key)
        if found is None:
            pairs = stream_context(stream) if context is None else dict(context)
            found = self._built[key] = (tuple(sorted(pairs.items())), EncryptionContext.of(pairs))
            while len(self._built) > _MAX_CONTEXTS:
                self._built.pop(next(iter(self._built)))
        return found


class Encryptor:
    """Seals record values under service-wrapped DEKs, one signed header per DEK."""

    def __init__(
        self,
        kms: Kms,
        *,
        kms_key_id: str,
        signing_key_id: str,
        stream: str,
        policy: DekPolicy | None = None,
        cache_size: int = 1000,
        format: Format = "v1",
        header_sink: HeaderSink | None = None,
        cache: EncryptDekCache | None = None,
    ) -> None:
        if format == "v2" and header_sink is None:
            raise ConfigError(
                env_name("format"), "v2 needs a keys topic to publish headers to (header_sink)"
            )
        self.kms = kms
        self.template = KeyTemplate.parse(kms_key_id)
        self.signing_key_id = signing_key_id
        self.stream = stream
        self.format = format
        self.cache = (
            cache
            if cache is not None
            else EncryptDekCache(policy or DekPolicy(), max_contexts=cache_size)
        )
        self._sink = header_sink
        self._verifier = HeaderVerifier(
            kms, allowed_kms_keys=KeyAllowlist(()), allowed_signing_keys=KeyAllowlist(())
        )
        self._contexts = _Contexts()
        #: set once the configured signing key turns out canonical: nothing to re-resolve
        self._stable_signing_key: str | None = None

    @classmethod
    async def from_settings(
        cls, kms: Kms, settings: Settings, *, stream: str, header_sink: HeaderSink | None = None
    ) -> Encryptor:
        """An Encryptor for `stream` with the configured keys, format and DEK limits.

        The signing key (and a fixed wrapping key) are resolved here, so a wrong name fails at
        start with the setting's name rather than on the first record.
        """
        encryptor = cls(
            kms,
            kms_key_id=require(settings, "kms_key_id", "name the key that wraps data keys"),
            signing_key_id=require(settings, "signing_key_id", "name the header signing key"),
            stream=stream,
            policy=policy_from_settings(settings),
            cache_size=settings.encrypt_cache_size,
            format="v2" if settings.format == "v2" else "v1",
            header_sink=header_sink,
        )
        await encryptor.check_keys()
        return encryptor

    async def check_keys(self) -> None:
        """Resolve the configured keys once; ConfigError naming the setting if one is wrong."""
        checks = [("signing_key_id", self.signing_key_id, True)]
        if self.template.is_fixed:
            checks.append(("kms_key_id", self.template.text, False))
        for name, key, signing in checks:
            try:
                if signing:
                    await self._verifier.public_key(await self._signing_key())
                else:
                    await self.kms.resolve_wrapping_key(key)
            except KmsRequestError as exc:
                raise ConfigError(env_name(name), f"{key}: {exc}") from exc

    async def seal(
        self,
        value: bytes,
        key: bytes | None = None,
        *,
        headers: Headers | None = None,
        context: Mapping[str, str] | None = None,
        stream: str | None = None,
    ) -> bytes:
        """Seal one record value; `key` is the Kafka record key, bound by the AAD.

        `headers` fill `{header:NAME}` placeholders. The encryption context is `context` if
        given, else `{"envpipe:stream": stream}` (default: this Encryptor's stream). Raises
        `SealError` if the record cannot be sealed.
        """
        slot, encryption_context = self._slot(key, headers, context, stream)
        sealer = self.cache.try_reserve(slot, len(value)) or await self._reserve(
            slot, encryption_context, len(value)
        )
        return sealer.seal(value, key)

    async def seal_many(
        self,
        records: Iterable[Record],
        *,
        headers: Sequence[Headers | None] | None = None,
        contexts: Sequence[Mapping[str, str]] | None = None,
        stream: str | None = None,
    ) -> list[bytes | SealError]:
        """Seal a batch of (value, key) records, in order; a `SealError` in place of each
        record that cannot be sealed. `headers` and `contexts`, if given, have one entry per
        record (see `seal`)."""
        batch = records if isinstance(records, Sequence) else list(records)
        if self.template.is_fixed and contexts is None:
            slot, _ = self._slot(None, None, None, stream)
            nbytes = sum(map(len, map(_value_of, batch)))
            whole = self.cache.try_reserve(slot, nbytes, len(batch))
            if whole is not None:  # the whole batch under the current DEK: one tight loop
                return cast("list[bytes | SealError]", whole.seal_many(batch))
        sealed: list[bytes | SealError] = []
        for index, (value, key) in enumerate(batch):
            try:
                sealed.append(
                    await self.seal(
                        value,
                        key,
                        headers=headers[index] if headers else None,
                        context=contexts[index] if contexts else None,
                        stream=stream,
                    )
                )
            except SealError as exc:
                sealed.append(exc)
        return sealed

    def _slot(
        self,
        key: bytes | None,
        headers: Headers | None,
        context: Mapping[str, str] | None,
        stream: str | None,
    ) -> tuple[_Slot, EncryptionContext]:
        """The cache slot of a record, (filled key name, context items), and its context."""
        items, encryption_context = self._contexts.lookup(context, stream or self.stream)
        return (self.template.fill(key, headers), items), encryption_context

    async def _reserve(self, slot: _Slot, context: EncryptionContext, nbytes: int) -> Sealer:
        try:
            return await self.cache.reserve(slot, lambda: self._mint(slot[0], context), nbytes)
        except KeyUnavailableError as exc:
            if self.template.is_fixed:
                raise
            raise SealError(Reason.KEY_UNAVAILABLE, f": {slot[0]} is unavailable") from exc

    async def _mint(self, key_name: str, context: EncryptionContext) -> Sealer:
        """Three service calls per DEK in two round trips: generate-and-wrap beside resolving
        the signing key, then sign S."""
        data_key, signing_key = await asyncio.gather(  # independent: one round trip for both
            self.kms.generate_data_key(key_name, context), self._signing_key()
        )
        dek_id = secrets.token_bytes(DEK_ID_SIZE)
        v2 = self.format == "v2"
        header = Header(
            kms_key_id=data_key.key_id,
            wrapped_dek=data_key.wrapped,
            dek_id=dek_id,
            encryption_context=dict(context.pairs),
            signing_key_id=signing_key,
            version=envelope_v2.FORMAT_VERSION if v2 else envelope.FORMAT_VERSION,
        )
        signed = signed_bytes(header)
        digest = hashlib.sha256(signed).digest()
        signature = await self.kms.sign(signing_key, signed, digest)
        await self._verifier.verify_own(signing_key, signature, digest)
        header_bytes = encode_header(replace(header, signature=signature))
        if v2:
            assert self._sink is not None  # noqa: S101 - checked in __init__
            await self._sink.publish(dek_id, header_bytes)
            prefix, label = envelope_v2.record_prefix(dek_id), envelope_v2.AAD_LABEL
        else:
            prefix, label = header_bytes, envelope.AAD_LABEL
        return Sealer(data_key.plaintext, prefix, label + digest, header_bytes)

    async def _signing_key(self) -> str:
        """The signing key's canonical id as of now: resolved again for every new DEK (so a
        re-pointed alias or a rotated Vault key signs the next one), unless it is canonical."""
        if self._stable_signing_key is not None:
            return self._stable_signing_key
        resolved = await self.kms.resolve_signing_key(self.signing_key_id)
        if resolved == self.signing_key_id:
            self._stable_signing_key = resolved
        return resolved

    async def close(self) -> None:
        """Stop background DEK refreshes and drop every DEK."""
        await self.cache.close()
