"""Every worker generation: when it started and stopped, why, and what it wrote.

A worker id is `<shard>-<slot>` (slot in 0..WORKERS_MAX-1); each (re)start of a slot is a
new generation. Live generations are always kept; stopped ones up to a limit (oldest go).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

log = logging.getLogger(__name__)

StopReason = Literal["scale-down", "timeout", "shutdown", "error"]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False, slots=True)
class WorkerRecord:
    shard: int
    slot: int
    generation: int
    started_at: datetime = field(default_factory=_now)
    stopped_at: datetime | None = None
    stop_reason: StopReason | None = None
    entries: int = 0
    batches: int = 0

    @property
    def id(self) -> str:
        return f"{self.shard}-{self.slot}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "shard": self.shard,
            "slot": self.slot,
            "generation": self.generation,
            "started_at": self.started_at.isoformat(),
            "stopped_at": self.stopped_at.isoformat() if self.stopped_at else None,
            "stop_reason": self.stop_reason,
            "entries": self.entries,
            "batches": self.batches,
        }


class WorkerHistory:
    def __init__(self, limit: int = 1000) -> None:
        self._live: dict[tuple[int, int], WorkerRecord] = {}
        self._stopped: deque[WorkerRecord] = deque(maxlen=limit)
        self._generations: dict[tuple[int, int], int] = {}

    def start(self, shard: int, slot: int) -> WorkerRecord:
        generation = self._generations.get((shard, slot), 0) + 1
        self._generations[(shard, slot)] = generation
        record = WorkerRecord(shard, slot, generation)
        self._live[(shard, slot)] = record
        return record

    def stop(self, record: WorkerRecord, reason: StopReason) -> None:
        record.stopped_at = _now()
        record.stop_reason = reason
        if self._live.get((record.shard, record.slot)) is record:
            del self._live[(record.shard, record.slot)]
        self._stopped.append(record)

    def records(self) -> list[WorkerRecord]:
        """Stopped then live generations, each in start order."""
        return sorted([*self._stopped, *self._live.values()], key=lambda r: r.started_at)

    def table(self) -> str:
        """One line per worker id: generations, entries and batches over all of them."""
        totals: dict[str, list[int]] = {}
        for record in self.records():
            row = totals.setdefault(record.id, [0, 0, 0, 0])
            row[0] += 1
            row[1] += record.entries
            row[2] += record.batches
            row[3] = int(record.stopped_at is None)
        lines = [f"{'worker':<8} {'gens':>5} {'entries':>12} {'batches':>10} {'live':>5}"]
        for worker in sorted(totals, key=lambda w: tuple(int(p) for p in w.split("-"))):
            gens, entries, batches, live = totals[worker]
            lines.append(
                f"{worker:<8} {gens:>5} {entries:>12} {batches:>10} {'yes' if live else 'no':>5}"
            )
        return "\n".join(lines)

    async def log_every(self, seconds: float) -> None:
        """Log the table every `seconds` (HISTORY_LOG_INTERVAL_SECONDS), until cancelled."""
        while True:
            await asyncio.sleep(seconds)
            log.info("worker history:\n%s", self.table())
