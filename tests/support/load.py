"""A steady load of careful clients against the real API, and the fault suite's figures.

Each client sends requests of a few entries with unique values and an `Idempotency-Key`;
on a 503, a 408, a broken connection or a timeout it retries the same request with the same
key (what a client of this API should do) until it gets its 201 or the load's final
deadline passes. Every answer is tallied, so a scenario can assert "never a 500" and how
fast 503s came.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.consumer import written_lines

RETRYABLE = {408, 503}


@dataclass
class Load:
    base_url: str
    tag: str
    clients: int = 6
    entries_per_request: int = 5
    pause: float = 0.01  # between a client's requests: a steady, not a saturating, load
    request_timeout: float = 10.0
    sent: list[str] = field(default_factory=list)  # values of every request tried
    accepted: list[str] = field(default_factory=list)  # values of requests answered 201
    statuses: Counter[str] = field(default_factory=Counter)
    slowest_refusal: float = 0.0  # longest wait for a 503/408 answer, seconds
    retries: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _accepted_at: list[float] = field(default_factory=list)
    _stopped_at: float | None = None

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(n)) for n in range(self.clients)]

    async def stop(self, settle: float = 60.0) -> None:
        """Stop sending new requests; wait (at most `settle` s) for retries to finish."""
        self._stop.set()
        self._stopped_at = time.monotonic()
        done, pending = await asyncio.wait(self._tasks, timeout=settle)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a client's assertion error surfaces here
        assert not pending, f"{len(pending)} clients still retrying after {settle}s"

    def accepted_since(self, moment: float) -> int:
        return sum(1 for t in self._accepted_at if t >= moment)

    def longest_gap(self, since: float, until: float | None = None) -> float:
        """The longest stretch, in seconds, without a 201 between `since` and `until`
        (default: when the load stopped, or now) — a fault's cost to the clients."""
        end = until or self._stopped_at or time.monotonic()
        moments = [since, *(t for t in self._accepted_at if since < t < end), end]
        return max(b - a for a, b in itertools.pairwise(moments))

    async def _client(self, number: int) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.request_timeout) as http:
            seq = 0
            while not self._stop.is_set():
                values = [f"{self.tag}-{number}-{seq}-{i}" for i in range(self.entries_per_request)]
                body = [
                    {"timestamp": f"2019-10-12T07:20:{(seq + i) % 60:02d}.5Z", "value": v}
                    for i, v in enumerate(values)
                ]
                self.sent.extend(values)
                if await self._send(http, body):
                    self.accepted.extend(values)
                    self._accepted_at.append(time.monotonic())
                seq += 1
                await asyncio.sleep(self.pause)

    async def _send(self, http: httpx.AsyncClient, body: list[dict[str, Any]]) -> bool:
        """Send until 201 (True); give up (False) only when stopped and still failing."""
        key = uuid.uuid4().hex
        content = json.dumps(body).encode()
        headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
        give_up_at: float | None = None
        while True:
            started = time.monotonic()
            try:
                response = await http.post("/message", content=content, headers=headers)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                self.statuses[type(exc).__name__] += 1
            else:
                status = response.status_code
                self.statuses[str(status)] += 1
                if status == 201:
                    return True
                assert status in RETRYABLE, f"unexpected {status}: {response.text}"
                self.slowest_refusal = max(self.slowest_refusal, time.monotonic() - started)
            if self._stop.is_set():
                give_up_at = give_up_at or time.monotonic() + 45
                if time.monotonic() > give_up_at:
                    return False
            self.retries += 1
            await asyncio.sleep(0.2)


@dataclass
class Figures:
    scenario: str
    sent: int
    accepted: int
    written: int
    duplicated: int
    lost: int
    notes: str = ""

    @classmethod
    def count(cls, scenario: str, load: Load, out: Path, notes: str = "") -> Figures:
        lines = Counter(e["value"] for e in written_lines(out))
        ours = {v: n for v, n in lines.items() if v.startswith(f"{load.tag}-")}
        return cls(
            scenario=scenario,
            sent=len(load.sent),
            accepted=len(load.accepted),
            written=sum(ours.values()),
            duplicated=sum(n - 1 for n in ours.values() if n > 1),
            lost=sum(1 for v in load.accepted if v not in ours),
            notes=notes,
        )

    def save(self, directory: Path) -> None:
        """One JSON file per scenario, for the report (`bench/fault_report.py`)."""
        directory.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "-" for c in self.scenario.lower())
        (directory / f"{slug}.json").write_text(json.dumps(self.__dict__, indent=1))
