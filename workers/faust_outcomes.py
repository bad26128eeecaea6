"""Where one Faust event ends up: its output in the destination, its original in the DLQ,
or the worker stopped without acknowledging it.

`AgentCrypto` (`workers.faust_helpers`) decides what a record becomes; this carries that
out as the stream workers do. An output too large for the broker is a dead letter with
`Reason.TOO_LARGE`; without a dead-letter topic, a record that cannot be processed stops
the worker, so it is read again on restart instead of being skipped. Every write is
acknowledged and counted by `Deliveries` (`workers.faust_delivery`) once the broker has it.
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError
from faust.exceptions import ProducerSendError
from faust.types import EventT, TopicT

from pipeline.errors import Reason
from workers.faust_delivery import Deliveries, Headers, dead_letter_headers, send_like
from workers.stats import WorkerStats

__all__ = ["Outcomes", "crash"]

log = logging.getLogger("envpipe.faust")


class Outcomes:
    """Write each event's output or dead letter, acknowledged through one `Deliveries`."""

    def __init__(self, stats: WorkerStats) -> None:
        self.deliveries = Deliveries(stats, crash)

    async def deliver(
        self,
        dest: TopicT,
        event: EventT[Any],
        value: bytes | None,
        headers: Headers,
        dlq: TopicT | None,
        *,
        overhead: int | None,
    ) -> None:
        """Produce the output; `overhead` is envelope minus plaintext bytes (None: tombstone)."""
        try:
            delivery = await send_like(dest, event, value, headers)
        except ProducerSendError as exc:  # Faust's wrapper of aiokafka's errors
            if not isinstance(exc.__cause__, MessageSizeTooLargeError):
                await crash(event, exc, "producing failed")
                raise
            await self.reject(event, Reason.TOO_LARGE, dlq, exc)
            return
        self.deliveries.watch(delivery, event, None, overhead)

    async def reject(
        self, event: EventT[Any], reason: str, dlq: TopicT | None, exc: Exception
    ) -> None:
        """Dead-letter the original record, or crash the worker (raising `exc`) without a DLQ."""
        if dlq is None:
            await crash(event, exc, f"a record cannot be processed (reason={reason})")
            raise exc
        message = event.message
        delivery = await send_like(dlq, event, message.value, dead_letter_headers(event, reason))
        self.deliveries.watch(delivery, event, str(reason), None)


async def crash(event: EventT[Any], exc: BaseException, why: str) -> None:
    """Stop the worker without acknowledging the record, so it is read again on restart."""
    message = event.message
    log.error(
        "%s at %s/%d/%d (%s); stopping the worker without committing it",
        why,
        message.topic,
        message.partition,
        message.offset,
        type(exc).__name__,
    )
    await event.app.crash(exc)
