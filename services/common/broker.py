"""The broker connection: opened in the background, never a reason to crash.

Both services must start and answer /healthz without a broker (a pod must not crash-loop
because RabbitMQ is late), so `Broker` connects (aio-pika's robust connection, as
`connect_robust` makes it) in a background task, retrying with capped
exponential backoff and a log line per attempt. Once the first connection is made, aio-pika's
robust connection restores itself (and its channels) after a loss; `connected` tells the
readiness probes the truth in between.

`setup` runs once, on the first connection, before it is called ready: each service
declares its topology and opens its channels there; aio-pika's robust connection restores
those channels (and their queues and consumers) after each reconnect.
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


class Broker:
    """An async context: enter starts connecting in the background, exit closes."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        setup: Setup,
        connect_timeout: float = 5.0,
        retry_max_seconds: float = 10.0,
        redacted_url: str | None = None,
    ) -> None:
        self._url = url
        self._name = name
        self._setup = setup
        self._connect_timeout = connect_timeout
        self._retry_max = retry_max_seconds
        self._shown_url = redacted_url or url
        self._connection: AbstractRobustConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self.attempts = 0

    @property
    def connected(self) -> bool:
        """True while a connection is open (False before the first one and during a loss)."""
        conn = self._connection
        return conn is not None and not conn.is_closed and conn.connected.is_set()

    async def __aenter__(self) -> Broker:
        self._task = asyncio.create_task(self._connect_forever(), name=f"{self._name}-connect")
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

    async def _connect_forever(self) -> None:
        # Unbounded on purpose (guarantee 4: start without a broker, recover by itself);
        # every attempt is visible: a counter, the delay, a warning line.
        delay = 0.5
        while True:
            self.attempts += 1
            try:
                connection = await self._connect_robust()
            except CONNECTIVITY_ERRORS as exc:
                log.warning(
                    "broker %s unreachable (attempt %d: %s); retrying in %.1fs",
                    self._shown_url,
                    self.attempts,
                    exc or type(exc).__name__,
                    delay,
                )
            else:
                if await self._set_up(connection, delay):
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)

    async def _connect_robust(self) -> AbstractRobustConnection:
        """What `aio_pika.connect_robust` does, keeping hold of the connection object so a
        failed attempt is closed here rather than left to the garbage collector (whose
        close would run outside any event loop)."""
        connection = aio_pika.RobustConnection(
            make_url(self._url, reconnect_interval=1),
            client_properties={"connection_name": self._name},
            reconnect_interval=1,
        )
        try:
            await connection.connect(timeout=self._connect_timeout)
        except BaseException:
            await connection.close()
            raise
        return connection

    async def _set_up(self, connection: AbstractRobustConnection, delay: float) -> bool:
        try:
            await self._setup(connection)
        except ChannelPreconditionFailed as exc:
            # RabbitMQ refuses to redeclare a queue with other arguments (e.g. a changed
            # QUEUE_MAX_LENGTH): no crash loop, a clear instruction, and not ready until fixed.
            log.error(
                "broker %s: a shard queue exists with other arguments than this "
                "configuration (%s). Set QUEUE_MAX_LENGTH (and the other queue settings) as "
                "the queues were declared, or drain the queues and delete them "
                "(rabbitmqctl delete_queue <name>) so they are declared anew; "
                "retrying in %.1fs",
                self._shown_url,
                exc,
                delay,
            )
            await connection.close()
            return False
        except CONNECTIVITY_ERRORS as exc:
            log.error(
                "broker %s connected but set-up failed (attempt %d: %s); retrying in %.1fs",
                self._shown_url,
                self.attempts,
                exc,
                delay,
            )
            await connection.close()
            return False
        self._connection = connection
        log.info("connected to broker %s (attempt %d)", self._shown_url, self.attempts)
        return True
