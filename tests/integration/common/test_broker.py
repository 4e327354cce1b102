"""The broker connection moving between nodes: two TCP proxies of the test's own stand for
two nodes of a cluster (both reach the shared broker), so the failover is exercised without
stopping anything others use. The real three-node cluster is the fault suite's
(tests/e2e/test_cluster_faults.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry
from yarl import URL

from services.common.broker import Broker, BrokerMetrics
from services.common.nodes import Nodes
from tests.support.net import free_port
from tests.support.polling import eventually
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def two_nodes(rabbitmq_url: str) -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    first, second = TcpProxy.to_broker(rabbitmq_url), TcpProxy.to_broker(rabbitmq_url)
    await first.start()
    await second.start()
    yield first, second
    await first.cut()
    await second.cut()


def is_(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return condition()

    return probe


def with_password(url: str, password: str) -> str:
    return str(URL(url).with_password(password))


async def test_a_lost_node_moves_the_connection_to_the_next_with_its_channels(
    two_nodes: tuple[TcpProxy, TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = two_nodes
    nodes = Nodes.parse(f"{first.url},{second.url}", start=0)
    registry = CollectorRegistry()
    opened: list[AbstractRobustConnection] = []

    async def setup(connection: AbstractRobustConnection) -> None:
        opened.append(connection)

    caplog.set_level(logging.INFO, logger="services")
    async with Broker(
        nodes, name="test-failover", setup=setup, metrics=BrokerMetrics(registry, "t")
    ) as broker:
        await eventually(is_(lambda: broker.connected), timeout=10, what="connected")
        assert broker.node == 0
        channel = await opened[0].channel()
        assert (
            registry.get_sample_value(
                "t_broker_node", {"node": "0", "host": f"127.0.0.1:{first.port}"}
            )
            == 1
        )
        await first.cut()  # node 0 is gone; node 1 answers
        await eventually(is_(lambda: broker.node == 1), timeout=10, what="moved to node 1")
        await eventually(is_(lambda: not channel.is_closed), timeout=10, what="channel restored")
        assert registry.get_sample_value("t_broker_failovers_total") == 1
        assert (
            registry.get_sample_value(
                "t_broker_node", {"node": "0", "host": f"127.0.0.1:{first.port}"}
            )
            == 0
        )
        assert (
            registry.get_sample_value(
                "t_broker_node", {"node": "1", "host": f"127.0.0.1:{second.port}"}
            )
            == 1
        )
        assert len(opened) == 1  # set up once: aio-pika restored what it had
        await first.start()
        await second.cut()  # and back round to node 0
        await eventually(is_(lambda: broker.node == 0), timeout=10, what="back on node 0")
    assert "lost" in caplog.text
    assert "restored" in caplog.text


async def test_start_skips_unreachable_nodes_and_masks_every_password(
    two_nodes: tuple[TcpProxy, TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    _, live = two_nodes
    dead = f"amqp://guest:s3cret-dead@127.0.0.1:{free_port()}/"
    nodes = Nodes.parse(f"{dead},{with_password(live.url, 'guest')}", start=0)

    async def setup(_: AbstractRobustConnection) -> None:
        return None

    caplog.set_level(logging.INFO, logger="services")
    async with Broker(nodes, name="test-start", setup=setup) as broker:
        await eventually(is_(lambda: broker.connected), timeout=10, what="connected")
        assert broker.node == 1
        assert broker.attempts == 2  # the dead one, then the live one, no pause between
    assert "s3cret-dead" not in caplog.text
    assert "guest:***@127.0.0.1" in caplog.text


async def test_every_node_lost_then_one_back_reconnects_without_a_restart(
    two_nodes: tuple[TcpProxy, TcpProxy],
) -> None:
    first, second = two_nodes
    nodes = Nodes.parse(f"{first.url},{second.url}", start=1)

    async def setup(_: AbstractRobustConnection) -> None:
        return None

    async with Broker(nodes, name="test-all-lost", setup=setup) as broker:
        await eventually(is_(lambda: broker.node == 1), timeout=10, what="connected to node 1")
        await first.cut()
        await second.cut()
        await eventually(is_(lambda: not broker.connected), timeout=10, what="lost")
        await asyncio.sleep(3)  # several attempts on each
        await first.start()
        await eventually(is_(lambda: broker.node == 0), timeout=10, what="connected to node 0")
