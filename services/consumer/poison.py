"""Poison messages: a message with no valid entries (someone published it by hand, or its
parts header is malformed) must not stop its shard.

The policy, in order: to the dead-letter queue with the reason in a header, then acked; if
the broker does not take it there, its body kept under `.rejected/` (the sink's), then
acked; if that fails too, requeued after a pause.
"""

from __future__ import annotations

import asyncio
import logging

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, DeliveryMode
from aiormq.exceptions import DeliveryError

from services.common.broker import CONNECTIVITY_ERRORS
from services.common.topology import Topology
from services.consumer.acker import Acker
from services.consumer.batch import Delivery
from services.consumer.metrics import ConsumerMetrics
from services.consumer.sink import Sink

log = logging.getLogger(__name__)

# The longest wait for the broker to confirm a dead-lettered message; past it the body is
# kept under .rejected/ instead.
DEAD_LETTER_TIMEOUT_SECONDS = 3.0
# A poison message neither dead-lettered nor kept goes back to the queue after this pause.
REQUEUE_PAUSE_SECONDS = 1.0
DEAD_LETTER_ERRORS: tuple[type[BaseException], ...] = (
    DeliveryError,
    TimeoutError,
    *CONNECTIVITY_ERRORS,
)


class Poison:
    """Where poison messages go. `attach` hands it the confirm-mode channel it publishes
    to the dead-letter queue on (opened in the broker set-up)."""

    def __init__(
        self, topology: Topology, sink: Sink, acker: Acker, metrics: ConsumerMetrics
    ) -> None:
        self._topology = topology
        self._sink = sink
        self._acker = acker
        self._metrics = metrics
        self._channel: AbstractChannel | None = None

    async def attach(self, channel: AbstractChannel) -> None:
        await self._topology.declare_dead_letter(channel)
        self._channel = channel

    async def reject(self, shard: int, message: AbstractIncomingMessage, reason: str) -> None:
        where = await self._dead_letter(shard, message, reason)
        if where is None:
            try:
                where = await self._sink.reject(message.body, reason, message.message_id)
            except OSError as exc:
                log.warning(
                    "could not keep a rejected message (%s); requeueing it in %gs",
                    exc,
                    REQUEUE_PAUSE_SECONDS,
                )
                # Not at once: with the dead-letter channel and the volume both failing, an
                # immediate requeue would bring it straight back, in a tight loop.
                await asyncio.sleep(REQUEUE_PAUSE_SECONDS)
                await self._acker.requeue(Delivery(message, 0))
                return
        self._metrics.rejected.labels(str(shard)).inc()
        log.warning(
            "shard %d: message %s has no valid entries (%s); moved to %s",
            shard,
            message.message_id,
            reason,
            where,
        )
        await self._acker.ack(Delivery(message, 0))

    async def _dead_letter(
        self, shard: int, message: AbstractIncomingMessage, reason: str
    ) -> str | None:
        channel, queue = self._channel, self._topology.dead_letter_queue
        if channel is None or channel.is_closed:
            return None
        headers = dict(message.headers)
        headers.update(
            {
                "x-adp-reason": reason[:1000],
                "x-adp-shard": shard,
                "x-adp-source-queue": self._topology.queue_name(shard),
            }
        )
        dead = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            message_id=message.message_id,
            delivery_mode=DeliveryMode.PERSISTENT,
        )
        try:
            await channel.default_exchange.publish(
                dead, routing_key=queue, mandatory=True, timeout=DEAD_LETTER_TIMEOUT_SECONDS
            )
        except DEAD_LETTER_ERRORS as exc:
            log.warning("could not dead-letter a message to %s: %s", queue, exc)
            return None
        return f"queue {queue}"
