"""One backoff rule for every retry against the KMS or the broker."""

from __future__ import annotations

import random

INITIAL_SECONDS = 0.2


def backoff_delay(failures: int, cap: float, initial: float = INITIAL_SECONDS) -> float:
    """Jittered exponential backoff: `initial` doubling per failure, at most `cap`.

    Half jitter (uniform between half the ceiling and the ceiling) keeps many workers that
    failed together from retrying together, while still waiting at least half as long.
    """
    ceiling = min(cap, initial * 2 ** min(failures, 30))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography
