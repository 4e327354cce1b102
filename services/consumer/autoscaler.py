"""Grows each shard's pool when its queue backs up, shrinks it after the backlog has stayed
shallow for a cool-down.

Hysteresis, so the pool does not flap: it grows (one worker per reading) at
SCALE_UP_BACKLOG ready messages or more, and shrinks (one worker per cool-down) only after
the depth has stayed at or below SCALE_DOWN_BACKLOG for SCALE_DOWN_COOLDOWN_SECONDS; any
reading above that restarts the cool-down. The pool keeps its size within [min, max].
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Literal, Protocol

from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from services.common.broker import CONNECTIVITY_ERRORS
from services.common.topology import Topology
from services.consumer.metrics import ConsumerMetrics
from services.consumer.pool import Pool
from services.consumer.settings import ConsumerSettings

log = logging.getLogger(__name__)

Decision = Literal["grow", "shrink"] | None


class DepthProbe(Protocol):
    """Ready messages in a shard's queue (raises a connectivity error when it cannot tell)."""

    async def depth(self, shard: int) -> int: ...


class BrokerDepthProbe:
    """Ready messages per shard queue, by a passive declare on a channel of its own. It
    also keeps each queue's consumer count from the same answer (readiness uses it)."""

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self.consumers: dict[int, int] = {}

    def attach(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection

    async def depth(self, shard: int) -> int:
        if self._connection is None or not self._connection.connected.is_set():
            raise ConnectionError("broker not connected")
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        queue = await self._channel.declare_queue(
            self._topology.queue_name(shard), passive=True, robust=False
        )
        self.consumers[shard] = queue.declaration_result.consumer_count or 0
        return queue.declaration_result.message_count or 0


@dataclass(slots=True)
class Hysteresis:
    up: int
    down: int
    cooldown: float
    shallow_since: float | None = None

    def decide(self, depth: int, now: float) -> Decision:
        if depth >= self.up:
            self.shallow_since = None
            return "grow"
        if depth > self.down:
            self.shallow_since = None
            return None
        if self.shallow_since is None:
            self.shallow_since = now
        if now - self.shallow_since >= self.cooldown:
            self.shallow_since = now  # the next step down waits a full cool-down again
            return "shrink"
        return None


class Autoscaler:
    def __init__(
        self,
        pools: list[Pool],
        probe: DepthProbe,
        metrics: ConsumerMetrics,
        *,
        up: int,
        down: int,
        cooldown: float,
        interval: float,
    ) -> None:
        self._pools = pools
        self._probe = probe
        self._metrics = metrics
        self._interval = interval
        self._states = [Hysteresis(up, down, cooldown) for _ in pools]

    @classmethod
    def from_settings(
        cls,
        settings: ConsumerSettings,
        pools: list[Pool],
        probe: DepthProbe,
        metrics: ConsumerMetrics,
    ) -> Autoscaler:
        return cls(
            pools,
            probe,
            metrics,
            up=settings.scale_up_backlog,
            down=settings.scale_down_backlog,
            cooldown=settings.scale_down_cooldown_seconds,
            interval=settings.scale_interval_seconds,
        )

    async def run(self) -> None:
        while True:
            for pool, state in zip(self._pools, self._states, strict=True):
                await self._step(pool, state)
            await asyncio.sleep(self._interval)

    async def _step(self, pool: Pool, state: Hysteresis) -> None:
        try:
            depth = await self._probe.depth(pool.shard)
        except CONNECTIVITY_ERRORS as exc:
            log.debug("queue depth of shard %d unknown: %s", pool.shard, exc)
            return
        self._metrics.queue_depth.labels(str(pool.shard)).set(depth)
        decision = state.decide(depth, time.monotonic())
        if decision == "grow":
            pool.grow()
        elif decision == "shrink":
            pool.shrink()
