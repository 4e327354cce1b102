"""The consumer service: per shard a consumer channel (bounded prefetch), a batcher and a
worker pool; an autoscaler over all pools; broker connection in the background.

Lifecycle (an async context): entering starts the pools and the background connection;
leaving drains — stop consuming, seal partial batches, wait (bounded by
SHUTDOWN_TIMEOUT_SECONDS) for every batch of every shard to be written and acked, stop the
workers, close the channels and the connection in reverse order (at most
CLOSE_TIMEOUT_SECONDS more), log one summary line. Whatever is not written by then stays
unacked, and the broker redelivers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    DeliveryMode,
)
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.exceptions import DeliveryError
from prometheus_client import CollectorRegistry

from services.common.broker import CONNECTIVITY_ERRORS, Broker, BrokerMetrics
from services.common.schema import InvalidEntries, parse_message
from services.common.topology import Topology
from services.common.wire import InvalidParts
from services.consumer.acker import Acker
from services.consumer.autoscaler import Autoscaler
from services.consumer.batch import Batcher, Delivery
from services.consumer.encoding import line_size
from services.consumer.freshness import Freshness
from services.consumer.group import MAX_GROUPS
from services.consumer.history import WorkerHistory
from services.consumer.ledger import Ledger
from services.consumer.metrics import ConsumerMetrics
from services.consumer.pool import Pool
from services.consumer.settings import ConsumerSettings
from services.consumer.sink import FileSink, Sink, safe_host

if TYPE_CHECKING:
    from services.consumer.object_store import ObjectStore

log = logging.getLogger(__name__)

DIRECTORY_CHECK_SECONDS = 5.0
# After the drain: the longest wait for the channels and the connection to close (a stalled
# broker must not hold the process past its grace period).
CLOSE_TIMEOUT_SECONDS = 3.0
# How often acked deliveries are confirmed applied (a barrier) and forgotten by the ledger.
SETTLE_SECONDS = 2.0
# A poison message neither dead-lettered nor kept goes back to the queue after this pause.
REQUEUE_PAUSE_SECONDS = 1.0
DEAD_LETTER_ERRORS: tuple[type[BaseException], ...] = (
    DeliveryError,
    TimeoutError,
    *CONNECTIVITY_ERRORS,
)


class BrokerDepthProbe:
    """Ready messages per shard queue, by a passive declare on a channel of its own. It
    also keeps each queue's consumer count from the same answer (readiness uses it)."""

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self.consumers: dict[int, int] = {}

    def attach(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection

    async def depth(self, shard: int) -> int:
        if self._connection is None or not self._connection.connected.is_set():
            raise ConnectionError("broker not connected")
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        queue = await self._channel.declare_queue(
            self._topology.queue_name(shard), passive=True, robust=False
        )
        self.consumers[shard] = queue.declaration_result.consumer_count or 0
        return queue.declaration_result.message_count or 0


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
        ledger = self._new_ledger(settings, store) if settings.exactly_once else None
        self.ledger = ledger
        sink: Sink
        if store is not None:
            from services.consumer.object_sink import ObjectSink  # the s3 extra's obstore

            sink = ObjectSink(
                store,
                settings.host_name,
                self._executor,
                ledger,
                compression=settings.output_compression,
                on_group=self.metrics.group_batches.observe,
            )
        else:
            sink = FileSink(
                settings.data_output_dir,
                settings.host_name,
                self._executor,
                ledger,
                compression=settings.output_compression,
                sync=settings.sync_mode,
                on_group=self.metrics.group_batches.observe,
            )
        self.destination = settings.output_url or str(settings.data_output_dir)
        self.sink = wrap_sink(sink) if wrap_sink is not None else sink
        self.freshness = Freshness(registry, settings.shards_count)
        self.acker = Acker(
            self.metrics,
            ledger.acked if ledger is not None else _nothing,
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
        self._broker = Broker(
            settings.broker_nodes(),
            name=f"adp-consumer-{settings.host_name}",
            setup=self._attach,
            connect_timeout=settings.broker_connect_timeout_seconds,
            retry_max_seconds=settings.broker_retry_max_seconds,
            metrics=BrokerMetrics(registry, "adp_consumer"),
        )
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._channels: list[AbstractChannel] = []
        self._dead: AbstractChannel | None = None  # confirm-mode, for dead-lettering
        self._tasks: list[asyncio.Task[Any]] = []
        self._directory_ok = True
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
        """None when ready: connected and consuming every shard, and batches can be
        written."""
        if not self._broker.connected or not self._consumers:
            return "broker not connected"
        if any(channel.is_closed for channel in self._channels):
            return "a consumer channel is closed"
        # A restored connection that came back without its consumers (a known aio-pika
        # failure) shows as a queue with none, from the autoscaler's last reading.
        idle = [shard for shard, count in self._probe.consumers.items() if count == 0]
        if idle:
            return f"no consumer on shard(s) {idle}"
        if not self._directory_ok or not all(pool.write_ok for pool in self.pools):
            return f"output {self.destination} not writable"
        return None

    async def __aenter__(self) -> ConsumerService:
        try:
            cleaned = self.sink.prepare()
        except OSError as exc:
            # Not a reason to crash-loop: report not ready, the writes retry.
            self._directory_ok = False
            log.error("output %s unusable: %s", self.destination, exc)
        else:
            if cleaned:
                log.info("removed %d unfinished temporary files of this host", cleaned)
        for pool in self.pools:
            pool.start()
        await self._broker.__aenter__()
        s = self.settings
        autoscaler = Autoscaler(
            self.pools,
            self._probe,
            self.metrics,
            up=s.scale_up_backlog,
            down=s.scale_down_backlog,
            cooldown=s.scale_down_cooldown_seconds,
            interval=s.scale_interval_seconds,
        )
        self._tasks = [
            asyncio.create_task(autoscaler.run(), name="autoscaler"),
            asyncio.create_task(self._watch_directory(), name="directory-check"),
        ]
        if s.history_log_interval_seconds:
            self._tasks.append(asyncio.create_task(self._log_history(), name="history-log"))
        if self.ledger is not None:
            self._tasks.append(asyncio.create_task(self._settle(), name="ledger-settle"))
        log.info(
            "consumer started: %d shards, %d..%d workers each, batches of %d, output %s%s "
            "(compression %s)",
            s.shards_count,
            s.workers_min,
            s.workers_max,
            s.batch_size,
            s.data_output_dir,
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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout_seconds
        drained = True
        try:
            async with asyncio.timeout_at(deadline):
                await self._stop_consuming()
                for batcher in self.batchers:
                    batcher.flush()
                results = await asyncio.gather(
                    *(pool.drained(self.settings.shutdown_timeout_seconds) for pool in self.pools)
                )
                drained = all(results)
        except TimeoutError:
            drained = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pool in self.pools:
            await pool.stop()
        if self.ledger is not None and drained:
            # The last acks' barrier, so the log left behind holds only what may come back.
            with contextlib.suppress(TimeoutError, *CONNECTIVITY_ERRORS):
                async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                    await self.ledger.settle(self._barrier)
        left = sum(pool.queue.pending for pool in self.pools)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                for channel in reversed(self._channels):
                    with contextlib.suppress(*CONNECTIVITY_ERRORS):
                        await channel.close()
                await self._broker.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            log.warning("broker connection did not close within %ss", CLOSE_TIMEOUT_SECONDS)
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker history at shutdown:\n%s", self.history.table())
        log.info(
            "consumer stopped%s: %d deliveries acked, %d batches left unwritten "
            "(the broker redelivers them)",
            "" if drained else " (drain timed out)",
            self.acker.acked,
            left,
        )

    async def _attach(self, connection: AbstractRobustConnection) -> None:
        """Broker set-up, on the first connection: a channel per shard with a bounded
        prefetch, its queue declared and consumed. aio-pika restores them on reconnect.
        If a shard fails (a queue declared with other arguments), the broker connection
        is closed and the whole set-up retried; deliveries already taken on the earlier
        shards cannot be acked then, and the broker redelivers them."""
        channels: list[AbstractChannel] = []
        consumers: list[tuple[AbstractQueue, str]] = []
        dead = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await self.topology.declare_dead_letter(dead)
        self._dead = dead
        for shard in range(self.settings.shards_count):
            channel = await connection.channel()
            channels.append(channel)
            await channel.set_qos(prefetch_count=self.settings.prefetch)
            queue = await self.topology.declare_one(channel, shard)
            consumers.append((queue, await queue.consume(self._on_message_for(shard))))
        self._probe.attach(connection)
        self._channels, self._consumers = channels, consumers

    def _on_message_for(self, shard: int) -> Any:
        batcher = self.batchers[shard]
        redeliveries = self.metrics.redeliveries.labels(str(shard))

        async def on_message(message: AbstractIncomingMessage) -> None:
            if message.redelivered:
                redeliveries.inc()
            try:
                entries = parse_message(message.body)
                directories = batcher.directories(entries)
                delivery = Delivery.of(message, len(entries))
            except (InvalidEntries, InvalidParts) as exc:
                await self._reject(shard, message, str(exc))
                return
            self.freshness.arrived(shard, delivery)
            batcher.add(delivery, entries, directories)

        return on_message

    async def _reject(self, shard: int, message: AbstractIncomingMessage, reason: str) -> None:
        """A message with no valid entries (a poison message: someone published it by hand)
        goes to the dead-letter queue with the reason in a header, then is acked, so the
        shard keeps flowing. If the broker does not take it there, its body is kept under
        .rejected/ instead; if that fails too, it is requeued."""
        where = await self._dead_letter(shard, message, reason)
        if where is None:
            try:
                where = await self.sink.reject(message.body, reason, message.message_id)
            except OSError as exc:
                log.warning(
                    "could not keep a rejected message (%s); requeueing it in %gs",
                    exc,
                    REQUEUE_PAUSE_SECONDS,
                )
                # Not at once: with the dead-letter channel and the volume both failing, an
                # immediate requeue would bring it straight back, in a tight loop.
                await asyncio.sleep(REQUEUE_PAUSE_SECONDS)
                await self.acker.requeue(Delivery(message, 0))
                return
        self.metrics.rejected.labels(str(shard)).inc()
        log.warning(
            "shard %d: message %s has no valid entries (%s); moved to %s",
            shard,
            message.message_id,
            reason,
            where,
        )
        await self.acker.ack(Delivery(message, 0))

    async def _dead_letter(
        self, shard: int, message: AbstractIncomingMessage, reason: str
    ) -> str | None:
        channel, queue = self._dead, self.topology.dead_letter_queue
        if channel is None or channel.is_closed:
            return None
        headers = dict(message.headers)
        headers.update(
            {
                "x-adp-reason": reason[:1000],
                "x-adp-shard": shard,
                "x-adp-source-queue": self.topology.queue_name(shard),
            }
        )
        dead = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            message_id=message.message_id,
            delivery_mode=DeliveryMode.PERSISTENT,
        )
        try:
            await channel.default_exchange.publish(
                dead, routing_key=queue, mandatory=True, timeout=CLOSE_TIMEOUT_SECONDS
            )
        except DEAD_LETTER_ERRORS as exc:
            log.warning("could not dead-letter a message to %s: %s", queue, exc)
            return None
        return f"queue {queue}"

    async def _settle(self) -> None:
        assert self.ledger is not None
        while True:
            await asyncio.sleep(SETTLE_SECONDS)
            await self.ledger.settle(self._barrier)

    async def _barrier(self, channel: RawChannel) -> None:
        """A synchronous round trip on a consumer channel: once answered, the broker has
        applied every ack sent on it before (the prefetch is set to what it already is)."""
        await channel.basic_qos(prefetch_count=self.settings.prefetch, timeout=5)

    async def _stop_consuming(self) -> None:
        for queue, tag in self._consumers:
            with contextlib.suppress(*CONNECTIVITY_ERRORS):
                await queue.cancel(tag)

    async def _watch_directory(self) -> None:
        while True:
            try:
                await self.sink.check()
            except OSError as exc:
                if self._directory_ok:
                    log.warning("output %s not writable: %s", self.destination, exc)
                self._directory_ok = False
            else:
                self._directory_ok = True
            await asyncio.sleep(DIRECTORY_CHECK_SECONDS)

    async def _log_history(self) -> None:
        while True:
            await asyncio.sleep(self.settings.history_log_interval_seconds)
            log.info("worker history:\n%s", self.history.table())


def _nothing(delivery: Delivery) -> None:
    """No ledger: an ack settles nothing more."""
