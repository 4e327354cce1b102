"""Property-based fuzzing of POST /message (hypothesis), on the real app served by a real
uvicorn (in a thread), with no broker: whatever the body, the answer is never a 5xx other
than the designed 503 for a valid body, and every 4xx is the contract's JSON error."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.api.app import create_app
from services.api.settings import ApiSettings
from services.common.metrics import new_registry
from tests.support.net import free_port

NO_BROKER = "amqp://guest:guest@127.0.0.1:1/"
FUZZ = settings(
    max_examples=700,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    port = free_port()
    config = uvicorn.Config(
        create_app(
            ApiSettings(rabbitmq_url=NO_BROKER, max_body_bytes=16384),
            registry=new_registry(process=False),
        ),
        host="127.0.0.1",
        port=port,
        lifespan="on",
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        yield http
    server.should_exit = True
    thread.join(20)


def check(response: httpx.Response) -> None:
    assert response.status_code in {400, 413, 503}, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    document: dict[str, Any] = response.json()
    assert isinstance(document.get("error"), str)
    assert document["error"]
    if response.status_code == 503:  # only a valid body reaches the (absent) broker
        assert document["reason"] == "disconnected"
        assert "retry-after" in response.headers


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)
timestamps = st.one_of(
    st.text(max_size=40),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z\Z"),
)
entries = st.lists(
    st.dictionaries(
        st.sampled_from(["timestamp", "value", "valeu", ""]) | st.text(max_size=5),
        timestamps | json_values,
        max_size=3,
    )
    | json_values,
    max_size=8,
)


@FUZZ
@given(body=st.binary(max_size=2048))
def test_any_bytes(client: httpx.Client, body: bytes) -> None:
    check(client.post("/message", content=body))


@FUZZ
@given(value=json_values)
def test_any_json(client: httpx.Client, value: Any) -> None:
    check(client.post("/message", content=json.dumps(value).encode()))


@FUZZ
@given(value=entries)
def test_entry_shaped_json(client: httpx.Client, value: Any) -> None:
    check(client.post("/message", content=json.dumps(value).encode()))


def test_an_oversized_body_is_413_json(client: httpx.Client) -> None:
    check(client.post("/message", content=b"[" + b" " * 20000 + b"]"))
