"""Filling shard queues directly, as the API (arrays) or the Go original (one object) did."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection

from services.common.schema import Entry
from services.common.sharding import group_by_shard
from services.common.topology import Topology
from services.common.wire import PARTS_HEADER


def shard_of(timestamp: str, shards_count: int) -> int:
    """The shard of one timestamp, by the API's own path (`group_by_shard`)."""
    entry: Entry = {"timestamp": timestamp}
    (shard,) = group_by_shard([entry], shards_count)
    return shard


def entries(n: int, tag: str, start: int = 0) -> list[dict[str, Any]]:
    """n entries with distinct values; timestamps spread over the seconds of a minute."""
    return [
        {"timestamp": f"2019-10-12T07:20:{i % 60:02d}.52Z", "value": f"{tag}-{i}"}
        for i in range(start, start + n)
    ]


async def publish(
    connection: AbstractConnection,
    topo: Topology,
    items: list[dict[str, Any]],
    *,
    per_message: int = 1,
    single_objects: bool = False,
) -> None:
    """Publish entries to their shard queues: arrays of `per_message` entries, or one bare
    object per message (the Go original's format)."""
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for item in items:
        by_shard.setdefault(shard_of(item["timestamp"], topo.shards_count), []).append(item)
    step = 1 if single_objects else per_message
    async with connection.channel(publisher_confirms=True) as channel:
        await topo.declare(channel)
        sends = []
        for shard, group in by_shard.items():
            for i in range(0, len(group), step):
                chunk = group[i : i + step]
                body = json.dumps(chunk[0] if single_objects else chunk).encode()
                message = aio_pika.Message(
                    body,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=uuid.uuid4().hex,
                )
                sends.append(
                    channel.default_exchange.publish(message, routing_key=topo.queue_name(shard))
                )
        for i in range(0, len(sends), 500):  # confirms awaited 500 at a time
            await asyncio.gather(*sends[i : i + 500])


async def feed(
    connection: AbstractConnection,
    topo: Topology,
    total: int,
    tag: str,
    make: Callable[[int, str, int], list[dict[str, Any]]] = entries,
) -> None:
    """Publish `total` entries (`make(n, tag, start)`) in small steps, as a steady stream."""
    for start in range(0, total, 200):
        await publish(connection, topo, make(200, tag, start), per_message=2)
        await asyncio.sleep(0.05)


async def publish_parts(
    connection: AbstractConnection, topo: Topology, bodies: list[tuple[bytes, str]]
) -> None:
    """Publish each (body, parts spec) to shard 0's queue with the API's parts header, as
    the API does for the parts of a request."""
    async with connection.channel(publisher_confirms=True) as channel:
        await topo.declare(channel)
        for body, spec in bodies:
            await channel.default_exchange.publish(
                aio_pika.Message(body, message_id=uuid.uuid4().hex, headers={PARTS_HEADER: spec}),
                routing_key=topo.queue_name(0),
            )
