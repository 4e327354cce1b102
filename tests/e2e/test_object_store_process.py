"""The object-store sink through real `message-consumer` processes and a real SeaweedFS
server, no local volume: kill -9 mid-stream twice loses nothing and writes nothing twice
(the ledger is in the bucket); two replicas sharing the bucket, one of them killed -9,
write every entry once; the store killed and started again under load: nothing acked
while it is down, not ready, errors counted, everything written once after."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from aio_pika.abc import AbstractConnection

from services.common.topology import Topology
from tests.support.net import free_port
from tests.support.output import HIVE, spread_entries
from tests.support.polling import eventually
from tests.support.process import (
    E2E_BATCHES,
    ServiceProcess,
    consumer_env,
    kill_9_rounds,
    until_drained,
)
from tests.support.publish import feed
from tests.support.queues import drained, queue_counts
from tests.support.seaweed import CREDENTIALS, SeaweedServer, all_entries

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq]


def object_env(
    topo: Topology, tmp_path: Path, port: int, rabbitmq_url: str, url: str, endpoint: str
) -> dict[str, str]:
    return {
        **consumer_env(topo, tmp_path / "no-volume", port, rabbitmq_url, **E2E_BATCHES),
        **CREDENTIALS,
        "OUTPUT_URL": url,
        "S3_ENDPOINT_URL": endpoint,
        "OUTPUT_PATH_TEMPLATE": HIVE,
        "OUTPUT_COMPRESSION": "zstd",
        "EXACTLY_ONCE": "true",
    }


async def count(seaweed: SeaweedServer, url: str) -> int:
    return len(await asyncio.to_thread(all_entries, seaweed.store(url)))


def assert_once(seaweed: SeaweedServer, url: str, total: int, tag: str) -> None:
    written = Counter(e["value"] for e in all_entries(seaweed.store(url)))
    sent = {e["value"] for e in spread_entries(total, tag)}
    assert set(written) == sent, f"lost: {len(sent - set(written))}"
    assert [v for v, n in written.items() if n > 1] == []  # none twice: the ledger


async def test_kill_9_mid_stream_loses_nothing_and_duplicates_nothing_without_a_volume(
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    tmp_path: Path,
    rabbitmq_url: str,
    seaweed: SeaweedServer,
    bucket: str,
) -> None:
    topo = topology()
    port = free_port()
    url = f"s3://{bucket}/kill"
    env = object_env(topo, tmp_path, port, rabbitmq_url, url, seaweed.endpoint)
    total = 4000
    feeding = asyncio.create_task(feed(amqp, topo, total, "s3kill", spread_entries))
    await kill_9_rounds(env, port, tmp_path, lambda: count(seaweed, url), timeout=30)
    await feeding
    with ServiceProcess("message-consumer", env, tmp_path / "final.log") as proc:
        await until_drained(proc, port, amqp, topo, lambda: count(seaweed, url), total, 60)
        assert await asyncio.to_thread(proc.wait, 15) == 0, proc.log
    assert_once(seaweed, url, total, "s3kill")
    assert not (tmp_path / "no-volume").exists()  # nothing written locally


async def test_two_replicas_sharing_the_bucket_one_killed_write_every_entry_once(
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    tmp_path: Path,
    rabbitmq_url: str,
    seaweed: SeaweedServer,
    bucket: str,
) -> None:
    topo = topology()
    url = f"s3://{bucket}/shared"
    ports = [free_port(), free_port()]
    envs = [
        {**object_env(topo, tmp_path, p, rabbitmq_url, url, seaweed.endpoint), "HOST_NAME": f"r{i}"}
        for i, p in enumerate(ports)
    ]
    total = 4000
    feeding = asyncio.create_task(feed(amqp, topo, total, "s3pair", spread_entries))
    with (
        ServiceProcess("message-consumer", envs[0], tmp_path / "r0.log") as first,
        ServiceProcess("message-consumer", envs[1], tmp_path / "r1.log") as second,
    ):
        await first.wait_ready(f"http://127.0.0.1:{ports[0]}")
        await second.wait_ready(f"http://127.0.0.1:{ports[1]}")

        async def halfway() -> bool:
            return await count(seaweed, url) >= 1000

        await eventually(halfway, timeout=30, what="progress")
        first.signal(signal.SIGKILL)  # its unacked deliveries go to the other replica
        first.wait(10)
        await feeding

        async def everything() -> bool:
            return await count(seaweed, url) >= total

        await eventually(everything, timeout=60, what="all entries")
        await eventually(lambda: drained(amqp, topo), timeout=10, what="queues drained")
    assert_once(seaweed, url, total, "s3pair")
    keys = [key for key, _ in seaweed.store(url).keys("")]
    assert {key.rsplit("/", 1)[1].split("_")[0] for key in keys if not key.startswith(".")} == {
        "r0",
        "r1",
    }


async def test_the_store_killed_and_restarted_under_load_loses_nothing(
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    tmp_path: Path,
    rabbitmq_url: str,
) -> None:
    """A store of its own (the session's is shared): killed -9 under load, the consumer
    acks nothing more, turns not ready and counts errors; started again on the same data,
    the writes resume by themselves and every entry is in an object once."""
    store = SeaweedServer(tmp_path / "weed")
    store.start()
    try:
        store.create_bucket("adp-restart")
        topo = topology()
        port = free_port()
        url = "s3://adp-restart/load"
        env = object_env(topo, tmp_path, port, rabbitmq_url, url, store.endpoint)
        total = 3000
        with ServiceProcess("message-consumer", env, tmp_path / "c.log") as proc:
            base = f"http://127.0.0.1:{port}"
            await proc.wait_ready(base)
            feeding = asyncio.create_task(feed(amqp, topo, total, "s3down", spread_entries))

            async def started() -> bool:
                return await count(store, url) >= 300

            await eventually(started, timeout=30, what="progress before the kill")
            store.stop(signal.SIGKILL)

            async def not_ready() -> bool:
                async with httpx.AsyncClient(timeout=5) as http:
                    return (await http.get(f"{base}/readyz")).status_code == 503

            await eventually(not_ready, timeout=30, what="not ready while the store is down")
            await feeding
            await asyncio.sleep(2)
            counts = await queue_counts()
            backlog = sum(sum(counts.get(name, (0, 0))) for name in topo.queue_names)
            assert backlog > 0  # nothing acked while down: everything still in the queues
            async with httpx.AsyncClient(timeout=5) as http:
                metrics = (await http.get(f"{base}/metrics")).text
            assert "adp_consumer_object_store_errors_total" in metrics
            assert any(
                line.startswith("adp_consumer_object_store_errors_total")
                and not line.endswith(" 0.0")
                for line in metrics.splitlines()
            ), metrics
            assert "could not write a batch" in proc.log
            store.start()  # same directory, same ports

            async def everything() -> bool:
                return await count(store, url) >= total

            await eventually(everything, timeout=90, what="all entries after the restart")
            await eventually(lambda: drained(amqp, topo), timeout=20, what="queues drained")
            await proc.wait_ready(base)
        assert_once(store, url, total, "s3down")
    finally:
        store.stop(signal.SIGKILL)
