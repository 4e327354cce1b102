"""The operator's readers against the real parts: queue backlogs from the real RabbitMQ,
pool state from a real consumer's /pools."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aio_pika.abc import AbstractConnection

from services.common.topology import Topology
from services.consumer.settings import ConsumerSettings
from services.operator.observe import HttpPools, ObserveError, PoolState, RabbitBacklog
from tests.support.consumer import run_consumer
from tests.support.net import free_port
from tests.support.publish import entries, publish

pytestmark = pytest.mark.rabbitmq


async def test_backlog_per_shard_from_the_broker(
    topology: Callable[..., Topology], amqp: AbstractConnection, rabbitmq_url: str
) -> None:
    topo = topology(shards_count=3)
    # seconds 0..9: shard 0 gets 0,3,6,9 (4), shard 1 gets 1,4,7 (3), shard 2 gets 2,5,8 (3)
    await publish(amqp, topo, entries(10, "b"), per_message=1)
    assert await RabbitBacklog().backlog(rabbitmq_url, topo) == [4, 3, 3]


async def test_backlog_from_the_first_node_of_the_list_that_answers(
    topology: Callable[..., Topology], amqp: AbstractConnection, rabbitmq_url: str
) -> None:
    """The Secret's RABBITMQ_URL may list a cluster's nodes: a dead one is passed over, and
    its password never shows in the error of a list where none answers."""
    topo = topology(shards_count=3)
    await publish(amqp, topo, entries(10, "n"), per_message=1)
    dead = f"amqp://guest:s3cret@127.0.0.1:{free_port()}/"
    for _ in range(4):  # from a random start each time
        assert await RabbitBacklog().backlog(f"{dead},{rabbitmq_url}", topo) == [4, 3, 3]
    with pytest.raises(ObserveError, match="broker") as caught:
        await RabbitBacklog(timeout=2).backlog(f"{dead},amqp://u:s3cret@127.0.0.1:1/", topo)
    assert "s3cret" not in str(caught.value)


async def test_an_unreachable_broker_is_an_observe_error(
    topology: Callable[..., Topology],
) -> None:
    with pytest.raises(ObserveError, match="broker"):
        await RabbitBacklog(timeout=2).backlog("amqp://guest:guest@127.0.0.1:1/", topology())


async def test_pool_state_from_a_real_consumer(
    topology: Callable[..., Topology], rabbitmq_url: str, tmp_path: Path
) -> None:
    topo = topology(shards_count=2)
    settings = ConsumerSettings(
        rabbitmq_url=rabbitmq_url,
        queue_prefix=topo.prefix,
        shards_count=2,
        data_output_dir=tmp_path,
        metrics_host="127.0.0.1",
        metrics_port=0,
        history_log_interval_seconds=0,
    )
    async with run_consumer(settings) as consumer, aiohttp.ClientSession() as session:
        port = consumer.http.base_url.port
        assert port is not None
        states = await HttpPools(session).pools("127.0.0.1", port)
        assert states == [PoolState(0, 3, 4, 0), PoolState(1, 3, 4, 0)]
        assert not any(state.saturated for state in states)
        with pytest.raises(ObserveError):
            await HttpPools(session).pools("127.0.0.1", 1)
