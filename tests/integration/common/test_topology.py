"""Quorum shard queues on the real RabbitMQ: a message that keeps failing stops being
redelivered after the delivery limit and lands in the dead-letter queue; on the local
three-node cluster, the queues are replicated on every node with their leaders spread."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from services.common.topology import Topology
from tests.support.cluster import Cluster
from tests.support.polling import eventually
from tests.support.queues import depth

pytestmark = pytest.mark.rabbitmq


async def test_a_message_past_the_delivery_limit_goes_to_the_dead_letter_queue(
    topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    base = topology(shards_count=1)
    topo = Topology(base.prefix, 1, queue_type="quorum", delivery_limit=2)
    async with amqp.channel() as channel:
        try:
            await topo.declare(channel)
            await channel.default_exchange.publish(
                aio_pika.Message(b"[]", message_id="poison"), routing_key=topo.queue_name(0)
            )
            queue = await channel.declare_queue(topo.queue_name(0), passive=True)
            nacks = 0
            while (message := await queue.get(fail=False, timeout=5)) is not None:
                await message.nack(requeue=True)  # a consumer failing on it, again and again
                nacks += 1
                assert nacks <= 10, "the delivery limit did not stop the redeliveries"

            async def dead_lettered() -> bool:
                return await depth(amqp, topo.dead_letter_queue) == 1

            await eventually(dead_lettered, timeout=10, what="message in the dead-letter queue")
            assert nacks == 3  # the first delivery and two redeliveries
            assert await depth(amqp, topo.queue_name(0)) == 0
        finally:
            await channel.queue_delete(topo.dead_letter_queue)


async def test_quorum_queues_on_a_cluster_are_replicated_with_their_leaders_spread(
    rabbitmq_cluster: Cluster, unique_prefix: Callable[[], str]
) -> None:
    """On the local three-node cluster, declared through one node: every shard queue (and
    the dead-letter queue) is a quorum queue on all three nodes, and the leaders are not all
    on the node declaring them (which is where the broker's default, client-local, puts
    them)."""
    topo = Topology(unique_prefix(), 6, queue_type="quorum")
    connection = await aio_pika.connect(rabbitmq_cluster.urls[0], timeout=10)
    async with connection, connection.channel() as channel:
        try:
            await topo.declare(channel)
            placement = await rabbitmq_cluster.placement(topo.prefix)
            kinds = await rabbitmq_cluster.ctl("list_queues", "name", "type")
        finally:
            for name in [*topo.queue_names, topo.dead_letter_queue]:
                await channel.queue_delete(name)
    assert set(placement) == {*topo.queue_names, topo.dead_letter_queue}
    for _, members in placement.values():
        assert sorted(members) == ["n1", "n2", "n3"]
    leaders = Counter(leader for name, (leader, _) in placement.items() if name in topo.queue_names)
    assert len(leaders) >= 2, leaders
    assert max(leaders.values()) <= 3, leaders
    assert f"{topo.dead_letter_queue}\tquorum" in kinds
