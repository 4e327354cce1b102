"""`async-data-processor server` as a real process, driven over HTTP, stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aio_pika.abc import AbstractConnection

from services.common.topology import Topology
from tests.support.net import free_port
from tests.support.polling import eventually
from tests.support.process import ServiceProcess, api_env
from tests.support.queues import drain_entries
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq]


def server(topo: Topology, port: int, tmp_path: Path, rabbitmq_url: str) -> ServiceProcess:
    env = {**api_env(topo, port, rabbitmq_url), "SHUTDOWN_TIMEOUT_SECONDS": "10"}
    return ServiceProcess("server", env, tmp_path / "server.log")


def entries(n: int, tag: str) -> list[dict[str, Any]]:
    return [
        {"timestamp": f"2019-10-12T07:20:{i % 60:02d}Z", "value": f"{tag}-{i}"} for i in range(n)
    ]


async def test_server_accepts_over_http_and_stops_cleanly_on_sigterm(
    topology: Callable[..., Topology], amqp: AbstractConnection, tmp_path: Path, rabbitmq_url: str
) -> None:
    topo = topology()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with server(topo, port, tmp_path, rabbitmq_url) as proc:
        await proc.wait_ready(base)
        async with httpx.AsyncClient(base_url=base) as client:
            created = await client.post("/message", json=entries(10, "e2e"))
            metrics = (await client.get("/metrics")).text
        assert created.status_code == 201
        assert 'adp_api_entries_accepted_total{shard="0"} 2.0' in metrics
        assert "process_resident_memory_bytes" in metrics

        started = time.monotonic()
        proc.signal()
        assert proc.wait(15) == 0
        assert time.monotonic() - started < 10
    found = await drain_entries(amqp, topo)
    assert sorted(e["value"] for group in found.values() for e in group) == sorted(
        e["value"] for e in entries(10, "e2e")
    )
    assert "Traceback" not in proc.log


async def test_sigterm_under_load_loses_no_accepted_entry(
    topology: Callable[..., Topology], amqp: AbstractConnection, tmp_path: Path, rabbitmq_url: str
) -> None:
    """In-flight requests finish; every 201 is in the queues; then the process exits 0."""
    topo = topology()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    accepted: list[str] = []
    statuses: list[str] = []

    async def client_loop(worker: int, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            for n in range(10_000):
                if stop.is_set():
                    return
                body = entries(3, f"w{worker}-{n}")
                try:
                    response = await client.post("/message", json=body)
                except httpx.TransportError:
                    statuses.append("refused")
                    return  # the server has closed its socket: it is shutting down
                statuses.append(str(response.status_code))
                if response.status_code == 201:
                    accepted.extend(e["value"] for e in response.json())

    with server(topo, port, tmp_path, rabbitmq_url) as proc:
        await proc.wait_ready(base)
        stop = asyncio.Event()
        clients = [asyncio.create_task(client_loop(w, stop)) for w in range(16)]

        async def under_load() -> bool:
            return len(accepted) >= 600

        await eventually(under_load, timeout=30, what="600 entries accepted")
        proc.signal()
        code = await asyncio.to_thread(proc.wait, 15)
        stop.set()
        await asyncio.gather(*clients)
    assert code == 0
    assert set(statuses) <= {"201", "503", "refused"}
    found = await drain_entries(amqp, topo)
    written = [e["value"] for group in found.values() for e in group]
    assert set(accepted) <= set(written)
    assert len(written) == len(set(written))  # nothing published twice
    assert "Traceback" not in proc.log, proc.log


async def test_sigterm_lets_an_in_flight_request_finish(
    topology: Callable[..., Topology], amqp: AbstractConnection, tmp_path: Path, rabbitmq_url: str
) -> None:
    """A request waiting for its confirm when SIGTERM comes still gets its answer (201),
    then the process exits 0."""
    proxy = TcpProxy.to_broker(rabbitmq_url)
    await proxy.start()
    topo = topology()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    via = proxy.url
    try:
        with server(topo, port, tmp_path, via) as proc:
            await proc.wait_ready(base)
            async with httpx.AsyncClient(base_url=base, timeout=15) as client:
                proxy.pause()  # the broker stops answering: the confirm waits
                request = asyncio.create_task(client.post("/message", json=entries(3, "fly")))
                await asyncio.sleep(0.3)
                assert not request.done()
                proc.signal()
                await asyncio.sleep(0.3)
                proxy.resume()
                response = await request
            assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        await proxy.cut()
    assert response.status_code == 201
    found = await drain_entries(amqp, topo)
    assert sorted(e["value"] for g in found.values() for e in g) == sorted(
        e["value"] for e in entries(3, "fly")
    )
