"""`async-data-processor message-consumer` and `dev` as real processes: SIGTERM drains,
kill -9 loses nothing, the dev command carries an entry from HTTP to a file."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from aio_pika.abc import AbstractConnection

from services.common.topology import Topology
from tests.support.consumer import written_lines
from tests.support.net import free_port
from tests.support.polling import eventually
from tests.support.process import (
    E2E_BATCHES,
    ServiceProcess,
    consumer_env,
    kill_9_rounds,
    until_drained,
)
from tests.support.publish import entries, feed, publish
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq]


async def test_sigterm_mid_stream_drains_within_the_bound_and_loses_nothing(
    topology: Callable[..., Topology], amqp: AbstractConnection, tmp_path: Path, rabbitmq_url: str
) -> None:
    topo = topology()
    out = tmp_path / "out"
    port = free_port()
    env = consumer_env(topo, out, port, rabbitmq_url, **E2E_BATCHES)
    total = 4000
    with ServiceProcess("message-consumer", env, tmp_path / "c1.log") as proc:
        await proc.wait_ready(f"http://127.0.0.1:{port}")
        feeding = asyncio.create_task(feed(amqp, topo, total, "term"))
        await eventually(lambda: _at_least(out, 500), timeout=20, what="consumer mid-stream")
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 15)
        took = time.monotonic() - started
        await feeding
    assert code == 0, proc.log
    assert took < 10.5
    assert "consumer stopped" in proc.log
    assert "worker history at shutdown" in proc.log
    assert "0-0" in proc.log.split("worker history at shutdown")[1]
    first_run = Counter(e["value"] for e in written_lines(out))
    assert max(first_run.values()) == 1

    with ServiceProcess("message-consumer", env, tmp_path / "c2.log") as proc:
        await until_drained(proc, port, amqp, topo, lambda: len(written_lines(out)), total, 30)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    written = Counter(e["value"] for e in written_lines(out))
    assert set(written) == {e["value"] for e in entries(total, "term")}
    assert max(written.values()) == 1  # a clean drain acked everything it wrote


async def test_kill_9_mid_stream_then_restart_loses_no_entry(
    topology: Callable[..., Topology], amqp: AbstractConnection, tmp_path: Path, rabbitmq_url: str
) -> None:
    topo = topology()
    out = tmp_path / "out"
    port = free_port()
    env = consumer_env(topo, out, port, rabbitmq_url, **E2E_BATCHES)
    total = 4000
    feeding = asyncio.create_task(feed(amqp, topo, total, "kill"))
    await kill_9_rounds(env, port, tmp_path, lambda: len(written_lines(out)), timeout=20)
    await feeding
    with ServiceProcess("message-consumer", env, tmp_path / "final.log") as proc:
        await until_drained(proc, port, amqp, topo, lambda: len(written_lines(out)), total, 30)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    written = Counter(e["value"] for e in written_lines(out))
    assert set(written) == {e["value"] for e in entries(total, "kill")}  # none lost
    assert not list(out.glob(".*.tmp"))


async def _at_least(out: Path, count: int) -> bool:
    return len(written_lines(out)) >= count


async def test_dev_runs_api_and_consumer_in_one_process(
    topology: Callable[..., Topology], tmp_path: Path, rabbitmq_url: str
) -> None:
    topo = topology()
    out = tmp_path / "out"
    api_port, metrics_port = free_port(), free_port()
    env = {
        **consumer_env(topo, out, metrics_port, rabbitmq_url, **E2E_BATCHES),
        "PORT": str(api_port),
        "HOST": "127.0.0.1",
    }
    sent = entries(12, "dev")
    with ServiceProcess("dev", env, tmp_path / "dev.log") as proc:
        await proc.wait_ready(f"http://127.0.0.1:{api_port}")
        await proc.wait_ready(f"http://127.0.0.1:{metrics_port}")
        async with httpx.AsyncClient() as client:
            response = await client.post(f"http://127.0.0.1:{api_port}/message", json=sent)
        assert response.status_code == 201
        await eventually(lambda: _at_least(out, len(sent)), timeout=10, what="entries on disk")
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0, proc.log
    assert sorted(e["value"] for e in written_lines(out)) == sorted(e["value"] for e in sent)


async def test_a_second_signal_exits_at_once(
    topology: Callable[..., Topology], amqp: AbstractConnection, tmp_path: Path, rabbitmq_url: str
) -> None:
    """The drain is held up by a broker that stopped answering; a second SIGTERM ends the
    process at once (status 130), and nothing it had not acked is lost."""
    proxy = TcpProxy.to_broker(rabbitmq_url)
    await proxy.start()
    topo = topology()
    out = tmp_path / "out"
    port = free_port()
    env = consumer_env(topo, out, port, rabbitmq_url, **E2E_BATCHES)
    via = {**env, "RABBITMQ_URL": proxy.url}
    await publish(amqp, topo, entries(2000, "twice"), per_message=1)
    try:
        with ServiceProcess("message-consumer", via, tmp_path / "c.log") as proc:
            await proc.wait_ready(f"http://127.0.0.1:{port}")
            proxy.pause()
            proc.signal(signal.SIGTERM)

            async def draining() -> bool:
                return "SIGTERM: draining" in proc.log

            await eventually(draining, timeout=10, what="drain started")
            started = time.monotonic()
            proc.signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 15)
            assert time.monotonic() - started < 2
    finally:
        await proxy.cut()
    assert code == 130, proc.log
    assert "second SIGTERM: exiting now" in proc.log
    with ServiceProcess("message-consumer", env, tmp_path / "c2.log") as proc:
        await proc.wait_ready(f"http://127.0.0.1:{port}")
        await eventually(lambda: _at_least(out, 2000), timeout=30, what="all entries")
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    assert {e["value"] for e in written_lines(out)} == {e["value"] for e in entries(2000, "twice")}
