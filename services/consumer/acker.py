"""The one place deliveries are settled.

A delivery is acked when every one of its entries is in a durably written file (or, for a
message with no valid entries, when its body is kept under .rejected/). The ack cannot be
interrupted by cancellation. An ack that fails because its channel died is not an error:
the broker redelivers the message, and the ledger keeps its entries from being written twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from services.common.broker import CONNECTIVITY_ERRORS
from services.consumer.batch import Batch, Delivery
from services.consumer.freshness import Freshness
from services.consumer.metrics import ConsumerMetrics

log = logging.getLogger(__name__)


class Acker:
    def __init__(
        self,
        metrics: ConsumerMetrics,
        on_acked: Callable[[Delivery], None] = lambda delivery: None,
        freshness: Freshness | None = None,
    ) -> None:
        """`on_acked(delivery)`: its ack was sent (the ledger settles its parts later);
        `freshness`: told of each batch as it becomes durable, before its acks."""
        self._metrics = metrics
        self._on_acked = on_acked
        self._freshness = freshness
        self.acked = 0

    async def batch_written(self, batch: Batch) -> None:
        """The one point where a written batch becomes acked: every delivery it completes
        is acked (its entries are all in durable files now)."""
        if self._freshness is not None:
            self._freshness.durable(batch)
        for source in batch.sources:
            if source.delivery.mark_written(source.settles):
                await self.ack(source.delivery)

    async def ack(self, delivery: Delivery) -> None:
        try:
            await asyncio.shield(delivery.message.ack())
        except CONNECTIVITY_ERRORS as exc:
            self._metrics.acks_lost.inc()
            log.info("ack lost with its channel (%s); the broker will redeliver", exc)
        else:
            self.acked += 1
            self._on_acked(delivery)

    async def requeue(self, delivery: Delivery) -> None:
        """Give a message back to the broker, for another attempt."""
        try:
            await asyncio.shield(delivery.message.nack(requeue=True))
        except CONNECTIVITY_ERRORS as exc:
            self._metrics.acks_lost.inc()
            log.info("requeue lost with its channel (%s); the broker will redeliver", exc)
