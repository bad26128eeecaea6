"""What a worker does when its consumer group moves partitions.

Before partitions are revoked, the worker stops reading them and waits (bounded) for the
batches in flight to be acknowledged and committed; anything still in flight after that is
never committed by this member (the committer's generation counter), so at worst it is
processed twice. Newly assigned partitions stay paused while the worker is holding back.
Every assignment is logged as `ASSIGNED_LOG` and its partitions, which tools wait for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aiokafka import ConsumerRebalanceListener, TopicPartition

from workers.contract import ASSIGNED_LOG
from workers.flow import KMS

if TYPE_CHECKING:
    from workers.loop import StreamWorker

__all__ = ["Rebalance"]

log = logging.getLogger("envpipe.stream")


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka's rebalance callbacks, for one worker."""

    def __init__(self, worker: StreamWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before giving partitions up: stop reading them, let in-flight work commit."""
        if not revoked:
            return
        worker = self._worker
        worker.consumer.pause(*revoked)
        await worker.committer.before_revoke(holding=KMS in worker.flow.reasons)
        for tp in revoked:
            worker.lag_base.pop(tp, None)
        log.info("partitions revoked: %s", ", ".join(names(revoked)))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """New partitions: note them, and keep them paused if the worker is holding back."""
        worker = self._worker
        worker.stats.assigned_partitions.update(names(assigned))
        worker.committer.last_activity = time.monotonic()
        if worker.flow.paused and assigned:
            worker.consumer.pause(*assigned)
        log.info("%s %s", ASSIGNED_LOG, ", ".join(names(assigned)) or "none")


def names(partitions: Iterable[TopicPartition]) -> list[str]:
    """ "topic/partition" names, sorted, for logs and stats."""
    return sorted(f"{tp.topic}/{tp.partition}" for tp in partitions)
