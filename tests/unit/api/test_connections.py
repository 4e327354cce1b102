"""Slow, idle and too many connections, against the real app served by uvicorn with the
API's own connection guard (no broker needed): none of them can hold the API, and a
well-behaved client is served meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from services.api.connections import connection_limit
from services.api.settings import ApiSettings
from tests.support.api import serve_api

NO_BROKER = "amqp://guest:guest@127.0.0.1:1/"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = ApiSettings(rabbitmq_url=NO_BROKER, headers_timeout_seconds=0.5, max_connections=20)
    async with serve_api(settings) as c:
        yield c


async def open_connection(
    client: httpx.AsyncClient,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", client.base_url.port)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True if the server closes the connection (EOF) within `seconds`."""
    try:
        while await asyncio.wait_for(reader.read(1024), seconds):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /message HTTP/1.1\r\nHost: x\r\n", b"G"],
    ids=["idle", "partial-headers", "one-byte"],
)
async def test_a_connection_without_complete_headers_is_closed(
    client: httpx.AsyncClient, sent: bytes
) -> None:
    reader, writer = await open_connection(client)
    writer.write(sent)
    started = time.monotonic()
    assert (await client.get("/healthz")).status_code == 200  # others are served
    assert await closed_within(reader, 3)
    assert time.monotonic() - started < 2.5
    writer.close()


async def test_after_a_response_a_trickling_next_request_is_closed(
    client: httpx.AsyncClient,
) -> None:
    """uvicorn's keep-alive timer stops at the first byte of the next request; the guard's
    does not."""
    reader, writer = await open_connection(client)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    response = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), 3)
    assert b"200" in response.split(b"\r\n")[0]
    writer.write(b"GET /hea")  # then nothing more
    assert await closed_within(reader, 3)
    writer.close()


async def test_past_max_connections_new_ones_are_closed_and_the_rest_served(
    client: httpx.AsyncClient,
) -> None:
    held = [await open_connection(client) for _ in range(25)]
    closed = [await closed_within(reader, 0.2) for reader, _ in held[20:]]
    assert all(closed)  # beyond the cap (the test client's own connection counts too)
    for _, writer in held:
        writer.close()
    async with httpx.AsyncClient(base_url=str(client.base_url)) as fresh:
        assert (await fresh.get("/healthz")).status_code == 200


def test_the_default_limit_follows_the_open_files_limit() -> None:
    assert connection_limit(500) == 500
    assert 100 <= connection_limit(0) <= 10_000
