"""A `Kms` wrapper that counts calls, failures and time per KMS operation.

KMS calls cost money and latency, and the point of the DEK caches is to avoid them: these
counters are what the demo's "KMS calls by operation" table and the metrics report.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Mapping
from typing import TypeVar

from pipeline.histogram import Histogram
from pipeline.types import DataKey, Kms

__all__ = ["CountingKms"]

_T = TypeVar("_T")


class CountingKms:
    """Delegates to `inner`, recording per operation (KMS API name) how often and how long.

    A call counts as a failure if it raised anything but a cancellation; `seconds` is the
    total wall time spent awaiting the inner KMS, failures included.
    """

    def __init__(self, inner: Kms) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        #: per operation, the latency of each call in seconds (for the metrics' histogram)
        self.latency: defaultdict[str, Histogram] = defaultdict(
            lambda: Histogram(min_value=1e-5, max_value=3600)
        )

    async def generate_data_key(self, key_id: str, context: Mapping[str, str]) -> DataKey:
        return await self._timed("GenerateDataKey", self.inner.generate_data_key(key_id, context))

    async def decrypt(self, key_id: str, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        return await self._timed("Decrypt", self.inner.decrypt(key_id, wrapped, context))

    async def sign(self, key_id: str, message: bytes) -> bytes:
        return await self._timed("Sign", self.inner.sign(key_id, message))

    async def get_public_key(self, key_id: str) -> bytes:
        return await self._timed("GetPublicKey", self.inner.get_public_key(key_id))

    async def resolve_key_id(self, key_id: str) -> str:
        return await self._timed("DescribeKey", self.inner.resolve_key_id(key_id))

    async def close(self) -> None:
        await self.inner.close()

    async def _timed(self, operation: str, call: Awaitable[_T]) -> _T:
        self.calls[operation] += 1
        start = time.perf_counter()
        try:
            return await call
        except Exception:
            self.failures[operation] += 1
            raise
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[operation] += elapsed
            self.latency[operation].add(elapsed)
