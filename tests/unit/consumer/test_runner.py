"""Leaving: a hung volume does not hold the process's exit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path

import uvloop

from tests.support import deliveries


def release_readers(fifo: Path) -> None:
    """Let every thread blocked opening `fifo` go on (they then read nothing), and remove
    it so no new one blocks."""
    with contextlib.suppress(OSError):
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails when nobody is blocked
        os.unlink(fifo)
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(fifo)


def test_a_lookup_hung_on_the_volume_neither_holds_the_exit_nor_its_worker(
    tmp_path: Path,
) -> None:
    """A redelivery is looked up in the ledger, and reading another replica's log hangs
    (a FIFO in its place: open() blocks, as on a hung NFS mount). The stuck worker is
    replaced after WORKER_TIMEOUT_SECONDS, and once the drain gives up the event loop
    closes and the runner returns at once: it does not wait for the hung thread."""
    stopped: list[str | None] = []

    async def scenario() -> None:
        log: list[str] = []
        async with deliveries.data_path(tmp_path, workers=1, timeout=0.3) as path:
            os.mkfifo(tmp_path / ".ledger" / "other.log")  # after start-up's own reading
            values = deliveries.entries("r", 2)
            again = deliveries.message(log, "r", values, message_id="r", redelivered=True)
            path.submit(deliveries.delivery(again, 2), values)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and not stopped:
                stopped.extend(r.stop_reason for r in path.history.records() if r.stop_reason)
                await asyncio.sleep(0.05)
            await path.pool.drained(0.5)

    runner = threading.Thread(target=uvloop.run, args=(scenario(),), daemon=True)
    started = time.monotonic()
    runner.start()
    try:
        runner.join(8)
        took = time.monotonic() - started
        assert not runner.is_alive(), "the event loop did not close: it waits for the hung lookup"
    finally:
        release_readers(tmp_path / ".ledger" / "other.log")
        runner.join(5)
    assert "timeout" in stopped, f"the worker stuck in the lookup was not replaced: {stopped}"
    assert took < 6
