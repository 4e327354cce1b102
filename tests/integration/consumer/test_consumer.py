"""The consumer against the real RabbitMQ, in-process: files, acks, scaling, timeouts,
faults."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection

from services.common.topology import Topology
from tests.integration.consumer.conftest import Settings
from tests.support.consumer import (
    RunningConsumer,
    SlowSink,
    lines_reach,
    run_consumer,
    unacked,
    written_lines,
)
from tests.support.polling import eventually
from tests.support.publish import entries, publish
from tests.support.queues import depth, queue_counts
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.rabbitmq


async def test_every_entry_written_once_in_files_of_at_most_batch_size(
    settings: Settings, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    topo = topology()
    sent = entries(600, "n")
    config = settings(topo, batch_size=7)
    await publish(amqp, topo, sent[:300], per_message=4)
    async with run_consumer(config) as consumer:
        await publish(amqp, topo, sent[300:], per_message=1)
        lines = await lines_reach(config.data_output_dir, len(sent))
        await eventually(lambda: _all_empty(amqp, topo), timeout=10, what="every message acked")
        workers = (await consumer.http.get("/workers")).json()["workers"]
    assert Counter(e["value"] for e in lines) == Counter(e["value"] for e in sent)
    files = list(config.data_output_dir.glob("*.jsonl"))
    assert all(len(f.read_text().splitlines()) <= 7 for f in files)
    assert all(
        f.name.startswith("testhost_") and f.name.split("_")[1].count("-") == 1 for f in files
    )
    # Nothing left but the ledger (no temporary file), and the ledger settled: every
    # message was acked, so none of it is remembered.
    assert [p.name for p in config.data_output_dir.iterdir() if p.name.startswith(".")] == [
        ".ledger"
    ]
    assert sum(w["entries"] for w in workers) == len(sent)
    assert {w["id"] for w in workers} >= {f"{s}-{k}" for s in range(5) for k in range(3)}


async def _all_empty(amqp: AbstractConnection, topo: Topology) -> bool:
    for name in topo.queue_names:
        if await depth(amqp, name) or await unacked(name):
            return False
    return True


async def test_partial_batch_is_written_after_the_max_wait_without_more_traffic(
    settings: Settings, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    topo = topology(shards_count=1)
    config = settings(topo, batch_size=100, batch_max_wait_seconds=1.0)
    async with run_consumer(config):
        await asyncio.sleep(0.5)  # consumer attached
        sent_at = time.monotonic()
        await publish(amqp, topo, entries(3, "p"), per_message=3)
        await lines_reach(config.data_output_dir, 3, timeout=5)
        waited = time.monotonic() - sent_at
    assert 0.8 <= waited <= 3.0


async def test_a_delivery_spanning_two_batches_is_acked_after_both(
    settings: Settings, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    topo = topology(shards_count=1)
    config = settings(topo, batch_size=3, batch_max_wait_seconds=3.0)
    async with run_consumer(config) as consumer:
        await publish(amqp, topo, entries(5, "s"), per_message=5)
        await lines_reach(config.data_output_dir, 3, timeout=5)  # the full batch
        assert await unacked(topo.queue_name(0)) == 1  # the rest still waits its timer
        [pool] = (await consumer.http.get("/pools")).json()["pools"]
        assert pool == {
            "shard": 0,
            "live": 3,
            "min": 3,
            "max": 4,
            "busy": 0,
            "pending_batches": 0,
            "inflight_entries": 2,
        }
        await lines_reach(config.data_output_dir, 5, timeout=6)

        async def acked() -> bool:
            return await unacked(topo.queue_name(0)) == 0

        await eventually(acked, timeout=5, what="delivery acked")
    assert len(list(config.data_output_dir.glob("*.jsonl"))) == 2


async def test_go_originals_one_entry_messages_are_drained(
    settings: Settings, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    topo = topology()
    sent = entries(40, "go")
    await publish(amqp, topo, sent, single_objects=True)
    config = settings(topo)
    async with run_consumer(config):
        lines = await lines_reach(config.data_output_dir, len(sent))
    assert sorted(e["value"] for e in lines) == sorted(e["value"] for e in sent)


async def test_poison_messages_are_dead_lettered_with_their_reason_and_the_shard_flows(
    settings: Settings, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    import aio_pika

    topo = topology(shards_count=1)
    config = settings(topo)
    poison = (b"not json", b"[]", b'[{"timestamp": "yesterday"}]')
    async with amqp.channel() as channel:
        await topo.declare(channel)
        for number, body in enumerate(poison):
            await channel.default_exchange.publish(
                aio_pika.Message(body, message_id=f"poison-{number}"),
                routing_key=topo.queue_name(0),
            )
    good = entries(5, "after-poison")
    await publish(amqp, topo, good, per_message=5)
    async with run_consumer(config) as consumer:
        await lines_reach(config.data_output_dir, 5)  # the shard keeps flowing
        metrics = (await consumer.http.get("/metrics")).text
    assert await depth(amqp, topo.queue_name(0)) == 0
    assert 'adp_consumer_rejected_messages_total{shard="0"} 3.0' in metrics
    assert sorted(e["value"] for e in written_lines(config.data_output_dir)) == sorted(
        e["value"] for e in good
    )
    assert not (config.data_output_dir / ".rejected").exists()
    dead: dict[str, Any] = {}
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(topo.dead_letter_queue, passive=True)
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            dead[message.message_id or ""] = (message.body, message.headers)
    assert sorted(dead) == ["poison-0", "poison-1", "poison-2"]
    for number, body in enumerate(poison):
        kept, headers = dead[f"poison-{number}"]
        assert kept == body
        assert headers["x-adp-source-queue"] == topo.queue_name(0)
        assert headers["x-adp-shard"] == 0
    assert "not valid JSON" in str(dead["poison-0"][1]["x-adp-reason"])
    assert "empty" in str(dead["poison-1"][1]["x-adp-reason"])
    assert "RFC 3339" in str(dead["poison-2"][1]["x-adp-reason"])


async def test_backlog_grows_the_pool_to_max_then_it_shrinks_back(
    settings: Settings,
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    tmp_path: Path,
) -> None:
    topo = topology(shards_count=1)
    config = settings(
        topo,
        batch_size=5,
        prefetch_count=20,
        scale_up_backlog=50,
        scale_down_backlog=5,
        scale_down_cooldown_seconds=1.5,
    )
    await publish(amqp, topo, entries(1500, "b"), per_message=1)
    async with run_consumer(config, lambda sink: SlowSink(sink, delay=0.02)) as consumer:
        samples: list[int] = []

        async def sample_throughout() -> None:
            while True:
                samples.append(consumer.live()[0])
                await asyncio.sleep(0.01)

        async def live_becomes(size: int, timeout: float) -> None:
            async def probe() -> bool:
                return consumer.live()[0] == size

            await eventually(probe, timeout=timeout, interval=0.01, what=f"{size} live")

        sampler = asyncio.create_task(sample_throughout())
        try:
            await live_becomes(4, timeout=15)
            await lines_reach(config.data_output_dir, 1500, timeout=60)
            await live_becomes(3, timeout=15)
        finally:
            sampler.cancel()
        workers = (await consumer.http.get("/workers")).json()["workers"]
        metrics = (await consumer.http.get("/metrics")).text
    assert set(samples) == {3, 4}  # sampled every 10 ms from start to end: never outside
    assert samples[0] == 3
    assert [w for w in workers if w["stop_reason"] == "scale-down"]
    assert 'adp_consumer_scale_events_total{direction="up",shard="0"} 1.0' in metrics
    processed = [
        line
        for line in metrics.splitlines()
        if line.startswith("adp_worker_processed_entries_total{")
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in processed) == 1500
    assert {line.split('worker="')[1].split('"')[0] for line in processed} >= {"0-0", "0-3"}


async def test_a_batch_slower_than_the_timeout_is_written_once_by_a_fresh_worker(
    settings: Settings, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    topo = topology(shards_count=1)
    config = settings(topo, batch_size=5, worker_timeout_seconds=0.5)
    async with run_consumer(config, lambda sink: SlowSink(sink, 2.0, 1)) as consumer:
        await publish(amqp, topo, entries(5, "t"), per_message=5)
        lines = await lines_reach(config.data_output_dir, 5, timeout=10)
        await asyncio.sleep(2.0)  # the abandoned write would have finished by now
        workers = (await consumer.http.get("/workers")).json()["workers"]
        metrics = (await consumer.http.get("/metrics")).text
    assert sorted(e["value"] for e in written_lines(config.data_output_dir)) == sorted(
        e["value"] for e in lines
    )
    assert len(lines) == 5
    [timed_out] = [w for w in workers if w["stop_reason"] == "timeout"]
    assert timed_out["entries"] == 0
    [fresh] = [w for w in workers if w["id"] == timed_out["id"] and w["generation"] == 2]
    assert fresh["stopped_at"] is None
    assert fresh["entries"] == 5  # the slot's fresh generation wrote the batch
    assert 'adp_consumer_worker_timeouts_total{shard="0"} 1.0' in metrics


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs the test can make read-only and writable again."""
    mountpoint = tmp_path / "volume"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if result.returncode:
        pytest.fail(f"this test mounts a tmpfs and could not: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def remount(mountpoint: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mountpoint)], check=True)


async def test_unwritable_output_acks_nothing_and_resumes_when_writable(
    settings: Settings,
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    small_volume: Path,
) -> None:
    topo = topology(shards_count=1)
    out = small_volume / "out"
    out.mkdir()
    config = settings(topo, data_output_dir=out, batch_size=5)
    async with run_consumer(config) as consumer:
        await eventually(_ready(consumer), timeout=10, what="consumer ready")
        assert (out / ".ledger").is_dir()  # the ledger is on the same volume, unwritable too
        remount(small_volume, "ro")
        try:
            await publish(amqp, topo, entries(5, "ro"), per_message=5)

            async def not_ready() -> bool:
                return (await consumer.http.get("/readyz")).status_code == 503

            await eventually(not_ready, timeout=10, what="readiness false")
            assert await unacked(topo.queue_name(0)) == 1
            assert written_lines(out) == []
        finally:
            remount(small_volume, "rw")
        await lines_reach(out, 5, timeout=15)
        await eventually(_ready(consumer), timeout=15, what="ready again")
    assert await unacked(topo.queue_name(0)) == 0
    assert await depth(amqp, topo.queue_name(0)) == 0


def _ready(consumer: RunningConsumer) -> Callable[[], Any]:
    async def probe() -> bool:
        return (await consumer.http.get("/readyz")).status_code == 200

    return probe


async def test_broker_lost_and_back_the_consumer_resumes_by_itself(
    settings: Settings,
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    proxy: TcpProxy,
    rabbitmq_url: str,
) -> None:
    topo = topology(shards_count=1)
    await proxy.start()
    config = settings(topo, rabbitmq_url=proxy.url)
    async with run_consumer(config) as consumer:
        await eventually(_ready(consumer), timeout=10, what="consumer ready")
        await publish(amqp, topo, entries(5, "before"), per_message=5)
        await lines_reach(config.data_output_dir, 5)
        await proxy.cut()

        async def not_ready() -> bool:
            return (await consumer.http.get("/readyz")).status_code == 503

        await eventually(not_ready, timeout=10, what="not ready without broker")
        await publish(amqp, topo, entries(5, "during"), per_message=5)
        await proxy.start()
        lines = await lines_reach(config.data_output_dir, 10, timeout=30)
        async with amqp.channel() as channel:
            queue = await channel.declare_queue(topo.queue_name(0), passive=True)
            assert queue.declaration_result.consumer_count == 1  # not 0 after recovery
    assert {e["value"] for e in lines} == {e["value"] for e in entries(5, "before")} | {
        e["value"] for e in entries(5, "during")
    }


async def test_quorum_queues_are_consumed_the_same(
    settings: Settings, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    base = topology(shards_count=2)
    topo = Topology(base.prefix, 2, queue_type="quorum", delivery_limit=5)
    config = settings(topo, queue_type="quorum", queue_delivery_limit=5)
    sent = entries(40, "q")
    try:
        await publish(amqp, topo, sent, per_message=3)
        async with run_consumer(config):
            lines = await lines_reach(config.data_output_dir, len(sent))
        assert sorted(e["value"] for e in lines) == sorted(e["value"] for e in sent)
        assert await depth(amqp, topo.queue_name(0)) == 0
    finally:
        async with amqp.channel() as channel:
            await channel.queue_delete(topo.dead_letter_queue)


@pytest.mark.parametrize("header", ["²", "9" * 5000, "2,x"])
async def test_a_malformed_parts_header_is_dead_lettered_and_the_shard_flows(
    settings: Settings, topology: Callable[..., Topology], amqp: AbstractConnection, header: str
) -> None:
    """A header that does not parse (not ASCII digits, a count of thousands of digits) goes
    to the poison path with its reason, instead of failing the message callback forever."""
    import aio_pika

    topo = topology(shards_count=1)
    config = settings(topo)
    body = b'[{"timestamp": "2019-10-12T07:20:50Z", "value": "bad-header"}]'
    async with amqp.channel() as channel:
        await topo.declare(channel)
        await channel.default_exchange.publish(
            aio_pika.Message(body, message_id="bad", headers={"x-adp-parts": header}),
            routing_key=topo.queue_name(0),
        )
    good = entries(5, "after-bad-header")
    await publish(amqp, topo, good, per_message=5)
    async with run_consumer(config):
        await lines_reach(config.data_output_dir, 5)
        await eventually(
            lambda: _no_unacked(topo.queue_name(0)), timeout=10, what="every message settled"
        )
    assert sorted(e["value"] for e in written_lines(config.data_output_dir)) == sorted(
        e["value"] for e in good
    )
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(topo.dead_letter_queue, passive=True)
        dead = await queue.get(fail=False, no_ack=True)
    assert dead is not None
    assert dead.body == body
    assert "x-adp-parts" in str(dead.headers["x-adp-reason"])


async def _no_unacked(queue: str) -> bool:
    return (await queue_counts()).get(queue, (0, 0)) == (0, 0)
