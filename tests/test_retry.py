"""`pipeline.retry` and `workers.flow.retrying`: the one backoff rule, and the loop around it."""

from __future__ import annotations

import pytest

from pipeline.errors import DekExhaustedError, KmsRequestError, KmsUnavailableError
from pipeline.retry import backoff_delay
from workers.flow import retrying


def test_backoff_doubles_from_the_initial_delay_with_half_jitter_up_to_the_cap() -> None:
    for failures in range(1, 12):
        ceiling = min(30.0, 0.2 * 2**failures)
        delays = [backoff_delay(failures, 30.0) for _ in range(200)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays), failures
        assert len(set(delays)) > 100  # jittered, so workers that failed together spread out
    assert backoff_delay(10_000, 5.0) <= 5.0  # no overflow past the cap


async def test_retrying_waits_on_retriable_errors_and_returns_the_result() -> None:
    outcomes: list[Exception | str] = [
        KmsUnavailableError("sign", "ThrottlingException"),
        DekExhaustedError("spent"),
        "done",
    ]
    waits: list[float] = []
    events: list[str] = []

    async def attempt() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def wait(seconds: float) -> None:
        waits.append(seconds)

    result = await retrying(
        attempt,
        what="test",
        cap=1.0,
        wait=wait,
        on_retry=lambda: events.append("retry"),
        on_recovered=lambda: events.append("recovered"),
    )
    assert result == "done"
    assert len(waits) == 2
    assert all(0 < delay <= 1.0 for delay in waits)
    assert events == ["retry", "retry", "recovered"]


async def test_retrying_raises_what_is_not_retriable_at_once() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise KmsRequestError("unwrap", "AccessDeniedException")

    async def wait(_: float) -> None:
        raise AssertionError("must not wait")

    with pytest.raises(KmsRequestError):
        await retrying(attempt, what="test", cap=1.0, wait=wait)
    assert calls == 1
