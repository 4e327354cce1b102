"""Publishing with publisher confirms, grouping concurrent requests into shared messages.

The broker confirms a few thousand messages per second; small requests arrive faster than
that. So, per shard, requests hand in their part (a JSON array of their entries of that
shard) and wait for the message that carries it. A message leaves on the next turn of the
event loop, while fewer than `max_inflight` of the shard's messages await their confirm;
otherwise parts pile up into the next message, up to `max_message_bytes`. Under light load
each request gets its own message at once; under heavy load messages grow with the backlog
(group commit). A request is answered when every message holding its parts is confirmed.

Guarantee: `publish` returns only after the broker confirmed (persistent messages, durable
queues, `mandatory`) every message holding the request's entries; otherwise it raises
`PublishFailed`. A request that gives up before its part was sent withdraws the part, so a
503 leaves nothing of it behind in that case. A confirm that is lost with the connection is
indistinguishable from a failure: the request gets a 503 and the client retries; with the
same Idempotency-Key the retry's parts carry the same ids (`services.common.wire`), so the
consumer writes those entries once; without one it may write them twice.

A nack renews the confirm channel (at most once per `RENEW_SECONDS`): on a cluster, a
quorum queue whose leader's node died is led by another node within a second, but a
channel that first published to it in that second keeps addressing the dead leader, and
RabbitMQ 3.10 nacks every publish on it until that node is back (seen here: 17 s of nacks
after a kill -9). A fresh channel looks the leader up anew; publishes already sent on the
old one keep it for `timeout` seconds, for their confirms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection, DeliveryMode
from aiormq.exceptions import DeliveryError, PublishError

from services.api.errors import PublishFailed
from services.api.metrics import ApiMetrics
from services.common.broker import CONNECTIVITY_ERRORS
from services.common.schema import Entry, dump_entries
from services.common.topology import Topology
from services.common.wire import (
    ACCEPTED_HEADER,
    ENTRIES_HEADER,
    PARTS_HEADER,
    accepted_ms,
    key_id,
    part_spec,
)

log = logging.getLogger(__name__)

RENEW_SECONDS = 1.0  # at most one new confirm channel this often, after nacks


class Publisher(Protocol):
    """The seam between the endpoint and the broker."""

    @property
    def ready(self) -> bool: ...

    async def publish(self, groups: dict[int, list[Entry]], key: bytes | None = None) -> None:
        """Return once every group is confirmed into its shard's queue; else raise
        `PublishFailed`. `key`: for a request with an Idempotency-Key, its
        `wire.request_key`, from which its parts' ids derive."""


@dataclass(eq=False, slots=True)
class _Message:
    """Parts of one or more requests bound for one shard, sent as one AMQP message."""

    parts: list[bytes] = field(default_factory=list)
    specs: list[str] = field(default_factory=list)  # per part, for the x-adp-parts header
    entries: int = 0
    size: int = 0
    sent: bool = False
    # Made when its first part joins: the oldest request's acceptance (x-adp-accepted-ms).
    accepted: int = field(default_factory=lambda: accepted_ms(time.time()))
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def body(self) -> bytes:
        if len(self.parts) == 1:
            return self.parts[0]
        return b"[" + b",".join(part[1:-1] for part in self.parts) + b"]"


@dataclass(eq=False, slots=True)
class _Shard:
    index: int
    queue: str
    waiting: deque[_Message] = field(default_factory=deque)
    inflight: int = 0
    flush_scheduled: bool = False


