"""The consumer service wires the consumer: per shard a batcher and a worker pool, the
intake (`intake.py`: channels, the message callback), poison messages (`poison.py`),
readiness (`readiness.py`), the autoscaler and its depth probe, the broker connection.

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
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from services.common.broker import CONNECTIVITY_ERRORS, Broker, BrokerMetrics
from services.common.topology import Topology
from services.consumer.acker import Acker
from services.consumer.autoscaler import Autoscaler, BrokerDepthProbe
from services.consumer.batch import Batcher, Delivery
from services.consumer.encoding import line_size
from services.consumer.freshness import Freshness
from services.consumer.group import MAX_GROUPS
from services.consumer.history import WorkerHistory
from services.consumer.intake import Intake
from services.consumer.ledger import Ledger
from services.consumer.metrics import ConsumerMetrics
from services.consumer.poison import Poison
from services.consumer.pool import Pool
from services.consumer.readiness import Directory, Readiness
from services.consumer.settings import ConsumerSettings
from services.consumer.sink import FileSink, Sink, safe_host

if TYPE_CHECKING:
    from services.consumer.object_store import ObjectStore

log = logging.getLogger(__name__)

# After the drain: the longest wait for the channels and the connection to close (a stalled
# broker must not hold the process past its grace period).
CLOSE_TIMEOUT_SECONDS = 3.0
# How often acked deliveries are confirmed applied (a barrier) and forgotten by the ledger.
SETTLE_SECONDS = 2.0


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
        # A writer thread per batch that can be in progress at once (a worker's), plus the
        # group commits in progress (record and rename groups).
        self._executor = ThreadPoolExecutor(
            max_workers=settings.shards_count * settings.workers_max + 2 * MAX_GROUPS,
            thread_name_prefix="adp-write",
        )
        # The sink owns the ledger; the service keeps it only to settle acked messages.
        store = self._new_store(settings) if settings.output_url else None
        self.ledger = self._new_ledger(settings, store) if settings.exactly_once else None
        sink = self._new_sink(settings, self.ledger, store)
        self.destination = settings.output_url or str(settings.data_output_dir)
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
        self.batchers = [self._new_batcher(settings, pool) for pool in self.pools]
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

    @staticmethod
    def _new_batcher(settings: ConsumerSettings, pool: Pool) -> Batcher:
        router = settings.path_template.router(pool.shard)
        return Batcher(
            pool.shard,
            settings.batch_size,
            settings.batch_max_wait_seconds,
            pool.submit,
            max_bytes=settings.batch_max_bytes,
            route=router.directories if router is not None else None,
            size=line_size if settings.batch_max_bytes else None,
        )

    def _new_store(self, settings: ConsumerSettings) -> ObjectStore:
        # Imported only for OUTPUT_URL: obstore comes with the `s3` extra (the consumer image's).
        from services.consumer.object_store import ObjectLocation, ObjectStore

        errors = self.metrics.store_errors
        return ObjectStore(
            ObjectLocation.parse(settings.output_url),
            endpoint=settings.s3_endpoint_url or None,
            on_error=lambda operation: errors.labels(operation).inc(),
            on_put=self.metrics.put_seconds.observe,
        )

    def _new_ledger(self, settings: ConsumerSettings, store: ObjectStore | None) -> Ledger:
        duplicates = self.metrics.duplicates
        host = safe_host(settings.host_name)
        log_in_bucket = None
        if store is not None:
            from services.consumer.object_ledger import ObjectLedgerLog

            log_in_bucket = ObjectLedgerLog(
                store,
                host,
                retention=settings.ledger_retention_seconds,
                max_parts=settings.ledger_max_parts,
                on_forget=self.metrics.ledger_forgotten.inc,
            )
        ledger = Ledger(
            settings.data_output_dir,
            host,
            retention=settings.ledger_retention_seconds,
            max_parts=settings.ledger_max_parts,
            on_forget=self.metrics.ledger_forgotten.inc,
            on_skip=lambda shard, count: duplicates.labels(str(shard)).inc(count),
            log=log_in_bucket,
        )
        self.metrics.ledger_parts.set_function(lambda: ledger.parts)
        return ledger

    def _new_sink(
        self, settings: ConsumerSettings, ledger: Ledger | None, store: ObjectStore | None
    ) -> Sink:
        """The sink the batches are written to: the object store (OUTPUT_URL) or files."""
        if store is not None:
            from services.consumer.object_sink import ObjectSink  # the s3 extra's obstore

            return ObjectSink(
                store,
                settings.host_name,
                self._executor,
                ledger,
                compression=settings.output_compression,
                on_group=self.metrics.group_batches.observe,
            )
        return FileSink(
            settings.data_output_dir,
            settings.host_name,
            self._executor,
            ledger,
            compression=settings.output_compression,
            sync=settings.sync_mode,
            on_group=self.metrics.group_batches.observe,
        )

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
            tasks.append(asyncio.create_task(self._log_history(), name="history-log"))
        if self.ledger is not None:
            tasks.append(asyncio.create_task(self._settle(), name="ledger-settle"))
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
        """The last acks' barrier, so the log left behind holds only what may come back."""
        if self.ledger is None or not self._drained:
            return
        with contextlib.suppress(TimeoutError, *CONNECTIVITY_ERRORS):
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self.ledger.settle(self._intake.barrier)

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

    async def _settle(self) -> None:
        assert self.ledger is not None
        while True:
            await asyncio.sleep(SETTLE_SECONDS)
            await self.ledger.settle(self._intake.barrier)

    async def _log_history(self) -> None:
        while True:
            await asyncio.sleep(self.settings.history_log_interval_seconds)
            log.info("worker history:\n%s", self.history.table())


def _nothing(delivery: Delivery) -> None:
    """No ledger: an ack settles nothing more."""
