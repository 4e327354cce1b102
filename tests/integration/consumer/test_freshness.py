"""Freshness with the real API and the real consumer, in-process, on the real broker: the
consumer's writes pass through a sink that the test can hold shut (the pool's sink seam),
so a write blocks with no error at all — the case only the oldest unwritten age shows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from aio_pika.abc import AbstractConnection

from services.api.settings import ApiSettings
from services.common.topology import Topology
from services.consumer.batch import Batch
from services.consumer.sink import Sink
from tests.integration.consumer.conftest import Settings
from tests.support.api import serve_api
from tests.support.consumer import WrappedSink, lines_reach, run_consumer
from tests.support.freshness import Latency, read
from tests.support.polling import eventually
from tests.support.publish import entries, publish

pytestmark = pytest.mark.rabbitmq


class GatedSink(WrappedSink):
    """The real file sink behind a gate: while it is shut, writes wait (a hung disk)."""

    def __init__(self, inner: Sink) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(self, batch: Batch, worker: str) -> Batch:
        await self.gate.wait()
        return await self.inner.write(batch, worker)


async def test_a_blocked_write_shows_as_a_rising_age_then_as_latency(
    settings: Settings,
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    rabbitmq_url: str,
) -> None:
    topo = topology(shards_count=1)
    config = settings(topo, batch_size=10, worker_timeout_seconds=60)
    api_settings = ApiSettings(
        rabbitmq_url=rabbitmq_url, queue_prefix=topo.prefix, shards_count=topo.shards_count
    )
    body = [{"timestamp": "2019-10-12T07:20:50Z", "value": f"b{i}"} for i in range(10)]
    gated: list[GatedSink] = []

    def wrap(inner: Sink) -> Sink:
        gated.append(GatedSink(inner))
        return gated[-1]

    async with (
        serve_api(api_settings) as api,
        run_consumer(config, wrap_sink=wrap) as consumer,
    ):
        sink = gated[0]

        async def scrape() -> Latency:
            return read((await consumer.http.get("/metrics")).text)[0]

        async def api_ready() -> bool:
            return (await api.get("/readyz")).status_code == 200

        await eventually(api_ready, timeout=15, what="API ready")
        # Without a stamp (what the Go original published): written, not measured.
        await publish(amqp, topo, entries(5, "old"), per_message=1)
        assert (await api.post("/message", json=body)).status_code == 201

        async def written(want: float) -> Latency | None:
            now = await scrape()
            return now if now.count >= want else None

        flowing = await eventually(lambda: written(10), timeout=15, what="10 observed")
        assert flowing is not None
        assert flowing.count == 10
        assert flowing.oldest_age == 0

        sink.gate.clear()
        blocked = time.time()
        assert (await api.post("/message", json=body)).status_code == 201
        ages = []

        async def rising() -> bool:
            ages.append((await scrape()).oldest_age)
            return ages[-1] >= 2.0

        await eventually(rising, timeout=15, interval=0.2, what="the age past 2 s")
        assert ages == sorted(ages), ages
        assert ages[-1] > ages[0], ages
        assert (await scrape()).count == 10  # nothing durable meanwhile
        sink.gate.set()
        opened = time.time()

        after = await eventually(lambda: written(20), timeout=15, what="20 observed")
        assert after is not None
        late = after.since(flowing)
        assert late.count == 10
        assert late.sum / late.count >= opened - blocked - 0.1
        assert late.at_most(1.0) == 0  # each waited at least the 2 s the gate was shut
        await eventually(lambda: _age_zero(consumer.http), timeout=5, what="the age back to 0")
        # The 5 unstamped entries are written but not in the histogram.
        await lines_reach(config.data_output_dir, 25)
        assert (await scrape()).count == 20


async def _age_zero(http: httpx.AsyncClient) -> bool:
    return read((await http.get("/metrics")).text)[0].oldest_age == 0
