"""The transforms: how one direction changes a batch of records. Kafka lives in `workers.loop`.

    Transform   copies values unchanged (the benchmarks' passthrough baseline)
    Seal        encrypt: seal each value, add `envpipe.v`
    Open        decrypt: verify and open each envelope, drop `envpipe.v`
    Rewrap      open under the reader's allowlists, seal again under another key, keeping
                the encryption context, key, timestamp and headers

`values` maps a batch of consumed records with non-null values to outputs in the same order.
An output is the new value (bytes), or anything with a `reason` (a `DeadLetter`, a
`SealError`, a `DecryptionError`) for a record that goes to the dead-letter topic instead. A
retriable `EnvpipeError` fails the whole batch, which the worker holds and retries.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pipeline.config import Settings
from pipeline.decryptor import Decryptor
from pipeline.encryptor import Encryptor
from pipeline.errors import DecryptionError, EnvpipeError, Reason, SealError
from pipeline.kms import CountingKms, open_kms
from pipeline.types import HeaderSink, HeaderSource
from workers.contract import Headers, opened_headers, sealed_headers, version_header

__all__ = ["DeadLetter", "Open", "Outcome", "Rewrap", "Seal", "Transform"]

log = logging.getLogger("envpipe.stream")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A verdict that one record cannot be processed, and why (a reason code)."""

    reason: str


Outcome = bytes | DeadLetter | SealError | DecryptionError


class Transform:
    """How one direction changes records. This base class copies them (the benchmark baseline)."""

    direction = "passthrough"
    #: +1 if outputs are envelopes of the inputs, -1 if the inputs are envelopes, else 0.
    overhead_sign = 0
    #: whether the inputs may be v2 envelopes, whose headers are in the keys topic
    reads_headers = False

    def writes_headers(self, settings: Settings) -> bool:
        """Whether the outputs are v2 envelopes, whose headers go to the keys topic."""
        return False

    def drop_keys(self) -> None:
        """Forget every cached DEK now (SIGHUP), so a destroyed key stops working at once."""

    async def start(self, sink: HeaderSink | None, source: HeaderSource | None) -> None:
        """Acquire what the transform needs (service client, keys); retried while retriable.

        `sink` / `source` are the v2 keys topic, when the worker's format needs one.
        """

    async def values(self, records: Sequence[Any]) -> Sequence[Outcome]:
        """The output values of a batch of consumed records (values not None), in order."""
        return [record.value for record in records]

    def headers(self, headers: Headers) -> list[tuple[str, bytes]]:
        """The output headers of one record (aiokafka wants a list; runs once per record)."""
        return list(headers)

    @property
    def kms(self) -> CountingKms | None:
        """The counting service client once started; None for transforms without one."""
        return None

    @property
    def kms_calls(self) -> Counter[str]:
        """Service calls made so far, by operation."""
        return Counter(self.kms.calls) if self.kms is not None else Counter()

    @property
    def cache_stats(self) -> Counter[str]:
        """DEK cache events so far."""
        return Counter()

    async def close(self) -> None:
        """Release everything `start` acquired."""


class _KmsTransform(Transform):
    """A transform that holds the process's one (counting) service client.

    It opens the client itself, unless it is handed one to share (a rewrap's two halves);
    it closes only a client it opened.
    """

    def __init__(self, settings: Settings, client: CountingKms | None = None) -> None:
        self._settings = settings
        self._kms = client
        self._owns_client = client is None

    async def _open_kms(self) -> CountingKms:
        if self._kms is None:
            self._kms = CountingKms(await open_kms(self._settings))
        return self._kms

    @property
    def kms(self) -> CountingKms | None:
        return self._kms

    async def close(self) -> None:
        if self._kms is not None and self._owns_client:
            await self._kms.close()


class Seal(_KmsTransform):
    """Encrypt: seal each value under its key's current DEK; add the version header."""

    direction = "encrypt"
    overhead_sign = 1

    def writes_headers(self, settings: Settings) -> bool:
        return settings.format == "v2"

    def drop_keys(self) -> None:
        if self.encryptor is not None:
            self.encryptor.cache.drop_all()

    def __init__(
        self,
        settings: Settings,
        *,
        stream: str,
        to_key: str | None = None,
        client: CountingKms | None = None,
    ) -> None:
        super().__init__(settings, client)
        self._stream = stream
        self._to_key = to_key
        self._format = settings.format
        self._version = version_header(settings.format)
        self.encryptor: Encryptor | None = None

    async def start(self, sink: HeaderSink | None, source: HeaderSource | None) -> None:
        if self.encryptor is None:
            kms = await self._open_kms()
            settings = self._settings
            if self._to_key is not None:
                settings = replace(settings, kms_key_id=self._to_key)
            self.encryptor = await Encryptor.from_settings(
                kms, settings, stream=self._stream, header_sink=sink
            )

    async def values(self, records: Sequence[Any]) -> Sequence[Outcome]:
        encryptor = _ready(self.encryptor)
        pairs = [(record.value, record.key) for record in records]
        headers = None if encryptor.template.is_fixed else [r.headers for r in records]
        try:
            return await encryptor.seal_many(pairs, headers=headers)
        except EnvpipeError:
            raise  # retriable: the worker retries the batch; otherwise it stops
        except Exception:  # noqa: BLE001 - find the record that broke the batch
            log.warning("sealing a batch failed unexpectedly; sealing its records one by one")
        return [await _seal_one(encryptor, record) for record in records]

    def headers(self, headers: Headers) -> list[tuple[str, bytes]]:
        if not headers:  # most records: only the version header, without building lists
            return [self._version]
        return sealed_headers(headers, self._format)

    @property
    def cache_stats(self) -> Counter[str]:
        return self.encryptor.cache.stats if self.encryptor is not None else Counter()

    async def close(self) -> None:
        if self.encryptor is not None:
            await self.encryptor.close()
        await super().close()


