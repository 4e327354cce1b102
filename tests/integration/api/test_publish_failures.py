"""adp_api_publish_failures_total counts requests answered 503 because the broker did not
take their entries: one per request, by reason, whichever way the failure came (a message's
nack, return or timeout, the request's own wait, no connection)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import httpx
import pytest
from aio_pika.abc import AbstractConnection

from services.api.errors import PublishFailed
from services.common.topology import Topology
from tests.integration.api.test_publish import ServeApi, api, entry, ready
from tests.support.api import post_unroutable
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.rabbitmq

__all__ = ["api"]  # the fixture, shared with test_publish


async def failures(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    found = re.findall(r'^adp_api_publish_failures_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    return {reason: float(value) for reason, value in found}


def only(reason: str, count: int) -> dict[str, float]:
    return {r: float(count if r == reason else 0) for r in PublishFailed.REASONS}


async def test_a_nacked_request_counts_once_as_nack(
    api: ServeApi, topology: Callable[..., Topology]
) -> None:
    topo = topology(shards_count=1, max_length=1)
    async with api(topo) as client:
        await ready(client)
        assert (await client.post("/message", json=[entry(50, "kept")])).status_code == 201
        refused = await client.post("/message", json=[entry(51, "refused")])
        assert (refused.status_code, refused.json()["reason"]) == (503, "nack")
        assert await failures(client) == only("nack", 1)


async def test_a_returned_request_counts_once_as_returned(
    api: ServeApi, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    topo = topology(shards_count=1)
    async with api(topo) as client:
        await ready(client)
        response = await post_unroutable(client, amqp, topo, [entry(50, "nowhere")])
        assert (response.status_code, response.json()["reason"]) == (503, "returned")
        assert await failures(client) == only("returned", 1)


async def test_requests_timed_out_count_once_each_as_timeout(
    api: ServeApi, topology: Callable[..., Topology], proxy: TcpProxy
) -> None:
    """One request's message is sent and stalls; five wait behind it and fail with it,
    unsent: six requests, six counts (before, the sent message counted, the others not)."""
    topo = topology(shards_count=1)
    await proxy.start()
    async with api(topo, url=proxy.url, publish_timeout_seconds=1) as client:
        await ready(client)
        proxy.pause()
        first = asyncio.create_task(client.post("/message", json=[entry(50, "sent")]))
        await asyncio.sleep(0.1)
        others = await asyncio.gather(
            *(client.post("/message", json=[entry(50, f"behind{i}")]) for i in range(5))
        )
        responses = [await first, *others]
        assert {(r.status_code, r.json()["reason"]) for r in responses} == {(503, "timeout")}
        assert await failures(client) == only("timeout", 6)
        proxy.resume()


async def test_a_request_without_a_broker_counts_once_as_disconnected(
    api: ServeApi, topology: Callable[..., Topology], proxy: TcpProxy
) -> None:
    topo = topology()
    await proxy.start()
    async with api(topo, url=proxy.url, publish_timeout_seconds=2) as client:
        await ready(client)
        await proxy.cut()
        during = await client.post("/message", json=[entry(50, "during"), entry(51, "too")])
        assert (during.status_code, during.json()["reason"]) == (503, "disconnected")
        assert await failures(client) == only("disconnected", 1)
