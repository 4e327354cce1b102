"""The consumer service wires the consumer: the output (`output.py`: the sink, the ledger,
the batchers), per shard a batcher and a worker pool, the intake (`intake.py`: channels,
the message callback), poison messages (`poison.py`), readiness (`readiness.py`), the
autoscaler and its depth probe, the broker connection.

Lifecycle, through one `AsyncExitStack` (what started is stopped in reverse order, also
when the start-up fails half-way): entering starts the connection, the pools and the
background loops; leaving drains — stop consuming, seal partial batches, wait (bounded by
SHUTDOWN_TIMEOUT_SECONDS) for every batch to be written and acked — then stops the
workers, closes the channels and the connection (at most CLOSE_TIMEOUT_SECONDS more) and
logs one summary line. What is not written by then stays unacked; the broker redelivers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from prometheus_client import CollectorRegistry

from services.common.broker import Broker, BrokerMetrics
from services.common.topology import Topology
from services.consumer.acker import Acker
from services.consumer.autoscaler import Autoscaler, BrokerDepthProbe
from services.consumer.batch import Delivery
from services.consumer.freshness import Freshness
from services.consumer.group import MAX_GROUPS
from services.consumer.history import WorkerHistory
from services.consumer.intake import Intake
from services.consumer.metrics import ConsumerMetrics
from services.consumer.output import build_output, new_batcher
from services.consumer.poison import Poison
from services.consumer.pool import Pool
from services.consumer.readiness import Directory, Readiness
from services.consumer.settings import ConsumerSettings
from services.consumer.sink import Sink

log = logging.getLogger(__name__)

# After the drain: the longest wait for the channels and the connection to close (a stalled
# broker must not hold the process past its grace period).
CLOSE_TIMEOUT_SECONDS = 3.0


class ConsumerService:
    def __init__(
        self,
        settings: ConsumerSettings,
        registry: CollectorRegistry,
        *,
        wrap_sink: Callable[[Sink], Sink] | None = None,
    ) -> None:
        """`wrap_sink`: tests hand in a wrapper around the service's own sink (a slow or
        failing one), through the `Sink` protocol."""
        self.settings = settings
        self.metrics = ConsumerMetrics(registry)
        self.history = WorkerHistory(settings.history_limit)
        self.topology = Topology.from_settings(settings)
        # SYNC_MODE=file: a writer thread per worker (its step's batches beyond the first
        # wait for one: more threads writing one directory at once only contend for its
        # lock), plus the group commits in progress (record and rename groups);
        # SYNC_MODE=group uses one of them.
        self._executor = ThreadPoolExecutor(
            max_workers=settings.shards_count * settings.workers_max + 2 * MAX_GROUPS,
            thread_name_prefix="adp-write",
        )
        # The sink owns the ledger; the service keeps it only to settle acked messages.
        sink, self.ledger, self.destination = build_output(settings, self.metrics, self._executor)
        self.sink = wrap_sink(sink) if wrap_sink is not None else sink
        self.freshness = Freshness(registry, settings.shards_count)
        self.acker = Acker(
            self.metrics,
            self.ledger.acked if self.ledger is not None else _nothing,
            freshness=self.freshness,
        )
        self.pools = [
            Pool(
                shard,
                self.sink,
                self.acker,
                self.history,
                self.metrics,
                workers_min=settings.workers_min,
                workers_max=settings.workers_max,
                timeout=settings.worker_timeout_seconds,
            )
            for shard in range(settings.shards_count)
        ]
        self.batchers = [new_batcher(settings, pool) for pool in self.pools]
        self._probe = BrokerDepthProbe(self.topology)
        self._intake = Intake(
            topology=self.topology,
            prefetch=settings.prefetch,
            batchers=self.batchers,
            poison=Poison(self.topology, self.sink, self.acker, self.metrics),
            probe=self._probe,
            freshness=self.freshness,
            metrics=self.metrics,
        )
        self._broker = Broker.from_settings(
            settings,
            name=f"adp-consumer-{settings.host_name}",
            setup=self._intake.attach,
            metrics=BrokerMetrics(registry, "adp_consumer"),
        )
        self._directory = Directory(self.sink, self.destination)
        self.readiness = Readiness(
            self._broker, self._intake, self._probe, self.pools, self._directory, settings
        )
        self._stack = contextlib.AsyncExitStack()
        self._drained = False
        self._left = 0  # batches not written when the broker closed
        self.metrics.broker_connected.set_function(lambda: float(self._broker.connected))

    def pools_state(self) -> list[dict[str, int]]:
        """Per shard: live workers and bounds, busy workers, queued batches, and entries
        received but not yet written (in the shared batch, queued, or being written)."""
        states = []
        for pool, batcher in zip(self.pools, self.batchers, strict=True):
            state = pool.state()
            state["inflight_entries"] += batcher.buffered
            states.append(state)
        return states

    def not_ready(self) -> str | None:
        """None when ready (see `readiness.py`)."""
        return self.readiness.not_ready()

    async def __aenter__(self) -> ConsumerService:
        try:
            cleaned = self.sink.prepare()
        except OSError as exc:
            # Not a reason to crash-loop: report not ready, the writes retry.
            self._directory.writable = False
            log.error("output %s unusable: %s", self.destination, exc)
        else:
            if cleaned:
                log.info("removed %d unfinished temporary files of this host", cleaned)
        # Each resource's stop is pushed as soon as it has started: the stack runs them in
        # reverse order on leaving, and at once if a later step of the start-up fails.
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._stopped)
            await self._broker.__aenter__()
            stack.push_async_exit(self._close_broker)
            if self.ledger is not None:
                stack.push_async_callback(self._last_settle)
            for pool in self.pools:
                pool.start()
                stack.push_async_callback(pool.stop)
            stack.push_async_callback(self._cancel, self._start_loops())
            stack.push_async_callback(self._drain)
            self._stack = stack.pop_all()
        s = self.settings
        log.info(
            "consumer started: %d shards, %d..%d workers each, batches of %d, output %s%s "
            "(compression %s)",
            s.shards_count,
            s.workers_min,
            s.workers_max,
            s.batch_size,
            self.destination,
            f"/{s.output_path_template}" if s.output_path_template else "",
            s.output_compression,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.__aexit__(exc_type, exc, tb)

    def _start_loops(self) -> list[asyncio.Task[None]]:
        s = self.settings
        autoscaler = Autoscaler.from_settings(s, self.pools, self._probe, self.metrics)
        tasks = [
            asyncio.create_task(autoscaler.run(), name="autoscaler"),
            asyncio.create_task(self._directory.watch(), name="directory-check"),
        ]
        if s.history_log_interval_seconds:
            history = self.history.log_every(s.history_log_interval_seconds)
            tasks.append(asyncio.create_task(history, name="history-log"))
        if self.ledger is not None:
            settle = self.ledger.settle_every(self._intake.barrier)
            tasks.append(asyncio.create_task(settle, name="ledger-settle"))
        return tasks

    async def _drain(self) -> None:
        """Stop consuming, seal the partial batches, wait for every batch to be written and
        acked (bounded by SHUTDOWN_TIMEOUT_SECONDS)."""
        timeout = self.settings.shutdown_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                await self._intake.stop()
                for batcher in self.batchers:
                    batcher.flush()
                results = await asyncio.gather(*(pool.drained(timeout) for pool in self.pools))
                self._drained = all(results)
        except TimeoutError:
            self._drained = False
        self._left = 0  # batches not written when the broker closed

    @staticmethod
    async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _last_settle(self) -> None:
        """After a complete drain only: the ledger's last settle (bounded)."""
        if self.ledger is not None and self._drained:
            await self.ledger.settle_last(self._intake.barrier, CLOSE_TIMEOUT_SECONDS)

    async def _close_broker(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._left = sum(pool.queue.pending for pool in self.pools)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self._intake.close()
                await self._broker.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            log.warning("broker connection did not close within %ss", CLOSE_TIMEOUT_SECONDS)

    def _stopped(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker history at shutdown:\n%s", self.history.table())
        log.info(
            "consumer stopped%s: %d deliveries acked, %d batches left unwritten "
            "(the broker redelivers them)",
            "" if self._drained else " (drain timed out)",
            self.acker.acked,
            self._left,
        )


def _nothing(delivery: Delivery) -> None:
    """No ledger: an ack settles nothing more."""
