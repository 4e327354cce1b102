"""The ledger on a real directory: what it remembers, across restarts and processes, and
what it forgets."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage

from services.common.schema import Entry
from services.common.wire import Part
from services.consumer.batch import Batch, Delivery
from services.consumer.ledger import Ledger
from services.consumer.ledger_log import LedgerLog, Retention, _missing
from tests.support import deliveries
from tests.support.consumer import written_lines
from tests.support.faults import files_limited_to
from tests.support.ledger import written


class FakeChannel:
    is_closed = False

    def __init__(self) -> None:
        self.barriers = 0

    async def barrier(self, channel: Any) -> None:
        self.barriers += 1


def delivery(parts: list[Part], *, check: bool, channel: Any = None) -> Delivery:
    total = max(p.end for p in parts)
    message = cast(AbstractIncomingMessage, object())
    return Delivery(message, total, parts=tuple(parts), needs_lookup=check, channel=channel)


def batch_of(d: Delivery, start: int, count: int, tag: str = "v") -> Batch:
    batch = Batch(0)
    entries = [
        Entry(timestamp="2019-10-12T07:20:50Z", value=f"{tag}{start + i}") for i in range(count)
    ]
    batch.add(d, entries, start)
    return batch


async def write(ledger: Ledger, batch: Batch, name: str) -> Batch:
    """What the pool and the file sink do, without the file's content."""
    admitted = await ledger.admit(batch)
    try:
        if admitted.entries:
            ledger.log.record([(name, admitted.spans)])
            (ledger.log.directory / name).write_text("x")
            ledger.log.settled([(name, admitted.spans)], [], [])
    finally:
        ledger.release(admitted)
    return admitted


def opened(tmp_path: Path, host: str = "a", *args: Any, **kwargs: Any) -> Ledger:
    """`args`, `kwargs`: the log's (`Retention`, `clock`)."""
    ledger = Ledger(LedgerLog(tmp_path, host, *args, **kwargs))
    ledger.open()
    return ledger


@pytest.mark.parametrize(
    ("first", "end", "done", "gaps"),
    [
        (0, 10, [], [(0, 10)]),
        (0, 10, [(0, 10)], []),
        (0, 10, [(2, 4), (6, 8)], [(0, 2), (4, 6), (8, 10)]),
        (5, 10, [(0, 7)], [(7, 10)]),
        (0, 5, [(5, 9)], [(0, 5)]),
        (0, 10, [(3, 6), (0, 4)], [(6, 10)]),
    ],
)
def test_missing_ranges(
    first: int, end: int, done: list[tuple[int, int]], gaps: list[tuple[int, int]]
) -> None:
    assert _missing(first, end, done) == gaps


async def test_a_checked_redelivery_writes_only_what_is_missing(tmp_path: Path) -> None:
    ledger = opened(tmp_path)
    first = delivery([Part("m/0", 0, 10)], check=False)
    await write(ledger, batch_of(first, 0, 5), "f1.jsonl")  # 0..4 written, then a crash
    again = delivery([Part("m/0", 0, 10)], check=True)
    left = await write(ledger, batch_of(again, 0, 10), "f2.jsonl")
    assert [e["value"] for e in left.entries] == [f"v{i}" for i in range(5, 10)]
    assert left.spans == [("m/0", 5, 10)]
    assert left.sources[0].settles == 10  # every entry of the delivery is settled by it
    assert ledger.skipped == 5


async def test_two_copies_in_one_batch_are_written_once(tmp_path: Path) -> None:
    """A client's retry queued right behind the original lands in the same batch."""
    ledger = opened(tmp_path)
    original = delivery([Part("kx", 0, 3, keyed=True)], check=True)
    retry = delivery([Part("kx", 0, 3, keyed=True)], check=True)
    batch = batch_of(original, 0, 3)
    batch.add(retry, batch_of(retry, 0, 3).entries, 0)
    left = await write(ledger, batch, "f1.jsonl")
    assert [e["value"] for e in left.entries] == ["v0", "v1", "v2"]
    assert left.spans == [("kx", 0, 3)]
    assert [count for _, count, _ in left.sources] == [3, 3]  # both settled


async def test_only_deliveries_that_may_be_written_are_looked_up(tmp_path: Path) -> None:
    """A first delivery whose message_id someone reused (a hand-published message) shares a
    batch with a redelivery: its entries are written, not taken for the old ones."""
    ledger = opened(tmp_path)
    await write(ledger, batch_of(delivery([Part("reused/0", 0, 2)], check=False), 0, 2), "f1")
    redelivered = delivery([Part("m/0", 0, 1)], check=True)
    newcomer = delivery([Part("reused/0", 0, 2)], check=False)
    batch = batch_of(redelivered, 0, 1)
    batch.add(newcomer, batch_of(newcomer, 0, 2, tag="new").entries, 0)
    left = await write(ledger, batch, "f2")
    assert [e["value"] for e in left.entries] == ["v0", "new0", "new1"]


