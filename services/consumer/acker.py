"""The one place deliveries are settled.

A delivery is acked when every one of its entries is in a durably written file (or, for a
message with no valid entries, when its body is kept under .rejected/). The ack cannot be
interrupted by cancellation. An ack that fails because its channel died is not an error:
the broker redelivers the message, and the ledger keeps its entries from being written twice.

The acks asked for in one turn of the event loop — a group commit makes a dozen batches
durable at once, on every shard's channel — go out together: one `basic.ack` frame per
delivery (never `multiple`: a channel's other deliveries may not be durable yet), all of a
connection's in one socket write through aiormq's frame queue, in the order the broker
must apply them before a later barrier on the same queue. One write per ack cost the event
loop a sixth of its time (a send on loopback runs the receiver's side too).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pamqp.frame
from aiormq.abc import ChannelFrame
from aiormq.channel import Channel as AmqpChannel
from pamqp import commands

from services.common.broker import CONNECTIVITY_ERRORS
from services.consumer.batch import Batch, Delivery
from services.consumer.freshness import Freshness
from services.consumer.metrics import ConsumerMetrics

log = logging.getLogger(__name__)


# An ack write that the connection has not taken in this long is given up (counted lost).
ACK_WRITE_TIMEOUT_SECONDS = 30.0


def _closing(channel: AmqpChannel) -> bool:
    """Closed, or closing: the broker's Channel.Close received (aiormq has queued its
    CloseOk; a frame sent after it on that channel number is a connection error), or our
    own close begun. aiormq's `basic_ack` makes the same checks."""
    event = getattr(channel, "_Channel__close_event", None)
    return bool(
        channel.is_closed
        or channel._close_exception is not None
        or (event is not None and event.is_set())
    )


class ChannelClosed(ConnectionError):
    def __init__(self, number: int) -> None:
        super().__init__(f"channel {number} closed")


@dataclass(eq=False)
class _Turn:
    sent: asyncio.Future[None]  # done once every ack of the turn is written or lost
    deliveries: list[Delivery] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


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
        self._turn: _Turn | None = None  # the acks asked for in this turn of the loop

    async def batch_written(self, batch: Batch) -> None:
        """The one point where a written batch becomes acked: every delivery it completes
        is acked (its entries are all in durable files now)."""
        if self._freshness is not None:
            self._freshness.durable(batch)
        completed = [s.delivery for s in batch.sources if s.delivery.mark_written(s.settles)]
        if completed:
            await self._ack(completed)

    async def ack(self, delivery: Delivery) -> None:
        await self._ack([delivery])

    async def _ack(self, deliveries: list[Delivery]) -> None:
        """Returns once the acks are written or known lost; never raises but for a
        cancellation (a batch whose acks fail must not be written again: its deliveries are
        simply not acked, and come back)."""
        turn = self._turn
        if turn is None:
            loop = asyncio.get_running_loop()
            self._turn = turn = _Turn(loop.create_future())
            turn.task = loop.create_task(self._send(turn), name="acks")
        turn.deliveries.extend(deliveries)
        await asyncio.shield(turn.sent)

    async def _send(self, turn: _Turn) -> None:
        """The next loop turn: the acks asked for meanwhile, one write per connection."""
        self._turn = None
        try:
            connections: dict[object, dict[AmqpChannel, list[Delivery]]] = {}
            for delivery in turn.deliveries:
                channel = delivery.channel
                if isinstance(channel, AmqpChannel) and delivery.message.delivery_tag is not None:
                    channels = connections.setdefault(channel.connection, {})
                    channels.setdefault(channel, []).append(delivery)
                else:  # not from aiormq's channel (a test's scripted message): its own ack
                    await self._ack_one(delivery)
            await asyncio.gather(*(self._write(channels) for channels in connections.values()))
        finally:
            turn.sent.set_result(None)

    async def _write(self, channels: dict[AmqpChannel, list[Delivery]]) -> None:
        """One socket write: the acks of one connection's channels (a closing channel's
        are lost: its deliveries come back)."""
        frames: list[bytes] = []
        sending: list[Delivery] = []
        for channel, deliveries in channels.items():
            if _closing(channel):
                self._lost(ChannelClosed(channel.number), len(deliveries))
                continue
            for delivery in deliveries:
                tag = delivery.message.delivery_tag
                assert tag is not None  # (sorted out by `_send`)
                ack = commands.Basic.Ack(delivery_tag=tag)
                frames.append(pamqp.frame.marshal(ack, channel.number))
            sending += deliveries
        if not sending:
            return
        connection = next(iter(channels)).connection
        try:
            drained = connection.create_future()  # failed if the connection closes first
            frame = ChannelFrame(payload=b"".join(frames), should_close=False, drain_future=drained)
            # Bounded: a connection whose writer stopped with its queue full would never
            # take the frame, nor fail the future.
            async with asyncio.timeout(ACK_WRITE_TIMEOUT_SECONDS):
                await connection.write_queue.put(frame)
                await drained
        except Exception as exc:  # noqa: BLE001 - any failure: not acked, they come back
            if not isinstance(exc, CONNECTIVITY_ERRORS):
                log.warning("acks failed (%r): not acked, the broker redelivers", exc)
            self._lost(exc, len(sending))
        else:
            for delivery in sending:
                self._done(delivery)

    async def _ack_one(self, delivery: Delivery) -> None:
        try:
            await delivery.message.ack()
        except Exception as exc:  # noqa: BLE001 - as in `_write`
            if not isinstance(exc, CONNECTIVITY_ERRORS):
                log.warning("ack failed (%r): not acked, the broker redelivers", exc)
            self._lost(exc)
        else:
            self._done(delivery)

    def _done(self, delivery: Delivery) -> None:
        self.acked += 1
        self._on_acked(delivery)

    def _lost(self, exc: BaseException, count: int = 1) -> None:
        self._metrics.acks_lost.inc(count)
        log.info("%d ack(s) lost with their channel (%s); the broker will redeliver", count, exc)

    async def requeue(self, delivery: Delivery) -> None:
        """Give a message back to the broker, for another attempt."""
        try:
            await asyncio.shield(delivery.message.nack(requeue=True))
        except CONNECTIVITY_ERRORS as exc:
            self._metrics.acks_lost.inc()
            log.info("requeue lost with its channel (%s); the broker will redeliver", exc)
