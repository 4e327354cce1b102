"""The real API app served by a real uvicorn inside the test's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from aio_pika.abc import AbstractConnection

from services.api.app import create_app
from services.api.server import uvicorn_config
from services.api.settings import ApiSettings
from services.common.http import Server
from services.common.metrics import new_registry
from services.common.topology import Topology


@asynccontextmanager
async def serve_api(settings: ApiSettings) -> AsyncIterator[httpx.AsyncClient]:
    """Serve the API on a free loopback port; yield an HTTP client bound to it."""
    app = create_app(settings, registry=new_registry(process=False))
    config = uvicorn_config(settings, app=app, host="127.0.0.1", port=0)  # as served
    server = Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            await task  # surfaces the start-up error
            raise AssertionError("uvicorn did not start")
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


async def post_unroutable(
    client: httpx.AsyncClient, amqp: AbstractConnection, topo: Topology, body: list[Any]
) -> httpx.Response:
    """POST `body` after shard 0's queue was deleted: the broker returns the publish."""
    async with amqp.channel() as channel:
        await channel.queue_delete(topo.queue_name(0))
    return await client.post("/message", json=body)