async def test_a_retried_batch_is_looked_up() -> None:
    """An attempt may have put the file in place before failing (its directory sync)."""
    d = delivery([Part("m/0", 0, 1)], check=False)
    assert batch_of(d, 0, 1).retry().sources[0][0].needs_lookup


async def test_the_event_loop_does_not_wait_for_the_writers_lock(tmp_path: Path) -> None:
    """A writer thread holds the lock across disk I/O (a slow disk): a lookup waits on its
    executor thread, the loop goes on."""
    ledger = opened(tmp_path)
    with ledger.log._lock:
        admitting = asyncio.ensure_future(
            ledger.admit(batch_of(delivery([Part("m/0", 0, 1)], check=True), 0, 1))
        )
        ticks = 0
        for _ in range(10):
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 10
        assert not admitting.done()
    assert len((await asyncio.wait_for(admitting, 2)).entries) == 1


async def test_an_unchecked_delivery_is_not_looked_up(tmp_path: Path) -> None:
    """A first delivery cannot have been written: no lookup, no cost."""
    ledger = opened(tmp_path)
    await write(ledger, batch_of(delivery([Part("m/0", 0, 3)], check=False), 0, 3), "f1.jsonl")
    same = await write(
        ledger, batch_of(delivery([Part("m/0", 0, 3)], check=False), 0, 3), "f2.jsonl"
    )
    assert len(same.entries) == 3


async def test_a_restarted_process_and_another_replica_read_the_log(tmp_path: Path) -> None:
    ledger = opened(tmp_path, "a")
    await write(ledger, batch_of(delivery([Part("m/0", 0, 4)], check=False), 0, 4), "f1.jsonl")
    for host in ("a", "b"):  # the same host after a restart; a replica on the same volume
        other = opened(tmp_path, host)
        left = await write(
            other, batch_of(delivery([Part("m/0", 0, 4)], check=True), 0, 4), f"{host}.jsonl"
        )
        assert left.entries == []
    # A replica that was running already sees what was appended since (read incrementally).
    late = opened(tmp_path, "c")
    await write(ledger, batch_of(delivery([Part("n/0", 0, 2)], check=False), 0, 2), "f3.jsonl")
    left = await write(late, batch_of(delivery([Part("n/0", 0, 2)], check=True), 0, 2), "c.jsonl")
    assert left.entries == []


async def test_a_record_whose_file_never_appeared_does_not_count(tmp_path: Path) -> None:
    """The process died between recording and renaming: the entries were not written."""
    ledger = opened(tmp_path, "a")
    ledger.log.record([("never.jsonl", [("m/0", 0, 4)])])  # no file, no confirmation
    fresh = opened(tmp_path, "a")
    left = await write(fresh, batch_of(delivery([Part("m/0", 0, 4)], check=True), 0, 4), "f.jsonl")
    assert len(left.entries) == 4
    # Renamed but not confirmed (died just after the rename): the file is there, it counts.
    ledger.log.record([("renamed.jsonl", [("p/0", 0, 2)])])
    (tmp_path / "renamed.jsonl").write_text("x")
    fresh = opened(tmp_path, "b")
    left = await write(fresh, batch_of(delivery([Part("p/0", 0, 2)], check=True), 0, 2), "g")
    assert left.entries == []


async def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    ledger = opened(tmp_path, "a")
    await write(ledger, batch_of(delivery([Part("m/0", 0, 2)], check=False), 0, 2), "f1.jsonl")
    with (tmp_path / ".ledger" / "a.log").open("ab") as log:
        log.write(b'{"t": 1, "f": "half')
    fresh = opened(tmp_path, "a")
    assert written(fresh.log, "m/0") == [(0, 2)]


async def test_a_second_copy_waits_for_the_first_write_instead_of_racing_it(
    tmp_path: Path,
) -> None:
    ledger = opened(tmp_path)
    first = await ledger.admit(batch_of(delivery([Part("m/0", 0, 3)], check=False), 0, 3))
    second = asyncio.ensure_future(
        ledger.admit(batch_of(delivery([Part("m/0", 0, 3)], check=True), 0, 3))
    )
    await asyncio.sleep(0.05)
    assert not second.done()  # the first copy is being written
    ledger.log.record([("f1.jsonl", first.spans)])
    (tmp_path / "f1.jsonl").write_text("x")
    ledger.log.settled([("f1.jsonl", first.spans)], [], [])
    ledger.release(first)
    assert (await asyncio.wait_for(second, 1)).entries == []


