"""The HTTP edge of the real app, served by uvicorn, with no broker reachable: everything
here must be answered without one (bad input never reaches the broker; the API starts and
answers probes before it connects)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from services.api.settings import ApiSettings
from tests.support.api import serve_api

NO_BROKER = "amqp://guest:guest@127.0.0.1:1/"
VALID = [{"timestamp": "2019-10-12T07:20:50.52Z", "value": "A"}]


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = ApiSettings(rabbitmq_url=NO_BROKER, max_body_bytes=4096, retry_after_seconds=3)
    async with serve_api(settings) as c:
        yield c


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe[]", "not valid UTF-8"),
        (b'{"timestamp": "2019-10-12T07:20:50Z"}', "must be a JSON array"),
        (b"42", "must be a JSON array"),
        (b"[]", "the array is empty"),
        (b"", "body is empty"),
    ],
)
async def test_bad_bodies_get_400_json(
    client: httpx.AsyncClient, content: bytes, error: str
) -> None:
    response = await client.post("/message", content=content)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert error in response.json()["error"]


async def test_bad_entry_400_names_index_and_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/message", json=[*VALID, {"timestamp": "2019-10-12T"}])
    assert response.status_code == 400
    document = response.json()
    assert document["errors"] == [
        {"index": 1, "field": "timestamp", "message": document["errors"][0]["message"]}
    ]
    assert document["error"].startswith("entry 1: timestamp: must be an RFC 3339")
    assert document["error_count"] == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\there", "caf\u00e9"])
async def test_a_bad_idempotency_key_is_400(client: httpx.AsyncClient, key: str) -> None:
    response = await client.post(
        "/message", json=VALID, headers=[(b"Idempotency-Key", key.encode("utf-8"))]
    )
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]


async def test_timestamp_that_names_no_instant_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/message", json=[{"timestamp": "2019-02-30T00:00:00Z"}])
    assert response.status_code == 400
    assert response.json()["errors"][0]["index"] == 0


async def test_valid_body_without_broker_is_503_with_retry_after_quickly(
    client: httpx.AsyncClient,
) -> None:
    started = time.monotonic()
    response = await client.post("/message", json=VALID)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert response.json()["reason"] == "disconnected"
    assert time.monotonic() - started < 1.0


async def test_declared_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    response = await client.post("/message", content=b"[" + b" " * 5000 + b"]")
    assert response.status_code == 413
    assert response.json() == {"error": "the body is larger than 4096 bytes", "limit_bytes": 4096}


async def test_streamed_oversized_body_is_413_before_it_ends(client: httpx.AsyncClient) -> None:
    """A chunked body with no length is refused as soon as it passes the limit: the answer
    comes while the client is still sending, so the server never reads it all."""
    port = client.base_url.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /message HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n"
    )
    answer = asyncio.create_task(reader.readuntil(b"\r\n\r\n"))
    chunk = b"[" + b" " * 1023
    sent = 0
    total = 64 * 1024 * 1024  # far more than any socket buffer could absorb
    try:
        while sent < total and not answer.done():
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            sent += len(chunk)
    except ConnectionError:
        pass  # the server closed the connection after answering: expected
    head = await asyncio.wait_for(answer, 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    assert sent < total


async def test_unknown_path_is_404_json(client: httpx.AsyncClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json() == {"error": "not found"}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_message_are_405_json(
    client: httpx.AsyncClient, method: str
) -> None:
    response = await client.request(method, "/message")
    assert response.status_code == 405
    assert response.json() == {"error": "method not allowed"}
    assert response.headers["allow"] == "POST"


async def test_probes_without_broker(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "not ready", "reason": "broker not connected"}


async def test_openapi_describes_the_real_schemas(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    post = document["paths"]["/message"]["post"]
    assert set(post["responses"]) == {"201", "400", "401", "408", "413", "503"}
    entry = document["components"]["schemas"]["Entry"]
    assert entry["required"] == ["timestamp"]
    assert entry["additionalProperties"] is False
    assert set(entry["properties"]) == {"timestamp", "value"}
    assert post["requestBody"]["content"]["application/json"]["schema"]["minItems"] == 1
    echo = post["responses"]["201"]["content"]["application/json"]["schema"]["items"]
    assert echo["required"] == ["timestamp", "value"]
    error = document["components"]["schemas"]["Error"]["properties"]
    assert {"error", "errors", "reason", "limit_bytes"} <= set(error)


@pytest.mark.parametrize(
    "key", ["!", "~" * 255, "retry-7f3a:2024/01", "", "x" * 256, "a b", "\x7f"]
)
async def test_openapi_idempotency_key_is_what_the_api_checks(
    client: httpx.AsyncClient, key: str
) -> None:
    document = (await client.get("/openapi.json")).json()
    (parameter,) = document["paths"]["/message"]["post"]["parameters"]
    assert (parameter["name"], parameter["in"], parameter["required"]) == (
        "Idempotency-Key",
        "header",
        False,
    )
    schema = parameter["schema"]
    documented = schema["minLength"] <= len(key) <= schema["maxLength"] and bool(
        re.fullmatch(schema["pattern"], key)
    )
    response = await client.post(
        "/message", json=VALID, headers=[(b"Idempotency-Key", key.encode("ascii"))]
    )
    # A valid key gets past the check to the (absent) broker: 503, never 400.
    assert response.status_code == (503 if documented else 400), response.text


async def test_metrics_count_requests_with_bounded_labels(client: httpx.AsyncClient) -> None:
    await client.post("/message", content=b"[]")
    await client.get("/random/path/123")
    await client.request("PROPFIND", "/message")
    text = (await client.get("/metrics")).text
    assert 'adp_api_requests_total{method="POST",route="/message",status="400"} 1.0' in text
    assert 'adp_api_requests_total{method="GET",route="other",status="404"} 1.0' in text
    assert 'adp_api_requests_total{method="other",route="/message",status="405"} 1.0' in text
    assert "/random/path" not in text
    assert "adp_api_broker_connected 0.0" in text


@pytest.fixture
async def guarded() -> AsyncIterator[httpx.AsyncClient]:
    settings = ApiSettings(rabbitmq_url=NO_BROKER, api_tokens="s3cret-token")
    async with serve_api(settings) as c:
        yield c


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic czNjcmV0LXRva2Vu"])
async def test_with_tokens_configured_a_request_without_a_valid_one_is_401(
    guarded: httpx.AsyncClient, authorization: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {"authorization": authorization} if authorization else {}
    response = await guarded.post("/message", json=VALID, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "bearer token" in response.json()["error"]
    assert "s3cret-token" not in caplog.text


async def test_a_valid_token_passes_and_probes_stay_open(guarded: httpx.AsyncClient) -> None:
    response = await guarded.post(
        "/message", json=VALID, headers={"authorization": "Bearer s3cret-token"}
    )
    assert response.status_code == 503  # past the check; no broker here
    assert (await guarded.get("/healthz")).status_code == 200
    assert (await guarded.get("/metrics")).status_code == 200
    assert (await guarded.get("/readyz")).status_code == 503


async def _start_slow_request(port: int, declared: int = 1000) -> asyncio.StreamWriter:
    """A client that sends its headers and a first piece of its body, then stalls."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /message HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n[" % declared)
    await writer.drain()
    return writer


async def test_a_body_slower_than_the_timeout_gets_408() -> None:
    settings = ApiSettings(rabbitmq_url=NO_BROKER, body_timeout_seconds=0.5)
    async with serve_api(settings) as client:
        port = client.base_url.port
        assert port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /message HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n[")
        await writer.drain()
        started = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert 0.4 <= time.monotonic() - started < 2.0


async def test_past_max_inflight_requests_the_answer_is_503_at_once() -> None:
    settings = ApiSettings(rabbitmq_url=NO_BROKER, max_inflight_requests=2, body_timeout_seconds=10)
    async with serve_api(settings) as client:
        port = client.base_url.port
        assert port is not None
        stalled = [await _start_slow_request(port) for _ in range(2)]
        await asyncio.sleep(0.2)  # both are inside the handler, waiting for their bodies
        response = await client.post("/message", json=VALID)
        for writer in stalled:
            writer.close()
    assert response.status_code == 503
    assert response.json()["reason"] == "overloaded"
    assert "retry-after" in response.headers
