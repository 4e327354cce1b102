"""The pool's policies, with a sink and messages handed in through their seams (the `Sink`
protocol, aio-pika's message interface): what is acked, when, and by which worker."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage

from services.common.metrics import new_registry
from services.common.schema import Entry
from services.consumer.acker import Acker
from services.consumer.batch import Batch, Delivery
from services.consumer.history import WorkerHistory
from services.consumer.metrics import ConsumerMetrics
from services.consumer.pool import BATCHES_PER_STEP, Pool
from services.consumer.sink import Abandoned
from tests.support.polling import eventually, holds


class FakeChannel:
    is_closed = False


class FakeMessage:
    """Records acks, and the moment they came relative to the sink's work."""

    def __init__(self, log: list[str], name: str, channel: FakeChannel) -> None:
        self.log = log
        self.name = name
        self.channel = channel

    async def ack(self, multiple: bool = False) -> None:
        self.log.append(f"ack {self.name}")


class ScriptedSink:
    """Each write: optionally wait `before` seconds, commit, wait `after` seconds (a slow
    rename and directory fsync), then return. A write whose batch was abandoned before the
    commit raises `Abandoned`, as the file sink does."""

    def __init__(self, log: list[str], before: list[float], after: float = 0.0) -> None:
        self.log = log
        self.before = before
        self.after = after

    def prepare(self) -> int:
        return 0

    async def write(self, batch: Batch, worker: str) -> Batch:
        delay = self.before.pop(0) if self.before else 0.0
        self.log.append(f"write start {worker}")
        await asyncio.to_thread(_sleep_then_commit, batch, delay, self.log, worker)
        await asyncio.sleep(self.after)
        self.log.append(f"write done {worker}")
        return batch

    async def reject(self, body: bytes, reason: str, message_id: str | None) -> str:
        raise NotImplementedError

    async def check(self) -> None:
        return None


def _sleep_then_commit(batch: Batch, delay: float, log: list[str], worker: str) -> None:
    import time

    time.sleep(delay)
    if not batch.commit():
        log.append(f"write abandoned {worker}")
        raise Abandoned(worker)
    log.append(f"commit {worker}")


def make_pool(sink: ScriptedSink, timeout: float) -> tuple[Pool, WorkerHistory]:
    history = WorkerHistory()
    metrics = ConsumerMetrics(new_registry(process=False))
    pool = Pool(
        0, sink, Acker(metrics), history, metrics, workers_min=1, workers_max=2, timeout=timeout
    )
    return pool, history


def batch_of(log: list[str], name: str, n: int = 2, channel: FakeChannel | None = None) -> Batch:
    message = FakeMessage(log, name, channel or FakeChannel())
    delivery = Delivery(
        cast(AbstractIncomingMessage, message), n, channel=cast(Any, message.channel)
    )
    entries = [Entry(timestamp="2019-10-12T07:20:50Z", value=f"{name}{i}") for i in range(n)]
    batch = Batch(0)
    batch.add(delivery, entries)
    return batch


async def test_no_ack_before_a_committed_write_has_finished() -> None:
    """The timeout fires while the file is being renamed and synced: the worker waits for
    the write instead of acking early or handing the batch to another worker."""
    log: list[str] = []
    pool, history = make_pool(ScriptedSink(log, [0.0], after=0.5), timeout=0.2)
    pool.start()
    pool.submit(batch_of(log, "m"))
    await eventually(holds(lambda: "ack m" in log), timeout=5.0, interval=0.01)
    await pool.stop()
    assert log == ["write start 0-0", "commit 0-0", "write done 0-0", "ack m"]
    assert [r.stop_reason for r in history.records()] == ["shutdown"]


async def test_a_timed_out_batch_is_written_once_by_the_slots_fresh_generation() -> None:
    log: list[str] = []
    pool, history = make_pool(ScriptedSink(log, [0.6, 0.0]), timeout=0.2)
    pool.start()
    pool.submit(batch_of(log, "m"))
    await eventually(holds(lambda: "ack m" in log), timeout=5.0, interval=0.01)
    await asyncio.sleep(0.6)  # the abandoned write finishes meanwhile, and must not commit
    await pool.stop()
    assert log.count("commit 0-0") == 1
    assert "write abandoned 0-0" in log
    assert log.index("ack m") > log.index("commit 0-0")
    records = [(r.id, r.generation, r.stop_reason, r.entries) for r in history.records()]
    assert records == [("0-0", 1, "timeout", 0), ("0-0", 2, "shutdown", 2)]


