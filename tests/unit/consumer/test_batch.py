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


def stamped(hours: list[int], tag: str = "e") -> list[Entry]:
    return [
        Entry(timestamp=f"2019-10-12T{hour:02d}:20:50Z", value=f"{tag}{i}")
        for i, hour in enumerate(hours)
    ]


def by_hour(entries: list[Entry]) -> list[str]:
    return [e["timestamp"][11:13] for e in entries]


async def test_one_open_batch_per_directory_each_sealed_when_full() -> None:
    sealed: list[Batch] = []
    batcher = Batcher(0, 3, 60, sealed.append, route=by_hour)
    hours = [7, 8, 7, 7, 8, 9, 7]
    first = delivery(len(hours))
    batcher.add(first, stamped(hours), by_hour(stamped(hours)))
    assert [(b.directory, len(b)) for b in sealed] == [("07", 3)]
    assert batcher.open_batches == 3  # 07 (one entry), 08, 09
    batcher.flush()
    assert sorted((b.directory, len(b)) for b in sealed) == [
        ("07", 1), ("07", 3), ("08", 2), ("09", 1),
    ]  # fmt: skip
    for b in sealed:
        assert {e["timestamp"][11:13] for e in b.entries} == {b.directory}
    # Each run of the delivery's entries bound for one directory is one source, with its
    # start in the delivery: the ledger's ranges stay exact.
    starts = sorted((s.start, s.settles) for b in sealed for s in b.sources)
    assert starts == [(0, 1), (1, 1), (2, 2), (4, 1), (5, 1), (6, 1)]
    assert sum(s.settles for b in sealed for s in b.sources) == len(hours)
    done = [s.delivery for b in sealed for s in b.sources if s.delivery.mark_written(s.settles)]
    assert done == [first]


async def test_each_directory_has_its_own_timer() -> None:
    sealed: list[Batch] = []
    batcher = Batcher(0, 100, 0.2, sealed.append, route=by_hour)
    batcher.add(delivery(1), stamped([7]), ["07"])
    await asyncio.sleep(0.12)
    batcher.add(delivery(1), stamped([8]), ["08"])
    for _ in range(40):
        if sealed:
            break
        await asyncio.sleep(0.01)
    assert [b.directory for b in sealed] == ["07"]  # 08's timer started later
    for _ in range(40):
        if len(sealed) == 2:
            break
        await asyncio.sleep(0.01)
    assert [b.directory for b in sealed] == ["07", "08"]


async def test_past_the_open_batch_bound_the_oldest_is_sealed() -> None:
    sealed: list[Batch] = []
    batcher = Batcher(0, 100, 60, sealed.append, route=by_hour, max_open=4)
    peak = 0
    for hour in [*range(24), *range(24)]:
        batcher.add(delivery(1), stamped([hour]), [f"{hour:02d}"])
        peak = max(peak, batcher.open_batches)
    assert peak == 4
    assert [b.directory for b in sealed[:3]] == ["00", "01", "02"]  # oldest first
    batcher.flush()
    assert sum(len(b) for b in sealed) == 48


async def test_the_byte_bound_seals_before_an_entry_would_pass_it() -> None:
    sealed: list[Batch] = []
    batcher = Batcher(
        0, 100, 60, sealed.append, max_bytes=100, size=lambda e: len(e.get("value") or "")
    )
    values = ["a" * 40, "b" * 40, "c" * 30, "d" * 250, "e" * 60, "f" * 40]
    batcher.add(
        delivery(len(values)), [Entry(timestamp="2019-10-12T07:20:50Z", value=v) for v in values]
    )
    batcher.flush()
    sizes = [[len(e.get("value") or "") for e in b.entries] for b in sealed]
    # 40+40 (30 more would pass 100), 30 (250 alone), 250 alone, 60+40 (at the bound).
    assert sizes == [[40, 40], [30], [250], [60, 40]]


async def test_the_default_batcher_is_the_flat_shared_batch() -> None:
    sealed: list[Batch] = []
    batcher = Batcher(0, 5, 60, sealed.append)
    assert batcher.directories(items(3)) is None
    batcher.add(delivery(7), items(7))
    assert [(b.directory, len(b)) for b in sealed] == [("", 5)]
    assert batcher.open_batches == 1


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
