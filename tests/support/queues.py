"""Looking into the shard queues from a test."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from services.common.topology import Topology


async def drain(connection: AbstractConnection, queue: str) -> list[AbstractIncomingMessage]:
    """Every message now in `queue`, taken off it."""
    messages = []
    async with connection.channel() as channel:
        q = await channel.declare_queue(queue, passive=True)
        while (message := await q.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
    return messages


async def drain_entries(connection: AbstractConnection, topo: Topology) -> dict[int, list[Any]]:
    """Entries per shard, across every message of the topology's queues."""
    found: dict[int, list[Any]] = {}
    for shard, name in enumerate(topo.queue_names):
        for message in await drain(connection, name):
            found.setdefault(shard, []).extend(json.loads(message.body))
    return found


async def depth(connection: AbstractConnection, queue: str) -> int:
    """Ready messages in `queue` (passive declare)."""
    async with connection.channel() as channel:
        q = await channel.declare_queue(queue, passive=True)
        return q.declaration_result.message_count or 0


async def drained(connection: AbstractConnection, topo: Topology) -> bool:
    """No ready message in any of the topology's queues."""
    return all([await depth(connection, name) == 0 for name in topo.queue_names])


async def queue_counts() -> dict[str, tuple[int, int]]:
    """Every queue's (ready, unacked) messages, from rabbitmqctl: the AMQP API cannot tell
    unacked ones, and this needs no connection of the test's own (which a test may lose)."""
    out = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged"],
        capture_output=True,
        text=True,
        check=True,
    )
    counts = {}
    for line in out.stdout.splitlines():
        name, ready, unacked = line.split("\t")
        if ready.isdigit() and unacked.isdigit():  # not the header row
            counts[name] = (int(ready), int(unacked))
    return counts