async def test_a_failed_first_write_lets_the_second_copy_write(tmp_path: Path) -> None:
    ledger = opened(tmp_path)
    first = await ledger.admit(batch_of(delivery([Part("m/0", 0, 3)], check=False), 0, 3))
    second = asyncio.ensure_future(
        ledger.admit(batch_of(delivery([Part("m/0", 0, 3)], check=True), 0, 3))
    )
    await asyncio.sleep(0.05)
    ledger.release(first)  # the write failed: nothing recorded
    assert len((await asyncio.wait_for(second, 1)).entries) == 3


async def test_settled_parts_are_forgotten_here_and_by_readers_keyed_ones_kept(
    tmp_path: Path,
) -> None:
    channel = FakeChannel()
    ledger = opened(tmp_path, "a")
    reader = opened(tmp_path, "b")
    plain = delivery([Part("m/0", 0, 2), Part("kx", 2, 4, keyed=True)], check=True, channel=channel)
    await write(ledger, batch_of(plain, 0, 4), "f1.jsonl")
    assert written(reader.log, "m/0") == [(0, 2)]
    ledger.acked(plain)
    assert await ledger.settle(channel.barrier) == 1
    assert channel.barriers == 1
    assert written(ledger.log, "m/0") == []
    assert written(ledger.log, "kx") == [(0, 2)]  # a client may still retry it
    assert ledger.log._own["f1.jsonl"][1] == [("kx", 0, 2)]
    ledger.log.settle(["kx"])  # forgotten (as by the retention, or a settle)
    assert ledger.log._own == {}  # memory follows what is remembered
    assert written(reader.log, "m/0") == []


async def test_a_channel_failing_the_barrier_settles_nothing(tmp_path: Path) -> None:
    channel = FakeChannel()

    async def broken(_: Any) -> None:
        raise ConnectionError("gone")

    ledger = opened(tmp_path)
    d = delivery([Part("m/0", 0, 2)], check=False, channel=channel)
    await write(ledger, batch_of(d, 0, 2), "f1.jsonl")
    ledger.acked(d)
    assert await ledger.settle(broken) == 0
    assert written(ledger.log, "m/0") == [(0, 2)]  # the ack may not have arrived: kept


async def test_retention_and_room_limits_forget_the_oldest(tmp_path: Path) -> None:
    now = [1000.0]
    forgotten: list[int] = []
    ledger = opened(
        tmp_path,
        retention=Retention(60, max_parts=1000, on_forget=forgotten.append),
        clock=lambda: now[0],
    )
    for i in range(3):
        d = delivery([Part(f"k{i}", 0, 1, keyed=True)], check=True)
        await write(ledger, batch_of(d, 0, 1), f"f{i}.jsonl")
        now[0] += 40
    # At the last write (t=1080), k0 (t=1000) was past the 60 s retention, k1 (t=1040) not.
    assert [written(ledger.log, f"k{i}") for i in range(3)] == [[], [(0, 1)], [(0, 1)]]
    assert forgotten == []  # its time was up: not "forgotten for room"
    # A restart at t=1120 reads the log with the same horizon: k1 is past it now.
    fresh = opened(tmp_path, retention=Retention(60), clock=lambda: now[0])
    assert [written(fresh.log, f"k{i}") for i in range(3)] == [[], [], [(0, 1)]]


async def test_past_max_parts_the_oldest_are_forgotten_and_counted(tmp_path: Path) -> None:
    forgotten: list[int] = []
    ledger = opened(tmp_path, retention=Retention(max_parts=1000, on_forget=forgotten.append))
    for i in range(1003):
        d = delivery([Part(f"k{i}", 0, 1, keyed=True)], check=False)
        await write(ledger, batch_of(d, 0, 1), f"f{i}.jsonl")
    assert ledger.parts == 1000
    assert sum(forgotten) == 3
    assert written(ledger.log, "k2") == []
    assert written(ledger.log, "k3") == [(0, 1)]


async def test_a_gone_replicas_log_is_removed_after_the_retention(tmp_path: Path) -> None:
    old = opened(tmp_path, "gone")
    await write(old, batch_of(delivery([Part("m/0", 0, 1)], check=False), 0, 1), "f.jsonl")
    log = tmp_path / ".ledger" / "gone.log"
    os.utime(log, (time.time() - 7200, time.time() - 7200))
    opened(tmp_path, "a", Retention(3600))
    assert not log.exists()
    assert (tmp_path / ".ledger" / "a.log").exists()


