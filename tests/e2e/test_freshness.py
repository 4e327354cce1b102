"""Latency end to end: the real `server` stamps what it accepts, the real
`message-consumer` measures accepted -> durable; both read from the consumer's /metrics
after traffic, then while its output volume is full (a write that cannot happen), then
after the volume is freed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from services.common.topology import Topology
from services.consumer.freshness import FRESHNESS_BUCKETS
from tests.support.faults import fill, tmpfs_volume
from tests.support.freshness import Latency, read, total
from tests.support.net import free_port
from tests.support.polling import eventually
from tests.support.process import ServiceProcess, api_env, consumer_env

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq, pytest.mark.timeout(240)]

ENTRIES_PER_REQUEST = 10


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of the test's own, to fill up."""
    with tmpfs_volume(tmp_path / "volume") as mountpoint:
        yield mountpoint


async def post(api: httpx.AsyncClient, requests: int, tag: str) -> Counter[int]:
    """`requests` requests of entries spread over the 5 shards; entries sent per shard."""
    per_shard: Counter[int] = Counter()
    for i in range(requests):
        seconds = [(i + n) % 60 for n in range(ENTRIES_PER_REQUEST)]
        body = [
            {"timestamp": f"2019-10-12T07:20:{s:02d}Z", "value": f"{tag}-{i}-{n}"}
            for n, s in enumerate(seconds)
        ]
        response = await api.post("/message", json=body)
        assert response.status_code == 201, response.text
        per_shard.update(s % 5 for s in seconds)
    return per_shard


async def figures(consumer: httpx.AsyncClient) -> dict[int, Latency]:
    return read((await consumer.get("/metrics")).text)


async def test_freshness_after_traffic_and_while_a_write_is_stalled(
    topology: Callable[..., Topology], tmp_path: Path, volume: Path, rabbitmq_url: str
) -> None:
    topo = topology()
    api_port, consumer_port = free_port(), free_port()
    server_env = api_env(topo, api_port, rabbitmq_url)
    cons_env = consumer_env(
        topo,
        volume / "out",
        consumer_port,
        rabbitmq_url,
        HOST_NAME="freshness",
        BATCH_SIZE="20",
        BATCH_MAX_WAIT_SECONDS="0.2",
        SHUTDOWN_TIMEOUT_SECONDS="10",
        # Without the ledger nothing in the volume is ever deleted by the consumer, so once
        # full it stays full until the test frees it (freshness does not depend on it).
        EXACTLY_ONCE="false",
    )
    api_url, consumer_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{consumer_port}"
    with (
        ServiceProcess("server", server_env, tmp_path / "server.log") as api_process,
        ServiceProcess("message-consumer", cons_env, tmp_path / "consumer.log") as cons,
    ):
        await api_process.wait_ready(api_url)
        await cons.wait_ready(consumer_url)
        async with (
            httpx.AsyncClient(base_url=api_url, timeout=10) as api,
            httpx.AsyncClient(base_url=consumer_url, timeout=10) as consumer,
        ):
            start = await figures(consumer)
            assert sorted(start) == list(range(5)), "a series for every shard from start-up"
            assert all(f.count == 0 and f.oldest_age == 0 for f in start.values()), start

            # 1. Traffic: every entry observed once, on its shard, within seconds; none
            # left unwritten.
            sent = await post(api, 50, "flow")

            async def all_observed(want: int = sum(sent.values())) -> dict[int, Latency]:
                now = await figures(consumer)
                return now if total(now).count >= want else {}

            flowing = await eventually(all_observed, timeout=30, what="every entry observed")
            assert {s: f.count for s, f in flowing.items()} == dict(sent)
            assert total(flowing).quantile(0.99) < 10, flowing  # a 0.2 s batch wait
            assert all(f.oldest_age == 0 for f in flowing.values()), flowing

            # 2. The volume fills up: writes fail and are retried, nothing is durable, and
            # the oldest unwritten age rises although nothing is written.
            await asyncio.to_thread(fill, volume / "filler")
            held = await post(api, 20, "held")
            posted = time.time()
            rising: list[float] = []

            async def age_rising() -> bool:
                rising.append(total(await figures(consumer)).oldest_age)
                return len(rising) > 1 and rising[-1] >= rising[0] + 2.0

            await eventually(age_rising, timeout=20, interval=0.5, what="the age to rise")
            stalled = await figures(consumer)
            assert total(stalled).count == total(flowing).count, "nothing durable while full"
            assert rising == sorted(rising), rising

            # 3. Freed: the held entries become durable, each observed with at least the
            # time it waited; the age is back to 0.
            (volume / "filler").unlink()
            freed = time.time()

            async def held_observed(want: int = sum(held.values())) -> dict[int, Latency]:
                now = await figures(consumer)
                return now if total(now).count - total(flowing).count >= want else {}

            after = await eventually(held_observed, timeout=30, what="the held entries")
            late = {shard: f.since(flowing[shard]) for shard, f in after.items()}
            assert {s: f.count for s, f in late.items() if f.count} == dict(held)
            waited = freed - posted  # every held entry was accepted before `posted`
            floor = max(b for b in FRESHNESS_BUCKETS if b <= waited - 0.1)
            assert total(late).at_most(floor) == 0, (waited, late)
            assert total(late).sum / total(late).count >= waited
            await eventually(
                lambda: _all_zero(consumer), timeout=10, what="the oldest unwritten age at 0"
            )
        for process in (cons, api_process):
            process.signal()
            assert await asyncio.to_thread(process.wait, 20) == 0, process.log


async def _all_zero(consumer: httpx.AsyncClient) -> bool:
    return all(f.oldest_age == 0 for f in (await figures(consumer)).values())
