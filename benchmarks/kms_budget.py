"""KMS calls per million records at the default DEK limits, measured, not computed.

The Encryptor seals `records` 1 KiB values in worker-sized batches with the default policy
(a DEK retires after 1,000,000 records, the next is fetched at 80%), yielding to the event
loop between batches as a worker does, so the background refresh runs when it would in
production. Checkpoints show that the count grows by a constant per DEK, i.e. stays flat
per million records.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from benchmarks.measure import Progress
from pipeline.config import Settings
from pipeline.encryptor import Encryptor
from pipeline.kms import CountingKms, open_kms

_BATCH = 500
_VALUE = bytes(range(256)) * 4  # 1 KiB
_CHECKPOINTS = 10


@dataclass
class KmsBudget:
    """Calls by operation after `records` records, and at checkpoints on the way."""

    records: int
    calls: Counter[str]
    checkpoints: list[tuple[int, int]] = field(default_factory=list)
    #: the calls made at start (checking the configured keys), before any DEK
    startup: Counter[str] = field(default_factory=Counter)

    @property
    def per_million(self) -> float:
        """All KMS calls (one-off key resolution included) per million records sealed."""
        return round(sum(self.calls.values()) * 1_000_000 / self.records, 2)

    @property
    def deks(self) -> int:
        """Data keys minted."""
        return self.calls["generate_data_key"]

    @property
    def per_dek(self) -> float | None:
        """Service calls per DEK, leaving out the one-off checks at start."""
        if not self.deks:
            return None
        return sum((self.calls - self.startup).values()) / self.deks


async def measure_kms_budget(settings: Settings, records: int, progress: Progress) -> KmsBudget:
    """Seal `records` records through a fresh Encryptor at the KMS; count what it asked."""
    kms = CountingKms(await open_kms(settings))
    encryptor = await Encryptor.from_settings(kms, settings, stream="bench-kms-budget")
    batch = [(_VALUE, None)] * _BATCH
    every = max(_BATCH, records // _CHECKPOINTS // _BATCH * _BATCH)
    budget = KmsBudget(records, kms.calls, startup=Counter(kms.calls))
    try:
        done = 0
        while done < records:
            size = min(_BATCH, records - done)
            await encryptor.seal_many(batch[:size])
            done += size
            await asyncio.sleep(0)  # a worker awaits the broker here; refreshes run then
            if done % every == 0 or done == records:
                budget.checkpoints.append((done, sum(kms.calls.values())))
                if done % (every * 5) == 0:
                    progress(f"kms budget: {done:,} records, {sum(kms.calls.values())} KMS calls")
    finally:
        await encryptor.close()
        await kms.close()
    budget.calls = Counter(kms.calls)
    return budget