class GroupCommitPublisher:
    def __init__(
        self,
        topology: Topology,
        metrics: ApiMetrics,
        *,
        timeout: float,
        max_inflight: int,
        max_message_bytes: int,
    ) -> None:
        self._topology = topology
        self._metrics = metrics
        self._timeout = timeout
        self._max_inflight = max_inflight
        self._max_bytes = max_message_bytes
        self._shards = [_Shard(s, topology.queue_name(s)) for s in range(topology.shards_count)]
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._renewing: set[asyncio.Task[None]] = set()
        self._renewed_at = -RENEW_SECONDS

    async def attach(self, connection: AbstractRobustConnection) -> None:
        """Broker set-up: declare the shard queues, open the confirm-mode channel."""
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await self._topology.declare(channel)
        self._connection, self._channel = connection, channel

    @property
    def ready(self) -> bool:
        conn, channel = self._connection, self._channel
        return (
            conn is not None
            and channel is not None
            and conn.connected.is_set()
            and not channel.is_closed
        )

    async def publish(self, groups: dict[int, list[Entry]], key: bytes | None = None) -> None:
        try:
            await self._publish(groups, key)
        except PublishFailed as exc:
            # Counted here only: once per request, whatever failed (its messages or its wait).
            self._metrics.publish_failures.labels(exc.reason).inc()
            raise

    async def _publish(self, groups: dict[int, list[Entry]], key: bytes | None) -> None:
        if not self.ready:
            raise PublishFailed("disconnected", "the broker is not connected")
        joined = []
        for shard, group in groups.items():
            part = dump_entries(group)
            spec = part_spec(len(group), key_id(key, part) if key else None)
            joined.append((self._join(shard, part, spec, len(group)), part, len(group)))
        waits = [message.done for message, _, _ in joined]
        if not await _all_done(waits, self._timeout):
            self._withdraw(joined)
            raise PublishFailed("timeout", f"no confirm within {self._timeout:g}s")
        for wait in waits:
            exc = wait.exception()
            if exc is not None:
                raise exc

    async def close(self, timeout: float) -> None:
        """Wait (bounded) for messages already sent to be confirmed."""
        if self._sending:
            await asyncio.wait(self._sending, timeout=timeout)
        for task in self._renewing:
            task.cancel()
        await asyncio.gather(*self._renewing, return_exceptions=True)

    def _join(self, shard_index: int, part: bytes, spec: str, entries: int) -> _Message:
        shard = self._shards[shard_index]
        message = shard.waiting[-1] if shard.waiting else None
        if message is None or (message.parts and message.size + len(part) > self._max_bytes):
            message = _Message()
            shard.waiting.append(message)
        message.parts.append(part)
        message.specs.append(spec)
        message.entries += entries
        message.size += len(part)
        if shard.inflight < self._max_inflight:
            self._schedule_flush(shard)
        return message

    def _schedule_flush(self, shard: _Shard) -> None:
        """The shard's waiting messages leave on the next turn of the event loop."""
        if not shard.flush_scheduled:
            shard.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, shard)

    def _withdraw(self, joined: list[tuple[_Message, bytes, int]]) -> None:
        """A request gave up: take its parts out of messages not yet sent."""
        for message, part, entries in joined:
            if message.sent:
                continue
            # By identity: an equal part of another request must stay.
            index = next(i for i, p in enumerate(message.parts) if p is part)
            del message.parts[index]
            del message.specs[index]
            message.entries -= entries
            message.size -= len(part)

    def _flush(self, shard: _Shard) -> None:
        shard.flush_scheduled = False
        while shard.waiting and shard.inflight < self._max_inflight:
            message = shard.waiting.popleft()
            if not message.parts:  # every request in it withdrew
                message.done.cancel()
                continue
            message.sent = True
            shard.inflight += 1
            task = asyncio.create_task(self._send(shard, message))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, shard: _Shard, message: _Message) -> None:
        started = time.perf_counter()
        try:
            await self._confirm(shard, message)
        except PublishFailed as exc:
            log.warning("publish to %s failed (%s): %s", shard.queue, exc.reason, exc.detail)
            _fail(message, exc)
            if exc.reason == "nack":
                self._renew_channel()
            if exc.reason in ("timeout", "disconnected"):
                # The broker is stalled or gone: the messages waiting behind this one would
                # go into the same hole, and their requests would time out after bytes had
                # left, so a client's retry could duplicate them. Fail them unsent instead.
                while shard.waiting:
                    _fail(shard.waiting.popleft(), exc)
        else:
            self._metrics.publish_seconds.observe(time.perf_counter() - started)
            self._metrics.message_entries.observe(message.entries)
            self._metrics.published_by_shard[shard.index].inc()
            message.done.set_result(None)
        finally:
            shard.inflight -= 1
            if shard.waiting:
                self._schedule_flush(shard)

    def _renew_channel(self) -> None:
        now = asyncio.get_running_loop().time()
        if self._renewing or now - self._renewed_at < RENEW_SECONDS:
            return
        self._renewed_at = now
        task = asyncio.create_task(self._renew(), name="publisher-renew-channel")
        self._renewing.add(task)
        task.add_done_callback(self._renewing.discard)

    async def _renew(self) -> None:
        conn, old = self._connection, self._channel
        if conn is None or old is None or not self.ready:
            return
        try:
            self._channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        except CONNECTIVITY_ERRORS as exc:
            log.warning("could not open a new confirm channel after a nack: %s", exc)
            return
        log.warning("publish nacked: publishing on a new confirm channel")
        await asyncio.sleep(self._timeout)  # the old one's confirms in flight
        with contextlib.suppress(*CONNECTIVITY_ERRORS):
            await old.close()

    async def _confirm(self, shard: _Shard, message: _Message) -> None:
        channel = self._channel
        if channel is None or not self.ready:
            raise PublishFailed("disconnected", "the broker is not connected")
        amqp_message = aio_pika.Message(
            message.body(),
            content_type="application/json",
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=uuid.uuid4().hex,
            headers={
                ENTRIES_HEADER: message.entries,
                PARTS_HEADER: ",".join(message.specs),
                ACCEPTED_HEADER: message.accepted,
            },
        )
        try:
            await channel.default_exchange.publish(
                amqp_message, routing_key=shard.queue, mandatory=True, timeout=self._timeout
            )
        except PublishError as exc:  # before DeliveryError: a subclass of it
            raise PublishFailed("returned", f"{shard.queue} is not routable: {exc}") from exc
        except DeliveryError as exc:
            raise PublishFailed("nack", f"{shard.queue} refused the message: {exc}") from exc
        except TimeoutError as exc:
            raise PublishFailed("timeout", f"no confirm within {self._timeout:g}s") from exc
        except CONNECTIVITY_ERRORS as exc:
            raise PublishFailed("disconnected", f"{type(exc).__name__}: {exc}") from exc


def _fail(message: _Message, exc: PublishFailed) -> None:
    if not message.done.done():
        message.done.set_exception(exc)
        message.done.exception()  # retrieved here: the waiters may all have gone


async def _all_done(futures: list[asyncio.Future[None]], timeout: float) -> bool:
    """Wait until every future is done (True) or `timeout` seconds pass (False); cancels
    none of them, since other requests share them. A lean `asyncio.wait`: this runs once per
    request."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bool] = loop.create_future()
    remaining = len(futures)

    def one_done(_: asyncio.Future[None]) -> None:
        nonlocal remaining
        remaining -= 1
        if not remaining and not waiter.done():
            waiter.set_result(True)

    for future in futures:
        future.add_done_callback(one_done)
    timer = loop.call_later(timeout, _expire, waiter)
    try:
        return await waiter
    finally:
        timer.cancel()
        for future in futures:
            future.remove_done_callback(one_done)


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
