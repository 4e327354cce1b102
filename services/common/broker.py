"""The broker connection: opened in the background, never a reason to crash, and moved to
another node of the cluster when its node goes.

Both services must start and answer /healthz without a broker (a pod must not crash-loop
because RabbitMQ is late), so `Broker` connects in a background task, trying each node of
`RABBITMQ_URL` in turn (from a per-process start, `Nodes`), a round of them without a pause,
then the next round after a capped exponential backoff, with a log line per attempt.

Once connected, the connection is aio-pika's robust one (`FailoverConnection`, what
`connect_robust` makes): after a loss it reconnects by itself every second and restores its
channels, queues and consumers. Each of its attempts goes to `connection.url`, which the
broker points at the next node when the connection is lost and again every second while it
stays lost, so a process moves round the nodes until one answers, without a restart.
`connected` and `node` tell the readiness probes and the metrics the truth in between.

`setup` runs once, on the first connection, before it is called ready: each service
declares its topology and opens its channels there; aio-pika restores those channels (and
their queues and consumers) on whichever node the connection comes back on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url
from aiormq.exceptions import AMQPError, ChannelInvalidStateError, ChannelPreconditionFailed
from pamqp.exceptions import PAMQPException
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.common.nodes import Nodes
from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

# What a lost or refused broker looks like from here: the one tuple the services catch
# around broker calls.
CONNECTIVITY_ERRORS: tuple[type[BaseException], ...] = (
    AMQPError,
    ChannelInvalidStateError,  # a RuntimeError: the channel closed under us
    PAMQPException,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)

Setup = Callable[[AbstractRobustConnection], Awaitable[None]]

# Seconds between aio-pika's reconnection attempts, and between moves to the next node
# while the connection stays lost.
RECONNECT_SECONDS = 1.0


class BrokerMetrics:
    """Which node a process is connected to, and how often it moved. `prefix`: the
    service's metric prefix (adp_api, adp_consumer). Labels bounded by the node list."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.node = Gauge(
            f"{prefix}_broker_node",
            "1 for the broker node this process is connected to (node: its position in "
            "RABBITMQ_URL, host: its host:port), 0 for the others.",
            ["node", "host"],
            registry=registry,
        )
        self.failovers = Counter(
            f"{prefix}_broker_failovers_total",
            "Broker connections lost and moved to the next node of RABBITMQ_URL.",
            registry=registry,
        )

    def watch(self, broker: Broker) -> None:
        for index, url in enumerate(broker.nodes.urls):
            host = f"{url.host}:{url.port}"
            self.node.labels(str(index), host).set_function(_is_on(broker, index))


def _is_on(broker: Broker, index: int) -> Callable[[], float]:
    return lambda: float(broker.node == index)


class FailoverConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection; `Broker` points its `url` (which every reconnection
    attempt reads) at the node to try next."""


class Broker:
    """An async context: enter starts connecting in the background, exit closes."""

    def __init__(
        self,
        nodes: Nodes,
        *,
        name: str,
        setup: Setup,
        connect_timeout: float = 5.0,
        retry_max_seconds: float = 10.0,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self.nodes = nodes
        self._name = name
        self._setup = setup
        self._connect_timeout = connect_timeout
        self._retry_max = retry_max_seconds
        self._metrics = metrics
        self._connection: FailoverConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self.attempts = 0
        self.failovers = 0
        self._up = False  # connected since the last loss (vs. failed reconnection attempts)
        self._moved_at = 0.0
        if metrics is not None:
            metrics.watch(self)

    @classmethod
    def from_settings(
        cls,
        settings: ServiceSettings,
        *,
        name: str,
        setup: Setup,
        metrics: BrokerMetrics | None = None,
    ) -> Broker:
        """The broker of RABBITMQ_URL with the settings' connect timeout and backoff cap."""
        return cls(
            settings.broker_nodes(),
            name=name,
            setup=setup,
            connect_timeout=settings.broker_connect_timeout_seconds,
            retry_max_seconds=settings.broker_retry_max_seconds,
            metrics=metrics,
        )

    @property
    def connected(self) -> bool:
        """True while a connection is open (False before the first one and during a loss)."""
        conn = self._connection
        return conn is not None and not conn.is_closed and conn.connected.is_set()

    @property
    def node(self) -> int | None:
        """The position in RABBITMQ_URL of the node connected to; None when not connected.
        Read from the open transport: `connection.url` may already name the next node."""
        conn = self._connection
        if conn is None or not self.connected or conn.transport is None:
            return None
        return self.nodes.find(conn.transport.connection.url)

    async def __aenter__(self) -> Broker:
        self._task = asyncio.create_task(self._run(), name=f"{self._name}-connect")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()
            log.info("broker connection %s closed", self._name)

    async def _run(self) -> None:
        connection = await self._connect_forever()
        self._connection = connection
        self._up = True
        connection.close_callbacks.add(self._on_close)
        connection.reconnect_callbacks.add(self._on_restored)
        # aio-pika calls the close callbacks on a loss and after each failed reconnection
        # attempt, and `_on_close` moves to the next node then. An attempt that hangs
        # instead (a node whose host vanished) is cut by the connect timeout; should one
        # ever end without a callback, this moves on anyway.
        stuck = 2 * RECONNECT_SECONDS + self._connect_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(RECONNECT_SECONDS)
            lost = not connection.connected.is_set() and not connection.is_closed
            if lost and loop.time() - self._moved_at > stuck:
                self._move(connection)

    async def _connect_forever(self) -> FailoverConnection:
        # Unbounded on purpose (guarantee 4: start without a broker, recover by itself);
        # every attempt is visible: a counter, the delay, a warning line. A round tries
        # every node once; the backoff pauses between rounds.
        delay = 0.5
        while True:
            for _ in range(len(self.nodes)):
                self.attempts += 1
                try:
                    connection = await self._connect_robust()
                except CONNECTIVITY_ERRORS as exc:
                    log.warning(
                        "broker %s unreachable (attempt %d: %s)%s",
                        self.nodes.shown,
                        self.attempts,
                        exc or type(exc).__name__,
                        "; trying the next node" if len(self.nodes) > 1 else "",
                    )
                else:
                    if await self._set_up(connection, delay):
                        return connection
                self.nodes.advance()
            log.warning("no broker node answered; next round in %.1fs", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)

    def _on_close(self, _: object, exc: BaseException | None) -> None:
        """A close callback: the connection was lost, or a reconnection attempt failed.
        Runs before aio-pika's next attempt, which goes to the node it points at."""
        conn = self._connection
        if conn is None or conn.close_called or conn.is_closed:
            return  # our own close, not a loss
        was = self.nodes.shown
        self._move(conn)
        if self._up:
            self._up = False
            if len(self.nodes) > 1:
                self.failovers += 1
                if self._metrics is not None:
                    self._metrics.failovers.inc()
            log.warning(
                "broker connection to %s lost (%s); reconnecting to %s",
                was,
                exc or "closed",
                self.nodes.shown,
            )
        else:
            log.warning(
                "broker %s unreachable (%s); next attempt to %s in %.0fs",
                was,
                exc or "closed",
                self.nodes.shown,
                RECONNECT_SECONDS,
            )

    def _on_restored(self, _: object) -> None:
        self._up = True
        node = self.node
        log.info(
            "broker connection restored on %s", "?" if node is None else self.nodes.shown_at(node)
        )

    def _move(self, connection: FailoverConnection) -> None:
        """Point the connection's next attempt at the next node (`url` is what aio-pika's
        reconnection reads)."""
        connection.url = self.nodes.advance()
        self._moved_at = asyncio.get_running_loop().time()

    async def _connect_robust(self) -> FailoverConnection:
        """What `aio_pika.connect_robust` does, keeping hold of the connection object so a
        failed attempt is closed here rather than left to the garbage collector (whose
        close would run outside any event loop)."""
        connection = FailoverConnection(
            make_url(self.nodes.current, reconnect_interval=RECONNECT_SECONDS),
            client_properties={"connection_name": self._name},
            reconnect_interval=RECONNECT_SECONDS,
        )
        try:
            await connection.connect(timeout=self._connect_timeout)
        except BaseException:
            await connection.close()
            raise
        return connection

    async def _set_up(self, connection: FailoverConnection, delay: float) -> bool:
        try:
            await self._setup(connection)
        except ChannelPreconditionFailed as exc:
            # RabbitMQ refuses to redeclare a queue with other arguments (e.g. a changed
            # QUEUE_MAX_LENGTH): no crash loop, a clear instruction, and not ready until fixed.
            log.error(
                "broker %s: a shard queue (or the dead-letter queue) exists with other "
                "arguments than this configuration (%s). Set QUEUE_MAX_LENGTH, QUEUE_TYPE "
                "(and the other queue settings) as the queues were declared, or drain the "
                "queues and delete them (rabbitmqctl delete_queue <name>) so they are "
                "declared anew (README: High availability, moving to quorum queues); "
                "retrying in %.1fs",
                self.nodes.shown,
                exc,
                delay,
            )
            await connection.close()
            return False
        except CONNECTIVITY_ERRORS as exc:
            log.error(
                "broker %s connected but set-up failed (attempt %d: %s); retrying in %.1fs",
                self.nodes.shown,
                self.attempts,
                exc,
                delay,
            )
            await connection.close()
            return False
        log.info("connected to broker %s (attempt %d)", self.nodes.shown, self.attempts)
        return True
