"""The read side's knob-free top layer: `Decryptor.open` and `Decryptor.open_many`.

Both wire formats are read on the same topic, told apart by the first byte (0x02 v1, 0x04
v2). Whatever the format, a header goes through the same checks in the same order: both key
ids against the allowlists, the signature verified locally (`pipeline.trust`), and only then
one unwrap per DEK, cached (`pipeline.cache`). A forged or foreign header costs no unwrap.

A v2 record's header comes from a `HeaderSource` (the keys topic). A `dek_id` whose header has
not arrived is retriable (`HeaderPendingError`: the caller pauses and retries) for
`keys_wait_seconds` from when it was first missed, then `header_missing`.

Every way a record can fail to open is one `DecryptionError` with a reason code. A service
outage is a retriable `KmsError` instead, so a worker pauses rather than dead-lettering good
records.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

from pipeline import envelope, envelope_v2
from pipeline.aead import DEK_SIZE, Opener
from pipeline.avro import read_long
from pipeline.cache import DecryptDekCache
from pipeline.config import Settings, env_name
from pipeline.envelope import Header, decode_header, signed_bytes
from pipeline.errors import (
    ConfigError,
    DecryptionError,
    HeaderPendingError,
    KeyUnavailableError,
    KmsAccessDeniedError,
    KmsRequestError,
    Reason,
)
from pipeline.keyids import KeyAllowlist
from pipeline.trust import HeaderVerifier
from pipeline.types import EncryptionContext, HeaderSource, Kms

__all__ = ["Decryptor"]

log = logging.getLogger("envpipe.decrypt")

Record = tuple[bytes, bytes | None]  # (value, key)
_PLACEHOLDER = DecryptionError(Reason.MALFORMED)  # replaced before open_many returns
#: A first varint above this is not a future version but something that is not an envelope.
_MAX_PLAUSIBLE_VERSION = 255
_MAX_PENDING = 100_000


class Decryptor:
    """Opens envelopes: allowlists, local signature check, then (once per DEK) an unwrap."""

    def __init__(
        self,
        kms: Kms,
        *,
        allowed_kms_keys: Iterable[str],
        allowed_signing_keys: Iterable[str],
        cache: DecryptDekCache | None = None,
        header_source: HeaderSource | None = None,
        keys_wait_seconds: float = 30.0,
        negative_seconds: float = 10.0,
        recent_headers: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kms = kms
        self.verifier = HeaderVerifier(
            kms,
            allowed_kms_keys=KeyAllowlist(allowed_kms_keys),
            allowed_signing_keys=KeyAllowlist(allowed_signing_keys),
            negative_seconds=negative_seconds,
            clock=clock,
        )
        self.cache = cache if cache is not None else DecryptDekCache(clock=clock)
        self._keys_headers = _KeysTopicHeaders(header_source, keys_wait_seconds, clock)
        self._recent = _RecentPrefixes(recent_headers)

    @classmethod
    async def from_settings(
        cls, kms: Kms, settings: Settings, *, header_source: HeaderSource | None = None
    ) -> Decryptor:
        """A Decryptor whose allowlists default to the configured keys (resolved canonically).

        Public keys of the allowed signing keys are fetched here where they name one version,
        so a wrong allowlist fails at start with the setting's name, not on the first record.
        """
        kms_keys = await _allowlist(
            settings.allowed_kms_keys,
            settings.kms_key_id,
            "allowed_kms_keys",
            "kms_key_id",
            kms.resolve_wrapping_key,
        )
        signing_keys = await _allowlist(
            settings.allowed_signing_keys,
            settings.signing_key_id,
            "allowed_signing_keys",
            "signing_key_id",
            kms.resolve_signing_key,
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
            header_source=header_source,
            keys_wait_seconds=settings.keys_wait_seconds,
            negative_seconds=settings.negative_cache_seconds,
        )
        for key_id in signing_keys:
            if key_id.endswith("*") or (key_id.startswith("vault:") and key_id.count(":") == 2):
                continue  # a family of keys or of versions: each is fetched on first sight
            try:
                await decryptor.verifier.public_key(key_id)
            except KmsRequestError as exc:
                raise ConfigError(
                    env_name("allowed_signing_keys"),
                    f"cannot fetch the public key of {key_id}: {exc}",
                ) from exc
        return decryptor

    @property
    def allowed_kms_keys(self) -> KeyAllowlist:
        return self.verifier.allowed_kms_keys

    @property
    def allowed_signing_keys(self) -> KeyAllowlist:
        return self.verifier.allowed_signing_keys

    async def open(self, value: bytes, key: bytes | None = None) -> bytes:
        """The plaintext of one envelope, or `DecryptionError` with a reason code."""
        (result,) = await self.open_many([(value, key)])
        if isinstance(result, DecryptionError):
            raise result
        return result

    async def open_many(self, records: Iterable[Record]) -> list[bytes | DecryptionError]:
        """Open a batch; a record that fails yields its `DecryptionError` in its place.

        Records whose DEK is cached open at once; the distinct unseen headers are verified
        and unwrapped concurrently, so one slow call does not serialize the batch. A retriable
        error (service down, a v2 header not arrived yet) fails the whole call, so the caller
        can retry the batch.
        """
        batch = records if isinstance(records, Sequence) else list(records)
        openers = await self._openers(batch)
        first = openers[0] if openers else None
        if isinstance(first, Opener) and openers.count(first) == len(openers):
            return first.open_many(batch)  # the common case: the whole batch under one DEK
        return [
            opener if isinstance(opener, DecryptionError) else _open_with(opener, value, key)
            for opener, (value, key) in zip(openers, batch, strict=True)
        ]

    async def open_many_with_context(
        self, records: Iterable[Record]
    ) -> list[tuple[bytes, Mapping[str, str]] | DecryptionError]:
        """`open_many`, with each record's verified encryption context beside its plaintext."""
        batch = records if isinstance(records, Sequence) else list(records)
        results: list[tuple[bytes, Mapping[str, str]] | DecryptionError] = []
        for opener, (value, key) in zip(await self._openers(batch), batch, strict=True):
            if isinstance(opener, DecryptionError):
                results.append(opener)
                continue
            opened = _open_with(opener, value, key)
            results.append(
                opened if isinstance(opened, DecryptionError) else (opened, opener.context)
            )
        return results

    async def _openers(self, batch: Sequence[Record]) -> list[Opener | DecryptionError]:
        """The opener of every record (or why it has none), loading unseen prefixes at once."""
        openers, unseen = _known_openers(batch, self._recent_opener, self.cache.stats)
        loaded = await asyncio.gather(
            *(self._load(prefix, header) for prefix, (header, _) in unseen.items()),
            return_exceptions=True,
        )
        for (_, indexes), outcome in zip(unseen.values(), loaded, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, DecryptionError):
                raise outcome
            for index in indexes:
                openers[index] = outcome
        return openers

    async def check_header(self, header: Header) -> Reason | None:
        """Allowlists and the local signature check; None if the header is trustworthy."""
        return await self.verifier.check(header, hashlib.sha256(signed_bytes(header)).digest())

    def _recent_opener(self, value: bytes) -> Opener | None:
        """Match the value against recently verified prefixes before any parsing."""
        prefix = self._recent.find(value)
        return None if prefix is None else self.cache.get(prefix)

    async def _load(self, prefix: bytes, header: Header | None) -> Opener:
        """The opener for a record prefix: cached, or admitted once (single-flight)."""
        opener = self.cache.get(prefix) or await self.cache.load(
            prefix, lambda: self._admit(prefix, header)
        )
        self._recent.note(prefix)
        return opener

    async def _admit(self, prefix: bytes, header: Header | None) -> Opener:
        """Verify, then unwrap. `header` is None for v2: it is looked up in the keys topic."""
        label = envelope.AAD_LABEL
        if header is None:
            header, label = self._keys_headers.get(prefix[1:]), envelope_v2.AAD_LABEL
        signed = signed_bytes(header)
        digest = hashlib.sha256(signed).digest()
        reason = await self.verifier.check(header, digest)
        if reason is not None:
            raise DecryptionError(reason)
        context = EncryptionContext.of(header.encryption_context)
        try:
            dek = await self.kms.unwrap(header.kms_key_id, header.wrapped_dek, context)
        except KeyUnavailableError as exc:
            raise DecryptionError(Reason.KEY_UNAVAILABLE) from exc
        except KmsAccessDeniedError as exc:
            # One key's policy may shut this reader out (a revoked tenant) while the others
            # still open, and AWS also answers so for some blobs it cannot read: the record
            # is dead-lettered, and the log says which permission to grant if it was meant.
            log.warning("an unwrap was refused (%s); dead-lettering as unwrap_failed", exc)
            raise DecryptionError(Reason.UNWRAP_FAILED) from exc
        except KmsRequestError as exc:
            raise DecryptionError(Reason.UNWRAP_FAILED) from exc
        if len(dek) != DEK_SIZE:
            raise DecryptionError(Reason.UNWRAP_FAILED)
        return Opener(dek, prefix, label + digest, header.encryption_context)

    async def close(self) -> None:
        """Drop every unwrapped DEK."""
        self.cache.clear()


