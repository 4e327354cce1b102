"""Intake: the broker set-up of the consumer and what it does with each message.

On the first connection: a confirm-mode channel for poison messages, then per shard a
channel with a bounded prefetch, its queue declared and consumed. aio-pika restores them on
reconnect. Each message is parsed and added to its shard's batch; a message with no valid
entries goes to the poison policy (`poison.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.abc import AbstractChannel as RawChannel

from services.common.broker import CONNECTIVITY_ERRORS
from services.common.schema import InvalidEntries, parse_message
from services.common.topology import Topology
from services.common.wire import InvalidParts
from services.consumer.autoscaler import BrokerDepthProbe
from services.consumer.batch import Batcher, Delivery
from services.consumer.freshness import Freshness
from services.consumer.metrics import ConsumerMetrics
from services.consumer.poison import Poison

OnMessage = Callable[[AbstractIncomingMessage], Awaitable[None]]


@dataclass
class Intake:
    topology: Topology
    prefetch: int
    batchers: list[Batcher]
    poison: Poison
    probe: BrokerDepthProbe
    freshness: Freshness
    metrics: ConsumerMetrics
    # Set once the set-up has consumed every shard.
    channels: list[AbstractChannel] = field(default_factory=list, init=False)
    consumers: list[tuple[AbstractQueue, str]] = field(default_factory=list, init=False)

    async def attach(self, connection: AbstractRobustConnection) -> None:
        """Broker set-up, on the first connection. If a shard fails (a queue declared with
        other arguments), the broker connection is closed and the whole set-up retried;
        deliveries already taken on the earlier shards cannot be acked then, and the broker
        redelivers them."""
        channels: list[AbstractChannel] = []
        consumers: list[tuple[AbstractQueue, str]] = []
        await self.poison.attach(
            await connection.channel(publisher_confirms=True, on_return_raises=True)
        )
        for shard in range(self.topology.shards_count):
            channel = await connection.channel()
            channels.append(channel)
            await channel.set_qos(prefetch_count=self.prefetch)
            queue = await self.topology.declare_one(channel, shard)
            consumers.append((queue, await queue.consume(self.on_message_for(shard))))
        self.probe.attach(connection)
        self.channels, self.consumers = channels, consumers

    def on_message_for(self, shard: int) -> OnMessage:
        batcher = self.batchers[shard]
        redeliveries = self.metrics.redeliveries.labels(str(shard))

        async def on_message(message: AbstractIncomingMessage) -> None:
            if message.redelivered:
                redeliveries.inc()
            try:
                entries = parse_message(message.body)
                directories = batcher.directories(entries)
                delivery = Delivery.of(message, len(entries))
            except (InvalidEntries, InvalidParts) as exc:
                await self.poison.reject(shard, message, str(exc))
                return
            self.freshness.arrived(shard, delivery)
            batcher.add(delivery, entries, directories)

        return on_message

    async def stop(self) -> None:
        """Stop consuming (the drain's first step): no new deliveries on any shard."""
        for queue, tag in self.consumers:
            with contextlib.suppress(*CONNECTIVITY_ERRORS):
                await queue.cancel(tag)

    async def close(self) -> None:
        for channel in reversed(self.channels):
            with contextlib.suppress(*CONNECTIVITY_ERRORS):
                await channel.close()

    async def barrier(self, channel: RawChannel) -> None:
        """A synchronous round trip on a consumer channel: once answered, the broker has
        applied every ack sent on it before (the prefetch is set to what it already is)."""
        await channel.basic_qos(prefetch_count=self.prefetch, timeout=5)