async def _seal_one(encryptor: Encryptor, record: Any) -> Outcome:
    try:
        return await encryptor.seal(record.value, record.key, headers=record.headers)
    except (EnvpipeError, SealError):
        raise
    except Exception as exc:  # noqa: BLE001 - one bad record must not stop the stream
        log.error(  # noqa: TRY400 - no traceback: it could quote the payload
            "a record could not be sealed: %s", type(exc).__name__
        )
        return DeadLetter(Reason.SEAL_FAILED)


class Open(_KmsTransform):
    """Decrypt: verify and open each envelope; a `DecryptionError` becomes a dead letter."""

    direction = "decrypt"
    overhead_sign = -1
    reads_headers = True

    def drop_keys(self) -> None:
        if self.decryptor is not None:
            self.decryptor.cache.clear()

    def __init__(self, settings: Settings, *, client: CountingKms | None = None) -> None:
        super().__init__(settings, client)
        self.decryptor: Decryptor | None = None

    async def start(self, sink: HeaderSink | None, source: HeaderSource | None) -> None:
        if self.decryptor is None:
            kms = await self._open_kms()
            self.decryptor = await Decryptor.from_settings(
                kms, self._settings, header_source=source
            )

    async def values(self, records: Sequence[Any]) -> Sequence[Outcome]:
        return await _ready(self.decryptor).open_many([(r.value, r.key) for r in records])

    def headers(self, headers: Headers) -> list[tuple[str, bytes]]:
        return opened_headers(headers) if headers else []

    @property
    def cache_stats(self) -> Counter[str]:
        return self.decryptor.cache.stats if self.decryptor is not None else Counter()

    async def close(self) -> None:
        if self.decryptor is not None:
            await self.decryptor.close()
        await super().close()


class Rewrap(Transform):
    """Open each envelope, then seal its plaintext under `to_key` with the same context."""

    direction = "rewrap"
    overhead_sign = 0
    reads_headers = True

    def writes_headers(self, settings: Settings) -> bool:
        return settings.format == "v2"

    def drop_keys(self) -> None:
        self.opening.drop_keys()
        if self.sealing is not None:
            self.sealing.drop_keys()

    def __init__(self, settings: Settings, *, to_key: str) -> None:
        self._settings = settings
        self._to_key = to_key
        self.opening = Open(settings)
        self.sealing: Seal | None = None

    async def start(self, sink: HeaderSink | None, source: HeaderSource | None) -> None:
        await self.opening.start(None, source)
        if self.sealing is None:  # shares the opening half's client
            self.sealing = Seal(
                self._settings, stream="", to_key=self._to_key, client=self.opening.kms
            )
        await self.sealing.start(sink, None)

    async def values(self, records: Sequence[Any]) -> Sequence[Outcome]:
        sealing = _ready(self.sealing)
        decryptor, encryptor = _ready(self.opening.decryptor), _ready(sealing.encryptor)
        opened = await decryptor.open_many_with_context([(r.value, r.key) for r in records])
        outcomes: list[Outcome] = []
        for record, result in zip(records, opened, strict=True):
            if isinstance(result, DecryptionError):
                outcomes.append(result)
                continue
            plaintext, context = result
            try:
                outcomes.append(
                    await encryptor.seal(
                        plaintext, record.key, headers=record.headers, context=context
                    )
                )
            except SealError as exc:
                outcomes.append(exc)
        return outcomes

    def headers(self, headers: Headers) -> list[tuple[str, bytes]]:
        return sealed_headers(headers, self._settings.format)

    @property
    def kms(self) -> CountingKms | None:
        return self.opening.kms

    @property
    def cache_stats(self) -> Counter[str]:
        opened = self.opening.cache_stats
        sealed = self.sealing.cache_stats if self.sealing is not None else Counter()
        return Counter({f"decrypt_{k}": v for k, v in opened.items()}) + Counter(
            {f"encrypt_{k}": v for k, v in sealed.items()}
        )

    async def close(self) -> None:
        if self.sealing is not None:
            await self.sealing.close()  # its encryptor; the client is the opening half's
        await self.opening.close()


T = TypeVar("T")


def _ready(component: T | None) -> T:
    if component is None:
        raise RuntimeError("start() was not awaited")
    return component