async def test_the_ledger_opens_itself_if_the_volume_was_unusable_at_start(
    tmp_path: Path,
) -> None:
    ledger = Ledger(LedgerLog(tmp_path / "late", "a"))  # open() failed or never ran
    (tmp_path / "late").mkdir()
    d = delivery([Part("m/0", 0, 1)], check=False)
    await write(ledger, batch_of(d, 0, 1), "f.jsonl")
    assert written(opened(tmp_path / "late", "b").log, "m/0") == [(0, 1)]


async def test_compaction_waits_for_the_log_to_double_and_readers_keep_one_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.consumer.ledger_log.COMPACT_BYTES", 2048)
    writer = opened(tmp_path, "a")
    reader = opened(tmp_path, "b")
    log = tmp_path / ".ledger" / "a.log"
    generations = set()
    for i in range(200):  # keyed: all stay live, so the live log outgrows the threshold
        d = delivery([Part(f"k{i}", 0, 1, keyed=True)], check=False)
        await write(writer, batch_of(d, 0, 1), f"f{i}.jsonl")
        generations.add(log.read_bytes().split(b"\n", 1)[0])
        written(reader.log, f"k{i}")  # a lookup: the reader reads what the writer appended
    assert 2 <= len(generations) <= 12  # compacted a few times, not on every write
    assert all(written(reader.log, f"k{i}") == [(0, 1)] for i in range(200))
    assert max(len(r) for r in reader.log._written.values()) == 1  # no copy per re-read


async def test_the_log_is_compacted_to_what_is_live(tmp_path: Path) -> None:
    channel = FakeChannel()
    ledger = opened(tmp_path)
    for i in range(50):
        d = delivery([Part(f"m{i}/0", 0, 1)], check=False, channel=channel)
        await write(ledger, batch_of(d, 0, 1), f"f{i}.jsonl")
        ledger.acked(d)
    await ledger.settle(channel.barrier)
    keep = delivery([Part("kept/0", 0, 1)], check=False, channel=channel)
    await write(ledger, batch_of(keep, 0, 1), "last.jsonl")
    log = tmp_path / ".ledger" / "a.log"
    before = log.stat().st_size
    fresh = opened(tmp_path)  # a restart compacts
    after = log.stat().st_size
    assert after < before / 10
    assert written(fresh.log, "kept/0") == [(0, 1)]
    assert written(fresh.log, "m3/0") == []


async def test_a_reused_message_id_does_not_hide_a_redelivered_messages_entries(
    tmp_path: Path,
) -> None:
    """Two hand-published messages (no parts header) share the message_id X. M1 is
    written but its ack is lost with its channel; M2, stale on that channel, comes back
    redelivered: its entries are not M1's and must be written."""
    log: list[str] = []
    first, second = deliveries.entries("a", 2), deliveries.entries("b", 2)
    async with deliveries.data_path(tmp_path) as path:
        m1 = deliveries.message(log, "m1", first, message_id="X", lose_ack=True)
        path.submit(deliveries.delivery(m1, 2), first)
        await deliveries.until(lambda: m1.channel.is_closed, what="M1 written, its ack lost")
        m2 = deliveries.message(log, "m2", second, message_id="X", redelivered=True)
        path.submit(deliveries.delivery(m2, 2), second)
        await deliveries.until(lambda: "ack m2" in log, what="M2 acked")
    assert sorted(e["value"] for e in written_lines(tmp_path)) == ["a0", "a1", "b0", "b1"]


async def test_a_delivery_gone_stale_while_its_batch_waits_is_not_written_again(
    tmp_path: Path,
) -> None:
    """A batch holds a client's keyed retry (waiting for the original's write) and a first
    delivery D. D's channel dies during the wait; D's redelivery is written by another
    worker; when the batch resumes, D must not be written a second time."""
    ledger = opened(tmp_path)
    original = await ledger.admit(
        batch_of(delivery([Part("kx", 0, 1, keyed=True)], check=True), 0, 1)
    )
    channel = deliveries.ScriptedChannel()
    retry = delivery([Part("kx", 0, 1, keyed=True)], check=True)
    d = delivery([Part("d/0", 0, 2)], check=False, channel=channel)
    both = batch_of(retry, 0, 1)
    both.add(d, batch_of(d, 0, 2, tag="d").entries, 0)
    waiting = asyncio.ensure_future(ledger.admit(both))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the original copy of kx is being written
    channel.is_closed = True  # D's channel dies
    again = delivery([Part("d/0", 0, 2)], check=True)  # its redelivery, on a new channel
    assert len((await write(ledger, batch_of(again, 0, 2, tag="d"), "d.jsonl")).entries) == 2
    ledger.log.record([("k.jsonl", original.spans)])
    (tmp_path / "k.jsonl").write_text("x")
    ledger.log.settled([("k.jsonl", original.spans)], [], [])
    ledger.release(original)
    admitted = await asyncio.wait_for(waiting, 2)
    try:
        assert [e["value"] for e in admitted.entries] == [], "D written a second time"
    finally:
        ledger.release(admitted)


