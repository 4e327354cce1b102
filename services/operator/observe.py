"""What the operator reads besides Kubernetes: each shard queue's backlog from RabbitMQ,
and each consumer pod's pool state from its own `/pools` endpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import aio_pika
import aiohttp

from services.common.broker import CONNECTIVITY_ERRORS
from services.common.nodes import Nodes
from services.common.topology import Topology


class ObserveError(Exception):
    """The broker or a pod could not be read now; worth retrying later."""


@dataclass(frozen=True, slots=True)
class PoolState:
    shard: int
    live: int
    max: int
    inflight_entries: int

    @property
    def saturated(self) -> bool:
        return self.live >= self.max


class BacklogReader(Protocol):
    async def backlog(self, url: str, topology: Topology) -> list[int]:
        """Ready messages per shard queue, in shard order."""


class PoolReader(Protocol):
    async def pools(self, ip: str, port: int) -> list[PoolState]:
        """The pod's pool state per shard."""


class RabbitBacklog:
    """One short connection per reading: passive declares (~0.3 ms each), then closed.
    `url` may list a cluster's nodes comma-separated (RABBITMQ_URL): they are tried in
    turn, from a random one, until one answers."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._timeout = timeout

    async def backlog(self, url: str, topology: Topology) -> list[int]:
        try:
            nodes = Nodes.parse(url)
        except ValueError as exc:
            raise ObserveError(f"broker: the Secret's RABBITMQ_URL is invalid: {exc}") from exc
        errors = []
        for _ in range(len(nodes)):
            try:
                return await self._read(str(nodes.current), topology)
            except CONNECTIVITY_ERRORS as exc:
                errors.append(f"{nodes.shown}: {exc or type(exc).__name__}")
            nodes.advance()
        raise ObserveError(f"broker: {'; '.join(errors)}")

    async def _read(self, url: str, topology: Topology) -> list[int]:
        connection = await aio_pika.connect(url, timeout=self._timeout)
        async with connection, connection.channel() as channel:
            counts = []
            for name in topology.queue_names:
                queue = await channel.declare_queue(name, passive=True)
                counts.append(queue.declaration_result.message_count or 0)
            return counts


class HttpPools:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def pools(self, ip: str, port: int) -> list[PoolState]:
        url = f"http://{ip}:{port}/pools"
        try:
            async with self._session.get(url) as response:
                response.raise_for_status()
                body: dict[str, Any] = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ObserveError(f"{url}: {exc}") from exc
        return [
            PoolState(p["shard"], p["live"], p["max"], p["inflight_entries"]) for p in body["pools"]
        ]
