from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage

from services.common.schema import Entry
from services.common.wire import Part
from services.consumer.batch import Batch, Batcher, Delivery


def delivery(n: int) -> Delivery:
    return Delivery(cast(AbstractIncomingMessage, object()), n)


def items(n: int, tag: str = "e") -> list[Entry]:
    return [Entry(timestamp="2019-10-12T07:20:50Z", value=f"{tag}{i}") for i in range(n)]


async def test_seals_when_full_and_never_over_size() -> None:
    sealed: list[Batch] = []
    batcher = Batcher(0, 5, 60, sealed.append)
    for _ in range(4):
        batcher.add(delivery(3), items(3))
    assert [len(b) for b in sealed] == [5, 5]
    assert batcher.buffered == 2
    batcher.flush()
    assert [len(b) for b in sealed] == [5, 5, 2]


async def test_a_delivery_spanning_batches_completes_only_when_all_are_written() -> None:
    sealed: list[Batch] = []
    batcher = Batcher(0, 3, 60, sealed.append)
    first, spanning = delivery(2), delivery(5)
    batcher.add(first, items(2, "a"))
    batcher.add(spanning, items(5, "b"))
    batcher.flush()
    assert [[(id(d), n) for d, n, _ in b.sources] for b in sealed] == [
        [(id(first), 2), (id(spanning), 1)],
        [(id(spanning), 3)],
        [(id(spanning), 1)],
    ]
    done = [d for b in sealed for d, n, _ in b.sources if d.mark_written(n)]
    assert done == [first, spanning]  # each completes once, the spanning one last


async def test_partial_batch_is_sealed_on_a_timer() -> None:
    sealed: list[tuple[float, Batch]] = []
    started = time.monotonic()
    batcher = Batcher(0, 100, 0.2, lambda b: sealed.append((time.monotonic() - started, b)))
    batcher.add(delivery(2), items(2))
    await asyncio.sleep(0.1)
    assert not sealed
    for _ in range(40):
        if sealed:
            break
        await asyncio.sleep(0.02)
    [(after, batch)] = sealed
    assert len(batch) == 2
    assert 0.18 <= after < 0.6


async def test_timer_counts_from_the_first_entry_of_each_batch() -> None:
    sealed: list[Batch] = []
    batcher = Batcher(0, 2, 0.2, sealed.append)
    batcher.add(delivery(2), items(2))  # full: sealed at once, timer cancelled
    batcher.add(delivery(1), items(1))
    await asyncio.sleep(0.3)
    assert [len(b) for b in sealed] == [2, 1]


def test_commit_and_abandon_exclude_each_other() -> None:
    batch = Batch(0, cast(Any, items(1)))
    assert batch.abandon()
    assert not batch.commit()  # the slow write, finishing late, must not publish a file
    retry = batch.retry()
    assert retry.commit()
    assert not retry.abandon()  # committed: the timeout came too late, it is written
    assert retry.entries == batch.entries
    assert retry.attempts == 1


def test_a_batch_of_a_message_with_many_parts_yields_only_its_own() -> None:
    """A message the API grouped holds a part per request: each batch of it finds its few
    parts by bisection, in order, with their ranges in the part's numbering."""
    parts = tuple(Part(f"m/{i}", 2 * i, 2 * i + 2) for i in range(1000))
    delivery = Delivery(cast(AbstractIncomingMessage, object()), 2000, parts=parts)
    batch = Batch(0)
    batch.add(delivery, [Entry(timestamp="2019-10-12T07:20:50Z")] * 5, 997)
    assert [(p.id, a, b, offset) for _, p, a, b, offset in batch.ranges()] == [
        ("m/498", 1, 2, 0),
        ("m/499", 0, 2, 1),
        ("m/500", 0, 2, 3),
    ]