async def test_shrinking_retires_an_idle_worker_first() -> None:
    log: list[str] = []
    pool, history = make_pool(ScriptedSink(log, [0.3]), timeout=5)
    pool.start()
    assert pool.grow()
    pool.submit(batch_of(log, "m"))
    await eventually(
        holds(lambda: "write start 0-0" in log or "write start 0-1" in log),
        timeout=5.0,
        interval=0.01,
    )
    busy = "0-0" if "write start 0-0" in log else "0-1"
    assert pool.shrink()  # two live, one busy: the idle one goes, at once
    await eventually(holds(lambda: pool.live == 1), timeout=5.0, interval=0.01)
    await eventually(holds(lambda: "ack m" in log), timeout=5.0, interval=0.01)
    await pool.stop()
    by_id = {(r.id, r.generation): r for r in history.records()}
    assert by_id[(busy, 1)].entries == 2
    assert [r.stop_reason for r in history.records() if r.id != busy] == ["scale-down"]


async def test_retiring_the_busy_worker_lets_it_finish_first() -> None:
    log: list[str] = []
    pool, history = make_pool(ScriptedSink(log, [0.3]), timeout=5)
    pool.start()
    pool.workers_min = 0  # so the only, busy, worker may retire
    pool.submit(batch_of(log, "m"))
    await eventually(holds(lambda: "write start 0-0" in log), timeout=5.0, interval=0.01)
    assert pool.shrink()
    await eventually(holds(lambda: pool.live == 0), timeout=5.0, interval=0.01)
    assert log[-1] == "ack m"  # it finished the batch before it stopped
    [record] = history.records()
    assert (record.stop_reason, record.entries) == ("scale-down", 2)


async def test_entries_of_a_dead_channel_are_not_written() -> None:
    log: list[str] = []
    dead = FakeChannel()
    dead.is_closed = True
    pool, _ = make_pool(ScriptedSink(log, []), timeout=5)
    pool.start()
    pool.submit(batch_of(log, "gone", channel=dead))
    pool.submit(batch_of(log, "kept"))
    await eventually(holds(lambda: "ack kept" in log), timeout=5.0, interval=0.01)
    await pool.stop()
    assert "ack gone" not in log
    assert log.count("commit 0-0") == 1


