"""One shard's worker pool: slots 0..WORKERS_MAX-1, between WORKERS_MIN and WORKERS_MAX
live workers, all serving the shard's queue of sealed batches.

A worker takes a batch, has the sink write it (bounded by WORKER_TIMEOUT_SECONDS), and
hands it to the acker. Outcomes, each a named policy:
- written: ack its deliveries, count it;
- timeout: the worker generation ends ("timeout"), the batch goes back to the front of the
  queue (nothing acked), the slot starts a fresh generation;
- write error (OSError: disk full, permissions): the batch goes back to the front, the pool
  reports itself unhealthy, the worker pauses (capped backoff) and tries again;
- a bug (any other exception): the generation ends ("error"), the batch goes back, the slot
  restarts after a pause.
A retiring worker (scale-down) finishes its batch first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from services.consumer.acker import Acker
from services.consumer.batch import Batch
from services.consumer.history import StopReason, WorkerHistory, WorkerRecord
from services.consumer.metrics import ConsumerMetrics
from services.consumer.sink import Sink

log = logging.getLogger(__name__)

ERROR_PAUSE_MAX_SECONDS = 5.0


class BatchQueue:
    """Sealed batches waiting for a worker; a batch put back goes to the front."""

    def __init__(self) -> None:
        self._items: deque[Batch] = deque()
        self._getters: deque[asyncio.Future[Batch]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, batch: Batch, *, front: bool = False) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(batch)
                return
        if front:
            self._items.appendleft(batch)
        else:
            self._items.append(batch)

    async def get(self) -> Batch:
        if self._items:
            return self._items.popleft()
        getter: asyncio.Future[Batch] = asyncio.get_running_loop().create_future()
        self._getters.append(getter)
        try:
            return await getter
        except asyncio.CancelledError:
            if getter.done() and not getter.cancelled():
                self.put(getter.result(), front=True)  # handed over as we were cancelled
            raise


class _Worker:
    __slots__ = ("busy", "record", "retiring", "task")

    def __init__(self, record: WorkerRecord) -> None:
        self.record = record
        self.busy = False
        self.retiring = False
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
        self._live_gauge = metrics.workers.labels(self._label)
        self._pending_gauge = metrics.buffered.labels(self._label)

    @property
    def live(self) -> int:
        return len(self._workers)

    def start(self) -> None:
        for slot in range(self.workers_min):
            self._spawn(slot)

    def submit(self, batch: Batch) -> None:
        """A sealed batch from the batcher."""
        self._idle.clear()
        self.queue.put(batch)
        self._pending_gauge.set(len(self.queue))

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
        """Stop every worker: idle ones at once, busy ones are cancelled (their batches stay
        unacked, so the broker redelivers them)."""
        self._stopping = True
        tasks = [w.task for w in self._workers.values() if w.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, slot: int, pause: float = 0.0) -> None:
        worker = _Worker(self._history.start(self.shard, slot))
        self._workers[slot] = worker
        task = asyncio.create_task(self._run(worker, pause), name=f"worker-{worker.record.id}")
        worker.task = task
        self._live_gauge.set(self.live)

    async def _run(self, worker: _Worker, pause: float) -> None:
        reason: StopReason = "shutdown"
        try:
            if pause:
                await asyncio.sleep(pause)  # after a bug: do not spin
            reason = await self._serve(worker)
        except asyncio.CancelledError:
            reason = "scale-down" if worker.retiring else "shutdown"
        finally:
            self._history.stop(worker.record, reason)
            if self._workers.get(worker.record.slot) is worker:
                del self._workers[worker.record.slot]
            self._live_gauge.set(self.live)
        # Replaced in the same step, so the live count never dips below the minimum.
        if reason in ("timeout", "error") and not self._stopping:
            self._spawn(worker.record.slot, pause=1.0 if reason == "error" else 0.0)

    async def _serve(self, worker: _Worker) -> StopReason:
        while not worker.retiring:
            batch = await self.queue.get()
            worker.busy = True
            self._pending_gauge.set(len(self.queue))
            try:
                outcome = await self._write(worker, batch)
            except Exception:
                log.exception("worker %s failed on a batch; restarting it", worker.record.id)
                self.queue.put(batch.retry(), front=True)
                return "error"
            finally:
                worker.busy = False
                self._check_idle()
            if outcome == "timeout":
                return "timeout"
        return "scale-down"

    async def _write(self, worker: _Worker, batch: Batch) -> str:
        record = worker.record
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                await self._sink.write(batch, record.id)
        except asyncio.CancelledError:
            batch.abandon()  # stopped mid-write: a late finish must not make a file
            raise
        except TimeoutError:
            if batch.abandon():
                self._metrics.worker_timeouts.labels(self._label).inc()
                log.warning(
                    "worker %s (generation %d) spent over %gs on a batch of %d entries: "
                    "stopped, batch handed to a fresh worker",
                    record.id,
                    record.generation,
                    self._timeout,
                    len(batch),
                )
                self.queue.put(batch.retry(), front=True)
                return "timeout"
            # The write committed just as the time ran out: it is durable, go on.
        except OSError as exc:
            await self._write_failed(worker, batch, exc)
            return "retry"
        self.write_ok = True
        self._errors_in_a_row = 0
        # Settling is not interrupted by a cancellation (shutdown, retirement).
        await asyncio.shield(self._acker.batch_written(batch))
        self._metrics.batch_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_entries.observe(len(batch))
        self._metrics.batches.labels(self._label).inc()
        self._metrics.processed.labels(self._label, record.id).inc(len(batch))
        record.entries += len(batch)
        record.batches += 1
        return "written"

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
        if not len(self.queue) and not any(w.busy for w in self._workers.values()):
            self._idle.set()
