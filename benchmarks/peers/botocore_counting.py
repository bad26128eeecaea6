"""Counting the KMS requests a boto3/botocore-based peer makes, via botocore's event hooks."""

from __future__ import annotations

from collections import Counter
from typing import Any


class KmsCallCounter:
    """A `before-call.kms` hook: one count per API request, by operation name."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __call__(self, **kwargs: Any) -> None:
        self.calls[kwargs["model"].name] += 1

    @property
    def total(self) -> int:
        """Requests counted so far."""
        return sum(self.calls.values())


class CountedPeer:
    """What the boto3-based peers share: a request counter, and nothing async to close."""

    asynchronous = False

    def __init__(self) -> None:
        self._counter = KmsCallCounter()

    def kms_calls(self) -> int:
        """KMS requests made so far."""
        return self._counter.total

    async def close(self) -> None:
        """The peers hold only blocking clients, which need no closing."""
