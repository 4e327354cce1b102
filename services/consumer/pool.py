"""One shard's worker pool: slots 0..WORKERS_MAX-1, between WORKERS_MIN and WORKERS_MAX
live workers, all serving the shard's queue of sealed batches.

A worker takes a batch — and, under a backlog, up to BATCHES_PER_STEP - 1 more already
waiting (it never waits for them) — has the sink write each (bounded by
WORKER_TIMEOUT_SECONDS), and hands each to the acker. Outcomes, each a named policy, per
batch:
- written: ack its deliveries (never before the sink has returned: the file is renamed
  and its directory fsynced), count it;
- timeout: the worker generation ends ("timeout") once its step's other batches are done,
  and the slot starts a fresh generation whose first job is that batch (nothing of it was
  acked; a second one timed out in the same step goes back to the front of the queue).
  The late write cannot make a file: the batch is abandoned first. If the write had
  already committed (it is renaming), the worker waits for it to finish and acks as usual
  instead;
- write error (OSError: disk full, read-only, permissions): the batch goes back to the
  front of the queue, nothing acked, the pool reports itself unhealthy, the worker pauses
  (capped backoff) and goes on;
- a bug (any other exception): the generation ends ("error"), the batch goes back, the slot
  restarts after a pause.
A retiring worker (scale-down) finishes its batches first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Literal

from services.consumer.acker import Acker
from services.consumer.batch import Batch
from services.consumer.history import StopReason, WorkerHistory, WorkerRecord
from services.consumer.metrics import ConsumerMetrics
from services.consumer.sink import Sink

log = logging.getLogger(__name__)

ERROR_PAUSE_MAX_SECONDS = 5.0
# Batches a worker writes at once when that many are waiting: they join the same group
# commit, so a backlog fills groups beyond the number of workers (3-4 per shard). Measured
# on 2 cores (bench/consumer_drain.py, defaults, one run each): 17,400 entries/s with 1,
# 20,600 with 2, 22,700 with 3.
BATCHES_PER_STEP = 4
Outcome = Literal["written", "retry", "timeout"]


class BatchQueue:
    """Sealed batches waiting for a worker; a batch put back goes to the front.

    `pending` counts batches queued or handed to a worker that has not resumed yet, so a
    drain never mistakes a hand-over for idleness."""

    def __init__(self) -> None:
        self._items: deque[Batch] = deque()
        self._getters: deque[asyncio.Future[Batch]] = deque()
        self._handed = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def pending(self) -> int:
        return len(self._items) + self._handed

    @property
    def entries(self) -> int:
        """Entries in the queued batches."""
        return sum(len(batch) for batch in self._items)

    def put(self, batch: Batch, *, front: bool = False) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(batch)
                self._handed += 1
                return
        if front:
            self._items.appendleft(batch)
        else:
            self._items.append(batch)

    def take(self, count: int) -> list[Batch]:
        """Up to `count` queued batches, without waiting."""
        taken: list[Batch] = []
        while self._items and len(taken) < count:
            taken.append(self._items.popleft())
        return taken

    async def get(self) -> Batch:
        if self._items:
            return self._items.popleft()
        getter: asyncio.Future[Batch] = asyncio.get_running_loop().create_future()
        self._getters.append(getter)
        try:
            batch = await getter
        except asyncio.CancelledError:
            if getter.done() and not getter.cancelled():
                self._handed -= 1
                self.put(getter.result(), front=True)  # handed over as we were cancelled
            raise
        self._handed -= 1
        return batch


class _Worker:
    __slots__ = ("busy", "current", "first", "record", "retiring", "started", "task")

    def __init__(self, record: WorkerRecord, first: Batch | None) -> None:
        self.record = record
        self.first = first
        self.busy = first is not None
        self.current: list[Batch] = []  # being written
        self.retiring = False
        self.started = False  # its task has taken its first step
        self.task: asyncio.Task[None] | None = None


class Pool:
    def __init__(
        self,
        shard: int,
        sink: Sink,
        acker: Acker,
        history: WorkerHistory,
        metrics: ConsumerMetrics,
        *,
        workers_min: int,
        workers_max: int,
        timeout: float,
    ) -> None:
        self.shard = shard
        self.workers_min = workers_min
        self.workers_max = workers_max
        self.queue = BatchQueue()
        self._sink = sink
        self._acker = acker
        self._history = history
        self._metrics = metrics
        self._timeout = timeout
        self._workers: dict[int, _Worker] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self.write_ok = True
        self._errors_in_a_row = 0
        self._label = str(shard)
        metrics.create_shard_series(shard)
        self._live_gauge = metrics.workers.labels(self._label)
        self._waiting_gauge = metrics.waiting_batches.labels(self._label)

    @property
    def live(self) -> int:
        return len(self._workers)

    def state(self) -> dict[str, int]:
        """What the operator reads to judge saturation (`GET /pools`)."""
        writing = [b for w in self._workers.values() for b in w.current]
        return {
            "shard": self.shard,
            "live": self.live,
            "min": self.workers_min,
            "max": self.workers_max,
            "busy": sum(1 for w in self._workers.values() if w.current),
            "pending_batches": self.queue.pending,
            "inflight_entries": self.queue.entries + sum(len(b) for b in writing),
        }

    def start(self) -> None:
        for slot in range(self.workers_min):
            self._spawn(slot)

    def submit(self, batch: Batch) -> None:
        """A sealed batch from the batcher."""
        self._idle.clear()
        self.queue.put(batch)
        self._waiting_gauge.set(len(self.queue))

    def grow(self) -> bool:
        """Start a worker in a free slot, if the pool is below its maximum."""
        if self._stopping or self.live >= self.workers_max:
            return False
        slot = min(s for s in range(self.workers_max) if s not in self._workers)
        self._spawn(slot)
        self._metrics.scale_events.labels(self._label, "up").inc()
        log.info("shard %d pool grows to %d workers", self.shard, self.live)
        return True

    def shrink(self) -> bool:
        """Retire one worker (an idle one if any, else the busy one finishes its batch),
        if the pool would stay at or above its minimum."""
        staying = [w for w in self._workers.values() if not w.retiring]
        if self._stopping or len(staying) <= self.workers_min:
            return False
        worker = max(staying, key=lambda w: (not w.busy, w.record.slot))
        worker.retiring = True
        if not worker.busy and worker.task is not None:
            worker.task.cancel()
        self._metrics.scale_events.labels(self._label, "down").inc()
        log.info("shard %d pool shrinks to %d workers", self.shard, len(staying) - 1)
        return True

    async def drained(self, timeout: float) -> bool:
        """Wait until no batch is queued or being written; True if that happened in time."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop every worker: idle ones at once, busy ones are cancelled (their batches are
        abandoned and stay unacked, so the broker redelivers them)."""
        self._stopping = True
        tasks = [w.task for w in self._workers.values() if w.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, slot: int, first: Batch | None = None, pause: float = 0.0) -> None:
        worker = _Worker(self._history.start(self.shard, slot), first)
        self._workers[slot] = worker
        task = asyncio.create_task(self._run(worker, pause), name=f"worker-{worker.record.id}")
        # Registered before anyone can wait for the task (`stop`), so it has run by then.
        task.add_done_callback(lambda _: self._ended_unstarted(worker))
        worker.task = task
        self._live_gauge.set(self.live)

    def _ended_unstarted(self, worker: _Worker) -> None:
        """A task cancelled before its first step never runs `_run`, not even its
        `finally`: the pool forgets the worker here instead, and puts its batch back."""
        if worker.started:
            return
        if worker.first is not None:
            self.queue.put(worker.first, front=True)
        self._stopped(worker, "scale-down" if worker.retiring else "shutdown")
        self._check_idle()

    def _stopped(self, worker: _Worker, reason: StopReason) -> None:
        self._history.stop(worker.record, reason)
        if self._workers.get(worker.record.slot) is worker:
            del self._workers[worker.record.slot]
        self._live_gauge.set(self.live)

    async def _run(self, worker: _Worker, pause: float) -> None:
        worker.started = True
        reason: StopReason = "shutdown"
        retries: list[Batch] = []
        try:
            if pause:
                await asyncio.sleep(pause)  # after a bug: do not spin
            reason, retries = await self._serve(worker)
        except asyncio.CancelledError:
            reason = "scale-down" if worker.retiring else "shutdown"
            if worker.first is not None:  # cancelled before starting its first job
                self.queue.put(worker.first, front=True)
        finally:
            self._stopped(worker, reason)
        # Replaced in the same step, so the live count never dips below the minimum; a
        # retiring worker is not replaced (its batches go back to the queue). The fresh
        # generation starts with the first retry; any others go back to the queue's front.
        if reason in ("timeout", "error") and not self._stopping and not worker.retiring:
            first, retries = retries[0], retries[1:]
            self._spawn(worker.record.slot, first, pause=1.0 if reason == "error" else 0.0)
        for retry in reversed(retries):
            self.queue.put(retry, front=True)
        # Only now that a retry is handed on (the fresh generation counts as busy).
        self._check_idle()

    async def _serve(self, worker: _Worker) -> tuple[StopReason, list[Batch]]:
        # A fresh generation's first batch (a retry) is written even if the slot was told
        # to retire meanwhile: "a retiring worker finishes its batch first".
        while not worker.retiring or worker.first is not None:
            if worker.first is not None:
                batch, worker.first = worker.first, None
            else:
                batch = await self.queue.get()
            batches = [batch, *self.queue.take(BATCHES_PER_STEP - 1)]
            worker.busy = True
            worker.current = batches
            self._waiting_gauge.set(len(self.queue))
            try:
                results = await asyncio.gather(
                    *(self._write(worker, b) for b in batches), return_exceptions=True
                )
            finally:
                worker.current = []
            # A batch that failed on a bug or timed out is retried (still busy: `_run`
            # hands the retries on); one whose write failed is back in the queue already.
            # (A `_write` that raised: a bug, or a cancellation that was not the worker's
            # own — that one `gather` raises.)
            outcomes = list(zip(batches, results, strict=True))
            bugs = [r for _, r in outcomes if isinstance(r, BaseException)]
            retries = [
                b.retry() for b, r in outcomes if r == "timeout" or isinstance(r, BaseException)
            ]
            for bug in bugs:
                log.error(
                    "worker %s failed on a batch; restarting it", worker.record.id, exc_info=bug
                )
            if retries:
                return ("error" if bugs else "timeout"), retries
            worker.busy = False
            self._check_idle()
        return "scale-down", []

    async def _write(self, worker: _Worker, batch: Batch) -> Outcome:
        live = batch.without_stale()
        if not live.entries:
            return "written"  # every source's channel died: the broker redelivers them all
        record = worker.record
        started = time.perf_counter()
        # The sink's whole write is bounded, its ledger lookup included: a worker stuck on
        # a hung volume is replaced.
        write = asyncio.ensure_future(self._sink.write(live, record.id))
        try:
            done, _ = await asyncio.wait({write}, timeout=self._timeout)
        except asyncio.CancelledError:
            live.abandon()  # stopped mid-write: a late finish must not make a file
            write.cancel()
            raise
        if not done:
            if live.abandon():
                write.cancel()
                self._timed_out(record, live)
                return "timeout"
            # The write committed as the time ran out: it is renaming and syncing now.
            # Wait for it, then ack as usual; never ack before the sink returns.
            await asyncio.wait({write})
        try:
            written = write.result()
        except OSError as exc:
            await self._write_failed(worker, batch, exc)
            return "retry"
        self.write_ok = True
        self._errors_in_a_row = 0
        if written.entries:  # (none: all were in files already; settled, nothing written)
            self._metrics.batch_seconds.observe(time.perf_counter() - started)
            # Counted before the acks: a cancellation while they go out (shutdown,
            # retirement) must not lose the count, and it does not stop them (shielded).
            self._metrics.batch_entries.observe(len(written))
            self._metrics.batches.labels(self._label).inc()
            self._metrics.processed.labels(self._label, record.id).inc(len(written))
            record.entries += len(written)
            record.batches += 1
        try:
            await asyncio.shield(self._acker.batch_written(written))
        except Exception:
            # Written and durable: never written again (a retry would count its deliveries'
            # entries twice and could ack one before its other batches are in files). Its
            # deliveries stay unacked and come back; the ledger leaves out what is written.
            log.exception("worker %s: the acks of a written batch failed", record.id)
        return "written"

    def _timed_out(self, record: WorkerRecord, batch: Batch) -> None:
        self.write_ok = False  # a hung disk: not ready until a write succeeds again
        self._metrics.worker_timeouts.labels(self._label).inc()
        log.warning(
            "worker %s (generation %d) spent over %gs on a batch of %d entries (attempt %d): "
            "stopped, the batch goes to a fresh generation of the slot",
            record.id,
            record.generation,
            self._timeout,
            len(batch),
            batch.attempts + 1,
        )

    async def _write_failed(self, worker: _Worker, batch: Batch, exc: OSError) -> None:
        self.write_ok = False
        self._errors_in_a_row += 1
        self._metrics.write_errors.labels(self._label).inc()
        delay = min(0.1 * 2**self._errors_in_a_row, ERROR_PAUSE_MAX_SECONDS)
        log.warning(
            "worker %s could not write a batch (%s); nothing acked, retry %d in %.1fs",
            worker.record.id,
            exc,
            self._errors_in_a_row,
            delay,
        )
        self.queue.put(batch.retry(), front=True)
        await asyncio.sleep(delay)

    def _check_idle(self) -> None:
        busy = any(w.busy for w in self._workers.values())
        if not self.queue.pending and not busy:
            self._idle.set()
