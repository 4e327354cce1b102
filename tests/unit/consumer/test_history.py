from __future__ import annotations

import asyncio
import logging

import pytest

from services.consumer.history import WorkerHistory
from tests.support.deliveries import until


def test_each_restart_of_a_slot_is_a_new_generation() -> None:
    history = WorkerHistory()
    first = history.start(2, 1)
    first.entries, first.batches = 10, 2
    history.stop(first, "timeout")
    second = history.start(2, 1)
    rows = [r.as_dict() for r in history.records()]
    assert [(r["id"], r["generation"], r["stop_reason"]) for r in rows] == [
        ("2-1", 1, "timeout"),
        ("2-1", 2, None),
    ]
    assert rows[0]["stopped_at"] is not None
    assert rows[1]["stopped_at"] is None
    assert second.generation == 2
    table = history.table()
    assert "2-1" in table
    assert "10" in table


def test_stopped_generations_are_bounded_live_ones_kept() -> None:
    history = WorkerHistory(limit=10)
    live = history.start(0, 0)
    for _ in range(50):
        history.stop(history.start(0, 1), "scale-down")
    records = history.records()
    assert len(records) == 11
    assert live in records


async def test_the_table_is_logged_on_its_period(caplog: pytest.LogCaptureFixture) -> None:
    history = WorkerHistory()
    history.start(0, 0)
    caplog.set_level(logging.INFO, logger="services.consumer.history")
    task = asyncio.create_task(history.log_every(0.01))
    try:
        await until(lambda: "worker history:" in caplog.text, what="the table logged")
    finally:
        task.cancel()
    assert "0-0" in caplog.text