class BuggySink(ScriptedSink):
    """The first write fails with a bug (not an OSError): the slot restarts."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(log, [])
        self.failed = False

    async def write(self, batch: Batch, worker: str) -> Batch:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug")
        return await super().write(batch, worker)


async def test_a_restarted_workers_first_batch_is_written_even_if_it_retires() -> None:
    """After a bug the slot restarts with the batch as its first job (after a pause); a
    scale-down meanwhile retires it: it must write that batch first, not strand it."""
    log: list[str] = []
    pool, history = make_pool(BuggySink(log), timeout=5)
    pool.start()
    pool.workers_min = 0  # so the only, restarting, worker may retire
    pool.submit(batch_of(log, "m"))
    await eventually(
        holds(lambda: [r.stop_reason for r in history.records()][:1] == ["error"]),
        timeout=5.0,
        interval=0.01,
    )
    assert pool.shrink()
    await eventually(holds(lambda: "ack m" in log), timeout=5.0, interval=0.01)
    await eventually(holds(lambda: pool.live == 0), timeout=5.0, interval=0.01)
    assert [r.stop_reason for r in history.records()] == ["error", "scale-down"]


async def test_drained_waits_for_a_batch_retried_after_a_bug() -> None:
    log: list[str] = []
    pool, _ = make_pool(BuggySink(log), timeout=5)
    pool.start()
    pool.submit(batch_of(log, "m"))
    assert await pool.drained(5)
    assert "ack m" in log, "drained() reported idle with the batch still unwritten"
    await pool.stop()


async def test_drained_waits_for_a_batch_retried_after_a_timeout() -> None:
    log: list[str] = []
    pool, _ = make_pool(ScriptedSink(log, [0.6, 0.0]), timeout=0.2)
    pool.start()
    pool.submit(batch_of(log, "m"))
    assert await pool.drained(5)
    assert "ack m" in log, "drained() reported idle with the batch still unwritten"
    await pool.stop()


async def test_workers_stopped_before_they_ever_ran_are_no_longer_counted_live() -> None:
    """A worker task cancelled before its first step never runs its body: the pool must
    still forget it (live count, gauge, history) — here a stop right after the start."""
    log: list[str] = []
    pool, history = make_pool(ScriptedSink(log, []), timeout=5)
    pool.workers_min = 2
    pool.start()
    await pool.stop()  # in the same step: no worker has run yet
    assert pool.live == 0
    assert pool.state()["live"] == 0
    assert pool._live_gauge._value.get() == 0
    assert [r.stop_reason for r in history.records()] == ["shutdown", "shutdown"]


async def test_a_worker_retired_before_it_ever_ran_frees_its_slot() -> None:
    log: list[str] = []
    pool, history = make_pool(ScriptedSink(log, []), timeout=5)
    pool.start()
    await asyncio.sleep(0)  # 0-0 runs and waits for a batch
    assert pool.grow()
    assert pool.shrink()  # the idle 0-1 retires before its first step
    await eventually(holds(lambda: pool.live == 1), timeout=2.0, interval=0.01)
    by_id = {r.id: r.stop_reason for r in history.records()}
    assert by_id == {"0-0": None, "0-1": "scale-down"}
    assert pool.grow()  # its slot is free again
    await pool.stop()
    assert pool.live == 0


async def test_a_fresh_generation_stopped_before_it_ran_puts_its_retry_back() -> None:
    """A slot's fresh generation holding the batch its predecessor timed out on (spawned
    as the timeout's replacement, here directly) is stopped before its first step: the
    batch is queued again, so the shutdown counts it as left unwritten."""
    log: list[str] = []
    pool, history = make_pool(ScriptedSink(log, []), timeout=5)
    pool._spawn(0, batch_of(log, "m"))
    await pool.stop()
    assert pool.live == 0
    assert pool.queue.pending == 1
    assert [r.stop_reason for r in history.records()] == ["shutdown"]


async def test_a_worker_writes_the_batches_waiting_together_up_to_its_step() -> None:
    """A backlog: the worker takes its batch and up to BATCHES_PER_STEP - 1 more that are
    already waiting, writes them at once (one group commit), then the rest; each acked once
    after its own write."""
    log: list[str] = []
    pool, _ = make_pool(ScriptedSink(log, [], after=0.05), timeout=5.0)
    names = [f"m{i}" for i in range(BATCHES_PER_STEP + 2)]
    for name in names:
        pool.submit(batch_of(log, name))
    pool.start()  # one worker (WORKERS_MIN=1)
    await eventually(holds(lambda: all(f"ack {n}" in log for n in names)), timeout=5.0)
    await pool.stop()
    first_done = log.index("write done 0-0")
    assert log[:first_done].count("write start 0-0") == BATCHES_PER_STEP
    assert sorted(line for line in log if line.startswith("ack")) == sorted(
        f"ack {n}" for n in names
    )


async def test_one_batch_of_a_step_timing_out_is_retried_alone_by_a_fresh_generation() -> None:
    """Three batches written at once; b's write is slower than the timeout: a and c are
    acked, b is abandoned (its late write makes nothing) and written once by the slot's
    fresh generation."""
    log: list[str] = []
    pool, history = make_pool(ScriptedSink(log, [0.0, 0.6, 0.0]), timeout=0.3)
    for name in "abc":
        pool.submit(batch_of(log, name))
    pool.start()
    await eventually(holds(lambda: all(f"ack {n}" in log for n in "abc")), timeout=5.0)
    # b's late write ends meanwhile, and must not commit
    await eventually(holds(lambda: "write abandoned 0-0" in log), timeout=5.0)
    await pool.stop()
    assert sorted(line for line in log if line.startswith("ack")) == ["ack a", "ack b", "ack c"]
    assert log.count("commit 0-0") == 3  # a, c, then b's retry; the late write none
    records = [(r.id, r.generation, r.stop_reason, r.entries) for r in history.records()]
    # a and c by the first generation, b once by the next
    assert records == [("0-0", 1, "timeout", 4), ("0-0", 2, "shutdown", 2)]


class FailingAckMessage(FakeMessage):
    async def ack(self, multiple: bool = False) -> None:
        self.log.append(f"ack failed {self.name}")
        raise RuntimeError("the ack failed")


async def test_a_written_batch_whose_ack_fails_is_not_written_again() -> None:
    """Delivery d spans batches x and y; x also completes e, whose ack fails. x is not
    retried (that would count d's entry in x twice and ack d before y is in a file): e
    stays unacked (the broker redelivers it), d is acked only once y is written."""
    log: list[str] = []
    pool, history = make_pool(ScriptedSink(log, []), timeout=5.0)
    channel = FakeChannel()
    e_message = FailingAckMessage(log, "e", channel)
    d_message = FakeMessage(log, "d", channel)
    e = Delivery(cast(AbstractIncomingMessage, e_message), 1, channel=cast(Any, channel))
    d = Delivery(cast(AbstractIncomingMessage, d_message), 2, channel=cast(Any, channel))
    entry = Entry(timestamp="2019-10-12T07:20:50Z", value="v")
    x, y = Batch(0), Batch(0)
    x.add(e, [entry])
    x.add(d, [entry], 0)
    y.add(d, [entry], 1)
    pool.start()
    pool.submit(x)
    await eventually(holds(lambda: "ack failed e" in log), timeout=5.0)
    await asyncio.sleep(0.2)  # a retry of x, if there were one, would be written by now
    assert log.count("write start 0-0") == 1
    assert "ack d" not in log
    pool.submit(y)
    await eventually(holds(lambda: "ack d" in log), timeout=5.0)
    await pool.stop()
    assert log.count("write start 0-0") == 2
    assert [r.stop_reason for r in history.records()] == ["shutdown"]  # never restarted
