"""The API against the real RabbitMQ: what lands in the shard queues, and what the client
hears when the broker refuses, disappears or stalls."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
from aio_pika.abc import AbstractConnection

from services.api.settings import ApiSettings
from services.common.topology import Topology
from services.common.wire import ACCEPTED_HEADER, parse_accepted
from tests.support.api import post_unroutable, serve_api
from tests.support.polling import eventually
from tests.support.queues import depth, drain, drain_entries
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.rabbitmq

ServeApi = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


def entry(second: int, value: str) -> dict[str, Any]:
    return {"timestamp": f"2019-10-12T07:20:{second:02d}.52Z", "value": value}


@pytest.fixture
def api(rabbitmq_url: str, amqp: AbstractConnection) -> ServeApi:
    """serve_api(topology, **settings) on the real broker; waits until it is ready."""

    def start(topo: Topology, url: str = rabbitmq_url, **overrides: Any) -> Any:
        settings = ApiSettings(
            rabbitmq_url=url,
            queue_prefix=topo.prefix,
            shards_count=topo.shards_count,
            queue_max_length=topo.max_length,
            **overrides,
        )
        return serve_api(settings)

    return start


async def ready(client: httpx.AsyncClient, timeout: float = 15) -> None:
    async def probe() -> bool:
        return (await client.get("/readyz")).status_code == 200

    await eventually(probe, timeout=timeout, what="API ready")


async def test_entries_land_in_their_shard_queues_once_with_contract_properties(
    api: ServeApi,
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topo = topology()
    body = [entry(second, f"v{second}") for second in range(50, 60)]
    async with api(topo) as client:
        await ready(client)
        caplog.clear()
        sent = time.time()
        with caplog.at_level("DEBUG", logger="services"):
            response = await client.post("/message", json=body)
        answered = time.time()
        assert len(caplog.records) <= 1  # no log line per entry
    assert response.status_code == 201
    assert response.json() == body

    for shard, name in enumerate(topo.queue_names):
        messages = await drain(amqp, name)
        expected = [e for e in body if int(e["timestamp"][17:19]) % 5 == shard]
        assert [e for m in messages for e in json.loads(m.body)] == expected
        for message in messages:
            assert message.content_type == "application/json"
            assert message.delivery_mode == 2  # persistent
            assert message.message_id
            assert message.headers["x-adp-entries"] == len(json.loads(message.body))
            assert message.headers["x-adp-parts"] == str(len(json.loads(message.body)))
            # When the entries were accepted, in milliseconds (between send and 201).
            accepted = message.headers[ACCEPTED_HEADER]
            assert isinstance(accepted, int)
            assert int(sent * 1000) <= accepted <= int(answered * 1000)


async def test_a_retry_with_the_same_idempotency_key_carries_the_same_part_ids(
    api: ServeApi, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    """What the consumer's ledger de-duplicates by: the same key and body give the same
    part ids in new messages; another body under the key, or no key, gives others."""
    topo = topology(shards_count=2)
    body = [entry(50, "a"), entry(51, "b"), entry(52, "c")]
    async with api(topo) as client:
        await ready(client)
        for key, sent in (
            ("order-1", body),
            ("order-1", body),
            ("order-1", body[:2]),
            (None, body),
        ):
            headers = {"Idempotency-Key": key} if key else {}
            response = await client.post("/message", json=sent, headers=headers)
            assert response.status_code == 201
    for name in topo.queue_names:
        specs = [str(m.headers["x-adp-parts"]) for m in await drain(amqp, name)]
        assert len(specs) == 4
        assert specs[0] == specs[1]  # the retry
        assert "@k" in specs[0]
        # Another body under the reused key: other ids, even on shard 1, whose part ("b"
        # alone) is the same bytes as the first request's.
        assert specs[2] != specs[0]
        assert "@" not in specs[3]  # no key: named by message id at the consumer


@pytest.mark.parametrize("max_message_bytes", [1_048_576, 1024])
async def test_concurrent_requests_share_messages_and_none_is_lost(
    api: ServeApi,
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    max_message_bytes: int,
) -> None:
    topo = topology(shards_count=2)
    requests = 300
    async with api(topo, publish_max_message_bytes=max_message_bytes) as client:
        await ready(client)
        sent = time.time()
        responses = await asyncio.gather(
            *(client.post("/message", json=[entry(i % 60, f"r{i}")]) for i in range(requests))
        )
        answered = time.time()
        metrics = (await client.get("/metrics")).text
    assert Counter(r.status_code for r in responses) == {201: requests}
    messages = [m for name in topo.queue_names for m in await drain(amqp, name)]
    values = [e["value"] for m in messages for e in json.loads(m.body)]
    assert sorted(values) == sorted(f"r{i}" for i in range(requests))
    assert len(messages) < requests  # grouped
    assert len({m.message_id for m in messages}) == len(messages)
    assert all(len(m.body) <= max_message_bytes for m in messages)
    # Each grouped message is stamped once (its oldest request's acceptance).
    stamps = [parse_accepted(m.headers[ACCEPTED_HEADER]) for m in messages]
    assert all(s is not None and int(sent) <= s <= answered for s in stamps), stamps
    accepted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("adp_api_entries_accepted_total{")
    )
    assert accepted == requests


async def test_an_invalid_entry_publishes_nothing(
    api: ServeApi, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    topo = topology()
    async with api(topo) as client:
        await ready(client)
        body = [entry(50, "a"), entry(51, "b"), {"timestamp": "2019-10-12"}]
        response = await client.post("/message", json=body)
    assert response.status_code == 400
    assert await drain_entries(amqp, topo) == {}


async def test_full_queue_nacks_and_the_client_gets_503(
    api: ServeApi, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    topo = topology(shards_count=1, max_length=1)
    async with api(topo, retry_after_seconds=2) as client:
        await ready(client)
        first = await client.post("/message", json=[entry(50, "kept")])
        second = await client.post("/message", json=[entry(51, "refused")])
    assert first.status_code == 201
    assert second.status_code == 503
    assert second.headers["retry-after"] == "2"
    assert second.json()["reason"] == "nack"
    assert await drain_entries(amqp, topo) == {0: [entry(50, "kept")]}


async def test_unroutable_publish_is_503_not_a_silent_drop(
    api: ServeApi, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    topo = topology(shards_count=1)
    async with api(topo) as client:
        await ready(client)
        response = await post_unroutable(client, amqp, topo, [entry(50, "nowhere")])
    assert response.status_code == 503
    assert response.json()["reason"] == "returned"


async def test_broker_lost_gives_fast_503_and_recovers_without_restart(
    api: ServeApi, topology: Callable[..., Topology], proxy: TcpProxy, rabbitmq_url: str
) -> None:
    topo = topology()
    await proxy.start()
    async with api(topo, url=proxy.url, publish_timeout_seconds=2) as client:
        await ready(client)
        assert (await client.post("/message", json=[entry(50, "before")])).status_code == 201

        await proxy.cut()
        started = time.monotonic()
        during = await client.post("/message", json=[entry(51, "during")])
        assert during.status_code == 503
        assert time.monotonic() - started <= 2.5
        assert "retry-after" in during.headers
        assert (await client.get("/readyz")).status_code == 503

        await proxy.start()
        back = time.monotonic()

        async def accepted() -> bool:
            response = await client.post("/message", json=[entry(52, "after")])
            return response.status_code == 201

        await eventually(accepted, timeout=10, interval=0.2, what="201 after broker return")
        assert time.monotonic() - back < 10
        assert (await client.get("/readyz")).status_code == 200


async def test_stalled_broker_gives_503_within_the_publish_timeout(
    api: ServeApi,
    topology: Callable[..., Topology],
    proxy: TcpProxy,
    rabbitmq_url: str,
    amqp: AbstractConnection,
) -> None:
    """The first request's message is sent and stalls; the requests waiting behind it fail
    with it, unsent, so after the stall only the sent one can arrive (at-least-once)."""
    topo = topology(shards_count=1)
    await proxy.start()
    async with api(topo, url=proxy.url, publish_timeout_seconds=1) as client:
        await ready(client)
        proxy.pause()
        started = time.monotonic()
        first = asyncio.create_task(client.post("/message", json=[entry(50, "sent")]))
        await asyncio.sleep(0.1)
        others = await asyncio.gather(
            *(client.post("/message", json=[entry(50, f"withdrawn{i}")]) for i in range(5))
        )
        responses = [await first, *others]
        elapsed = time.monotonic() - started
        proxy.resume()
        await ready(client)
        assert (await client.post("/message", json=[entry(50, "later")])).status_code == 201
    assert [r.status_code for r in responses] == [503] * 6
    assert {r.json()["reason"] for r in responses} == {"timeout"}
    assert elapsed <= 2.0
    values = {e["value"] for e in (await drain_entries(amqp, topo)).get(0, [])}
    assert values <= {"sent", "later"}
    assert "later" in values


async def test_starts_without_broker_and_becomes_ready_when_it_comes(
    api: ServeApi,
    topology: Callable[..., Topology],
    proxy: TcpProxy,
    rabbitmq_url: str,
    amqp: AbstractConnection,
) -> None:
    topo = topology()
    async with api(topo, url=proxy.url, broker_retry_max_seconds=0.5) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.post("/message", json=[entry(50, "early")])).status_code == 503
        await proxy.start()
        await ready(client, timeout=10)
        assert (await client.post("/message", json=[entry(50, "late")])).status_code == 201
    assert await depth(amqp, topo.queue_name(0)) == 1


async def test_a_queue_declared_with_other_arguments_keeps_it_unready_with_a_clear_log(
    api: ServeApi,
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RabbitMQ refuses a redeclare with other arguments: no crash, not ready, and the log
    says what to do."""
    declared = topology(shards_count=1, max_length=10)
    async with amqp.channel() as channel:
        await declared.declare(channel)
    reconfigured = Topology(declared.prefix, 1, max_length=0)
    async with api(reconfigured) as client:

        async def told() -> bool:
            return "exists with other arguments" in caplog.text

        await eventually(told, timeout=10, what="a clear error in the log")
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.post("/message", json=[entry(50, "x")])).status_code == 503
    assert "rabbitmqctl delete_queue" in caplog.text
