"""The real consumer service, run inside the test's event loop, on the real broker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from services.common.metrics import new_registry
from services.consumer.batch import Batch
from services.consumer.runner import serve
from services.consumer.service import ConsumerService
from services.consumer.settings import ConsumerSettings
from services.consumer.sink import Sink
from tests.support.polling import eventually
from tests.support.queues import queue_counts


@dataclass
class RunningConsumer:
    service: ConsumerService
    http: httpx.AsyncClient

    def live(self) -> list[int]:
        return [pool.live for pool in self.service.pools]


@asynccontextmanager
async def run_consumer(
    settings: ConsumerSettings, wrap_sink: Callable[[Sink], Sink] | None = None
) -> AsyncIterator[RunningConsumer]:
    """The consumer service with its HTTP server; `wrap_sink` wraps its own sink."""
    stop = asyncio.Event()
    ready: asyncio.Future[tuple[ConsumerService, int]] = asyncio.get_running_loop().create_future()

    def started(service: ConsumerService, port: int) -> None:
        ready.set_result((service, port))

    task = asyncio.create_task(
        serve(
            settings,
            stop,
            registry=new_registry(process=False),
            wrap_sink=wrap_sink,
            started=started,
        )
    )
    try:
        waits: set[asyncio.Future[Any]] = {ready, task}
        done, _ = await asyncio.wait(waits, timeout=20, return_when="FIRST_COMPLETED")
        if task in done:
            await task
        service, port = ready.result()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield RunningConsumer(service, http)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def written_lines(directory: Path) -> list[dict[str, Any]]:
    """Every entry in every finished batch file of `directory`."""
    return [
        json.loads(line)
        for path in sorted(directory.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


class WrappedSink:
    """The real sink, through the pool's sink seam; subclasses change `write`."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner

    def prepare(self) -> int:
        return self.inner.prepare()

    async def write(self, batch: Batch, worker: str) -> Batch:
        return await self.inner.write(batch, worker)

    async def reject(self, body: bytes, reason: str, message_id: str | None) -> str:
        return await self.inner.reject(body, reason, message_id)

    async def check(self) -> None:
        await self.inner.check()


class SlowSink(WrappedSink):
    """A sink that takes `delay` seconds before each write (the first `slow_batches` only,
    if given): a slow disk, through the sink seam the pool already has."""

    def __init__(self, inner: Sink, delay: float, slow_batches: int | None = None) -> None:
        super().__init__(inner)
        self.delay = delay
        self.slow_batches = slow_batches
        self.calls = 0

    async def write(self, batch: Batch, worker: str) -> Batch:
        self.calls += 1
        if self.slow_batches is None or self.calls <= self.slow_batches:
            await asyncio.sleep(self.delay)
        return await self.inner.write(batch, worker)


Reader = Callable[[Path], list[dict[str, Any]]]


async def lines_reach(
    directory: Path, count: int, timeout: float = 20, read: Reader = written_lines
) -> list[dict[str, Any]]:
    """`read(directory)` once it holds `count` entries or more (within `timeout` s)."""

    async def probe() -> list[dict[str, Any]] | None:
        found = read(directory)
        return found if len(found) >= count else None

    result = await eventually(probe, timeout=timeout, what=f"{count} lines under {directory}")
    assert result is not None
    return result


async def unacked(queue: str) -> int:
    """Messages delivered but not acked (rabbitmqctl; the AMQP API cannot tell)."""
    return (await queue_counts()).get(queue, (0, 0))[1]
