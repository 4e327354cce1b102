"""The acker on a real broker: the acks asked for in one turn of the event loop go out in
one socket write per connection, each applied on its own channel; a closed channel's acks
are counted lost and its messages come back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from services.common.metrics import new_registry
from services.common.topology import Topology
from services.consumer.acker import Acker
from services.consumer.batch import Delivery
from services.consumer.metrics import ConsumerMetrics
from tests.support.polling import eventually
from tests.support.queues import depth


async def two_shards(
    amqp: AbstractConnection, topology: Callable[..., Topology], count: int
) -> Topology:
    """Two shard queues of `count` one-entry messages each."""
    topo = topology(shards_count=2)
    async with amqp.channel() as channel:
        await topo.declare(channel)
        for name in topo.queue_names:
            for i in range(count):
                body = b'[{"timestamp":"2019-10-12T07:20:50Z","value":"%d"}]' % i
                await channel.default_exchange.publish(aio_pika.Message(body), routing_key=name)
    return topo


async def taken_on_own_channels(
    consumer: AbstractConnection, topo: Topology, count: int
) -> list[tuple[aio_pika.abc.AbstractChannel, list[Delivery]]]:
    """`count` deliveries of each shard, on a channel per shard as the consumer has them."""
    taken = []
    for name in topo.queue_names:
        channel = await consumer.channel()
        queue = await channel.declare_queue(name, passive=True)
        taken.append((channel, [Delivery.of(m, 1) for m in await take(queue, count)]))
    return taken


async def take(queue: aio_pika.abc.AbstractQueue, count: int) -> list[AbstractIncomingMessage]:
    taken: list[AbstractIncomingMessage] = []
    while len(taken) < count:
        message = await queue.get(fail=False)
        if message is None:
            await asyncio.sleep(0.02)
        else:
            taken.append(message)
    return taken


def count_writes(connection: Any) -> list[bytes]:
    """The frames put on the connection's write queue from now on (their payloads)."""
    written: list[bytes] = []
    queue = connection.write_queue
    put = queue.put

    async def spy(frame: Any) -> None:
        written.append(frame.payload)
        await put(frame)

    queue.put = spy
    return written


async def test_the_acks_of_one_turn_go_out_in_one_write_and_are_applied(
    amqp: AbstractConnection, rabbitmq_url: str, topology: Callable[..., Topology]
) -> None:
    topo = await two_shards(amqp, topology, 3)
    metrics = ConsumerMetrics(new_registry())
    acked: list[Delivery] = []
    acker = Acker(metrics, on_acked=acked.append)
    async with await aio_pika.connect(rabbitmq_url) as consumer:
        deliveries = [d for _, ds in await taken_on_own_channels(consumer, topo, 3) for d in ds]
        raw = deliveries[0].channel
        assert raw is not None
        writes = count_writes(raw.connection)
        await asyncio.gather(*(acker.ack(d) for d in deliveries))
        assert len(writes) == 1  # six acks on two channels: one write
        assert acker.acked == 6
        assert acked == deliveries
    # The consumer's connection is closed: an unapplied ack would have requeued them.
    for name in topo.queue_names:
        assert await depth(amqp, name) == 0


async def test_a_closed_channels_acks_are_lost_and_its_messages_come_back(
    amqp: AbstractConnection, rabbitmq_url: str, topology: Callable[..., Topology]
) -> None:
    topo = await two_shards(amqp, topology, 2)
    registry = new_registry()
    metrics = ConsumerMetrics(registry)
    acker = Acker(metrics)
    async with await aio_pika.connect(rabbitmq_url) as consumer:
        (_, open_ones), (closed, closed_ones) = await taken_on_own_channels(consumer, topo, 2)
        await closed.close()  # its deliveries can no longer be acked
        await asyncio.gather(*(acker.ack(d) for d in open_ones + closed_ones))
        assert acker.acked == 2
        assert registry.get_sample_value("adp_consumer_acks_lost_total") == 2

    async def requeued() -> bool:
        return await depth(amqp, topo.queue_names[1]) == 2

    await eventually(requeued, timeout=10, what="the closed channel's messages back")
    assert await depth(amqp, topo.queue_names[0]) == 0