async def test_a_log_append_cut_short_by_a_full_volume_does_not_swallow_the_next(
    tmp_path: Path,
) -> None:
    """The volume fills in the middle of a record line; once there is room again, the next
    record must survive a restart (and be read by other replicas)."""
    ledger = opened(tmp_path)
    await write(ledger, batch_of(delivery([Part("m1/0", 0, 2)], check=False), 0, 2), "f1.jsonl")
    log = tmp_path / ".ledger" / "a.log"
    with files_limited_to(log.stat().st_size + 10), pytest.raises(OSError, match="too large"):
        await write(ledger, batch_of(delivery([Part("m2/0", 0, 2)], check=False), 0, 2), "f2")
    await write(ledger, batch_of(delivery([Part("m3/0", 0, 2)], check=False), 0, 2), "f3.jsonl")
    assert written(opened(tmp_path, "b").log, "m3/0") == [(0, 2)]  # another replica
    assert written(opened(tmp_path, "a").log, "m3/0") == [(0, 2)]  # a restart


async def test_a_line_of_another_shape_is_skipped_not_fatal(tmp_path: Path) -> None:
    """Version skew: valid JSON a reader does not know must not stop it from starting."""
    ledger = opened(tmp_path, "a")
    await write(ledger, batch_of(delivery([Part("m/0", 0, 2)], check=False), 0, 2), "f1.jsonl")
    with (tmp_path / ".ledger" / "b.log").open("wb") as log:
        log.write(b'{"f": "x", "t": "soon", "p": 7}\n{"s": 5}\n[1, 2]\n{"d": 1}\n')
    assert written(opened(tmp_path, "c").log, "m/0") == [(0, 2)]


async def test_a_live_but_idle_replicas_log_is_not_taken_for_a_gone_one(tmp_path: Path) -> None:
    """A replica idle for longer than the retention still settles every 2 s: that keeps
    its log fresh, so another replica does not remove it (a record it appended as the
    other removed it would be lost)."""
    idle = opened(tmp_path, "idle", Retention(3600))
    await write(idle, batch_of(delivery([Part("k", 0, 1, keyed=True)], check=False), 0, 1), "f")
    log = tmp_path / ".ledger" / "idle.log"
    os.utime(log, (time.time() - 7200, time.time() - 7200))
    assert await idle.settle(FakeChannel().barrier) == 0  # nothing acked: it still touches
    opened(tmp_path, "other", Retention(3600))
    assert log.exists()


async def test_the_last_settle_is_bounded_and_a_stalled_barrier_keeps_the_parts(
    tmp_path: Path,
) -> None:
    """At shutdown a stalled broker must not hold the process: the last settle gives up
    after its timeout, and what it could not confirm stays recorded."""
    channel = FakeChannel()

    async def stalled(_: Any) -> None:
        await asyncio.Event().wait()

    ledger = opened(tmp_path)
    d = delivery([Part("m/0", 0, 2)], check=False, channel=channel)
    await write(ledger, batch_of(d, 0, 2), "f1.jsonl")
    ledger.acked(d)
    await asyncio.wait_for(ledger.settle_last(stalled, 0.1), 2)
    assert written(ledger.log, "m/0") == [(0, 2)]
    ledger.acked(d)
    await ledger.settle_last(channel.barrier, 1)
    assert written(ledger.log, "m/0") == []


async def test_settle_every_settles_on_its_period(tmp_path: Path) -> None:
    channel = FakeChannel()
    ledger = opened(tmp_path)
    d = delivery([Part("m/0", 0, 2)], check=False, channel=channel)
    await write(ledger, batch_of(d, 0, 2), "f1.jsonl")
    ledger.acked(d)
    assert ledger.parts == 1
    task = asyncio.create_task(ledger.settle_every(channel.barrier, 0.01))
    try:
        await deliveries.until(lambda: ledger.parts == 0, what="the acked part settled")
    finally:
        task.cancel()
    assert channel.barriers >= 1
