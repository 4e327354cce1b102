"""A small HTTP/1.1 load client for the benchmarks (keep-alive connections, no library in
the way): POST /message bodies, all at once or at a fixed rate, noting when each got its
201."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable


def request_body(number: int, entries: int, tag: str) -> bytes:
    """`entries` entries, one per shard in turn (timestamps a second apart), with values
    naming the request, so the files they land in can be traced back to it."""
    return json.dumps(
        [
            {"timestamp": f"2019-10-12T07:20:{i % 60:02d}.52Z", "value": f"{tag}{number}-{i}"}
            for i in range(entries)
        ],
        separators=(",", ":"),
    ).encode()


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> int:
    writer.write(
        b"POST /message HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return int(status_line.split()[1])


async def post_all(
    port: int,
    count: int,
    body: Callable[[int], bytes],
    *,
    connections: int = 32,
    rate: float | None = None,
    sent: dict[int, float] | None = None,
) -> dict[int, float]:
    """Send requests 0..count-1 (`rate` per second if given, else as fast as the server
    answers); returns, per request answered 201, the monotonic time of the answer (and,
    into `sent` if given, the time each request was sent)."""
    accepted: dict[int, float] = {}
    numbers = iter(range(count))
    started = time.monotonic()

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for number in numbers:
                if rate is not None:
                    delay = started + number / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if sent is not None:
                    sent[number] = time.monotonic()
                if await _post(reader, writer, body(number)) == 201:
                    accepted[number] = time.monotonic()
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return accepted
