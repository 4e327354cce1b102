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

from services.common.broker import CONNECTIVITY_ERRORS
from services.consumer.metrics import ConsumerMetrics
from services.consumer.pool import Pool

log = logging.getLogger(__name__)

Decision = Literal["grow", "shrink"] | None


class DepthProbe(Protocol):
    """Ready messages in a shard's queue (raises a connectivity error when it cannot tell)."""

    async def depth(self, shard: int) -> int: ...


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
