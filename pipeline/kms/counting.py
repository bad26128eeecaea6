"""A `Kms` wrapper that counts calls, failures and time per operation.

Service calls cost money and latency, and the point of the DEK caches is to avoid them: these
counters are what the demo's "KMS calls" table, the stats files and the metrics report. The
operation names are the provider-neutral `pipeline.types.Operation` values; `provider` says
which service answered.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Awaitable
from typing import TypeVar

from pipeline.histogram import Histogram
from pipeline.types import ClosedOnExit, DataKey, EncryptionContext, Kms, Operation

__all__ = ["CountingKms"]

_T = TypeVar("_T")


class CountingKms(ClosedOnExit):
    """Delegates to `inner`, recording per operation how often and how long.

    A call counts as a failure if it raised anything but a cancellation; `seconds` is the
    total wall time spent awaiting the inner service, failures included.
    """

    def __init__(self, inner: Kms) -> None:
        self.inner = inner
        self.provider = inner.provider
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        #: per operation, the latency of each call in seconds (for the metrics' histogram)
        self.latency: defaultdict[str, Histogram] = defaultdict(
            lambda: Histogram(min_value=1e-5, max_value=3600)
        )

    async def generate_data_key(self, key_id: str, context: EncryptionContext) -> DataKey:
        return await self._timed(
            Operation.GENERATE_DATA_KEY, self.inner.generate_data_key(key_id, context)
        )

    async def unwrap(self, key_id: str, wrapped: bytes, context: EncryptionContext) -> bytes:
        return await self._timed(Operation.UNWRAP, self.inner.unwrap(key_id, wrapped, context))

    async def sign(self, key_id: str, message: bytes, digest: bytes) -> bytes:
        return await self._timed(Operation.SIGN, self.inner.sign(key_id, message, digest))

    async def get_public_key(self, key_id: str) -> bytes:
        return await self._timed(Operation.PUBLIC_KEY, self.inner.get_public_key(key_id))

    async def resolve_wrapping_key(self, name: str) -> str:
        return await self._timed(Operation.RESOLVE, self.inner.resolve_wrapping_key(name))

    async def resolve_signing_key(self, name: str) -> str:
        return await self._timed(Operation.RESOLVE, self.inner.resolve_signing_key(name))

    async def close(self) -> None:
        await self.inner.close()

    async def _timed(self, operation: Operation, call: Awaitable[_T]) -> _T:
        name = operation.value
        self.calls[name] += 1
        start = time.perf_counter()
        try:
            return await call
        except Exception:
            self.failures[name] += 1
            raise
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed
            self.latency[name].add(elapsed)