class _KeysTopicHeaders:
    """v2 headers from the keys topic; a `dek_id` not there yet is retriable for a while."""

    def __init__(
        self, source: HeaderSource | None, wait_seconds: float, clock: Callable[[], float]
    ) -> None:
        self._source = source
        self._wait_seconds = wait_seconds
        self._clock = clock
        self._first_missed: OrderedDict[bytes, float] = OrderedDict()

    def get(self, dek_id: bytes) -> Header:
        """The verified-to-be-canonical keys-topic header of a v2 `dek_id`, or why not."""
        found = self._source.get(dek_id) if self._source is not None else None
        if found is not None:
            self._first_missed.pop(dek_id, None)
            return envelope_v2.decode_keys_header(found, dek_id)
        now = self._clock()
        first = self._first_missed.setdefault(dek_id, now)
        while len(self._first_missed) > _MAX_PENDING:
            self._first_missed.popitem(last=False)
        if self._source is None or now - first >= self._wait_seconds:
            raise DecryptionError(Reason.HEADER_MISSING)
        raise HeaderPendingError(
            f"a v2 record's header (dek_id {dek_id.hex()}) is not in the keys topic yet; "
            f"waiting up to {self._wait_seconds:g}s (ENVPIPE_KEYS_WAIT_SECONDS)"
        )


class _RecentPrefixes:
    """The prefixes of the last few DEKs opened, most recent first: a record is matched
    against them before any parsing (in v1 its whole header is the prefix)."""

    __slots__ = ("_limit", "_prefixes")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._prefixes: list[bytes] = []

    def find(self, value: bytes) -> bytes | None:
        for prefix in self._prefixes:
            if value.startswith(prefix):
                return prefix
        return None

    def note(self, prefix: bytes) -> None:
        prefixes = self._prefixes
        if prefix in prefixes:
            prefixes.remove(prefix)
        prefixes.insert(0, prefix)
        del prefixes[self._limit :]


_Unseen = dict[bytes, tuple[Header | None, list[int]]]


def _known_openers(
    batch: Sequence[Record],
    recent_opener: Callable[[bytes], Opener | None],
    stats: Counter[str],
) -> tuple[list[Opener | DecryptionError], _Unseen]:
    """The openers of the records whose DEK is at hand; the other records' prefixes (with
    their v1 header, and the records' indexes) to load. A placeholder marks those records.

    Records under one DEK come in runs: the previous record's opener, fresh from the cache a
    moment ago, serves the rest of its run (each record still counts as a cache hit).
    """
    openers: list[Opener | DecryptionError] = []
    unseen: _Unseen = {}
    last: Opener | None = None
    reused = 0
    for index, (value, _) in enumerate(batch):
        if last is not None and value.startswith(last.prefix):
            openers.append(last)
            reused += 1
            continue
        opener = recent_opener(value)
        if opener is not None:
            openers.append(opener)
            last = opener
            continue
        openers.append(_PLACEHOLDER)
        prefix = next((seen for seen in unseen if value.startswith(seen)), None)
        if prefix is None:
            try:
                prefix, header = _prefix_of(value)
            except DecryptionError as exc:
                openers[index] = exc
                continue
            unseen[prefix] = (header, [])
        unseen[prefix][1].append(index)
    if reused:
        stats["hit"] += reused
    return openers, unseen


def _prefix_of(value: bytes) -> tuple[bytes, Header | None]:
    """The part of `value` every record under its DEK shares, and the v1 header if v1."""
    first = value[:1]
    if first == bytes((envelope_v2.V1_FIRST_BYTE,)):
        header, length = decode_header(value)
        return value[:length], header
    if first == bytes((envelope_v2.FIRST_BYTE,)):
        envelope_v2.decode_record(value)  # malformed at once, before any lookup
        return value[: envelope_v2.PREFIX_SIZE], None
    version, _ = read_long(value, 0)
    plausible = 0 < version <= _MAX_PLAUSIBLE_VERSION
    raise DecryptionError(Reason.UNKNOWN_VERSION if plausible else Reason.MALFORMED)


def _open_with(opener: Opener, value: bytes, key: bytes | None) -> bytes | DecryptionError:
    try:
        return opener.open_value(value, key)
    except DecryptionError as exc:
        return exc


async def _allowlist(
    listed: Sequence[str],
    configured: str,
    list_name: str,
    key_name: str,
    resolve: Callable[[str], Awaitable[str]],
) -> list[str]:
    """The configured allowlist, or the configured key resolved to its canonical id."""
    if listed:
        return list(listed)
    if not configured:
        raise ConfigError(
            env_name(list_name),
            f"is empty: list the accepted canonical key ids, or set {env_name(key_name)}",
        )
    if "{" in configured:
        raise ConfigError(
            env_name(list_name),
            f"must be set: {env_name(key_name)} is a template ({configured}), so list the "
            "canonical ids (or an id prefix ending in *) readers accept",
        )
    try:
        canonical = await resolve(configured)
    except KmsRequestError as exc:
        raise ConfigError(env_name(key_name), f"{configured}: {exc}") from exc
    if list_name == "allowed_signing_keys" and canonical.startswith("vault:"):
        canonical = ":".join(canonical.split(":")[:3])  # every version of the configured key
    return [canonical]
