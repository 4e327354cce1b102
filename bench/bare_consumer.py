"""The ceiling for the consumer benchmark: a bare aio-pika consumer that parses every
message (as the consumer does) and acks it, writing nothing. Exits when it has seen
`expected` messages, printing the seconds from connected to done.

Run: python -m bench.bare_consumer URL PREFIX SHARDS PREFETCH EXPECTED
"""

from __future__ import annotations

import asyncio
import sys
import time

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from services.common.schema import parse_message


async def main(url: str, prefix: str, shards: int, prefetch: int, expected: int) -> None:
    done = asyncio.Event()
    seen = 0

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal seen
        parse_message(message.body)
        await message.ack()
        seen += 1
        if seen >= expected:
            done.set()

    connection = await aio_pika.connect_robust(url)
    async with connection:
        started = time.monotonic()  # connected: from here on, as the consumer is timed
        for shard in range(shards):
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.declare_queue(f"{prefix}{shard}", durable=True)
            await queue.consume(on_message)
        await done.wait()
        print(time.monotonic() - started)


if __name__ == "__main__":
    url, prefix, shards, prefetch, expected = sys.argv[1:6]
    import uvloop

    uvloop.run(main(url, prefix, int(shards), int(prefetch), int(expected)))
