"""POST /message as a plain ASGI application: the hot path.

It owns the /message path outright (any other method gets a JSON 405), so requests skip the
Starlette router and middleware stack; it counts its own request metrics. It is also the one
edge where ingestion errors become statuses: no valid bearer token (when tokens are
configured) → 401, `InvalidEntries` → 400, a body slower than BODY_TIMEOUT_SECONDS → 408,
`BodyTooLarge` → 413, `PublishFailed` or more than MAX_INFLIGHT_REQUESTS at once → 503 with
Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from starlette.types import Receive, Scope, Send

from services.api.auth import TokenCheck
from services.api.errors import BodyTooLarge, ClientDisconnected, PublishFailed
from services.api.metrics import ApiMetrics
from services.api.publisher import Publisher
from services.common.schema import EntryError, InvalidEntries, dump_entries, parse_entries
from services.common.sharding import group_by_shard
from services.common.wire import IDEMPOTENCY_KEY_MAX_LENGTH, request_key

log = logging.getLogger(__name__)

PATH = "/message"
_JSON = (b"content-type", b"application/json")
_VISIBLE = re.compile(rb"[\x21-\x7e]+")
Headers = Sequence[tuple[bytes, bytes]]


class Ingest:
    def __init__(
        self,
        metrics: ApiMetrics,
        *,
        shards_count: int,
        max_body_bytes: int,
        retry_after: int,
        body_timeout: float = 10.0,
        max_inflight: int = 1000,
        tokens: TokenCheck | None = None,
    ) -> None:
        self._metrics = metrics
        self._shards_count = shards_count
        self._limit = max_body_bytes
        self._retry_after = str(retry_after).encode()
        self._accepted = metrics.accepted_by_shard
        self._tokens = tokens
        self._body_timeout = body_timeout
        self._max_inflight = max_inflight
        self._inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method = scope["method"]
        if method != "POST":
            status = 405
            await _respond(send, 405, {"error": "method not allowed"}, [(b"allow", b"POST")])
        elif self._tokens is not None and not self._tokens.allows(scope["headers"]):
            status = 401
            # The body is left unread: close the connection after the answer.
            await _respond(
                send,
                401,
                {"error": "a valid bearer token is required (Authorization: Bearer <token>)"},
                [
                    (b"www-authenticate", b'Bearer realm="async-data-processor"'),
                    (b"connection", b"close"),
                ],
            )
        elif self._inflight >= self._max_inflight:
            status = 503
            content = {"error": "too many requests in flight; retry later", "reason": "overloaded"}
            await _respond(send, 503, content, [(b"retry-after", self._retry_after)])
        else:
            self._inflight += 1
            try:
                status = await self._ingest(scope, receive, send)
            except ClientDisconnected:
                status = 499  # nginx's word for it; nothing was published
            except Exception:
                log.exception("unhandled error in POST %s", PATH)
                status = 500
                await _respond(send, 500, {"error": "internal error"})
            finally:
                self._inflight -= 1
        self._metrics.observe_request(PATH, method, status, time.perf_counter() - started)

    async def _ingest(self, scope: Scope, receive: Receive, send: Send) -> int:
        publisher: Publisher = scope["state"]["publisher"]
        try:
            async with asyncio.timeout(self._body_timeout):
                body = await self._read_body(scope, receive)
            key = _idempotency_key(scope["headers"])
            entries = parse_entries(body)
            groups = group_by_shard(entries, self._shards_count)
            echo = dump_entries(entries)
            await publisher.publish(groups, request_key(key, echo) if key else None)
        except InvalidEntries as exc:
            await _respond(send, 400, _invalid(exc))
            return 400
        except BodyTooLarge as exc:
            # The unread rest of the body makes the connection unusable: close it.
            content = {"error": str(exc), "limit_bytes": exc.limit}
            await _respond(send, 413, content, [(b"connection", b"close")])
            return 413
        except TimeoutError:  # only the body read is bounded here; publish has its own
            content = {"error": f"the body did not arrive within {self._body_timeout:g}s"}
            await _respond(send, 408, content, [(b"connection", b"close")])
            return 408
        except PublishFailed as exc:
            content = {
                "error": f"the broker did not take the entries ({exc.reason}); retry later",
                "reason": exc.reason,
            }
            await _respond(send, 503, content, [(b"retry-after", self._retry_after)])
            return 503
        for shard, group in groups.items():
            self._accepted[shard].inc(len(group))
        await _send(send, 201, echo, ())
        return 201

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The body, refusing past the limit without reading the rest: a declared
        Content-Length is checked before any byte is read, a chunked body as it streams."""
        limit = self._limit
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise BodyTooLarge(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _idempotency_key(headers: Headers) -> bytes | None:
    """The request's Idempotency-Key: 1..255 visible ASCII characters, or absent."""
    for name, value in headers:
        if name == b"idempotency-key":
            if not 0 < len(value) <= IDEMPOTENCY_KEY_MAX_LENGTH or not _VISIBLE.fullmatch(value):
                raise InvalidEntries(
                    [
                        EntryError(
                            "the Idempotency-Key header must be 1 to "
                            f"{IDEMPOTENCY_KEY_MAX_LENGTH} visible ASCII characters"
                        )
                    ]
                )
            return value
    return None


def _invalid(exc: InvalidEntries) -> dict[str, Any]:
    content: dict[str, Any] = {"error": str(exc)}
    if exc.errors and exc.errors[0].index is not None:
        content["errors"] = [error.as_dict() for error in exc.errors]
        content["error_count"] = exc.total
    return content


async def _respond(send: Send, status: int, content: dict[str, Any], headers: Headers = ()) -> None:
    await _send(send, status, json.dumps(content, separators=(",", ":")).encode(), headers)


async def _send(send: Send, status: int, body: bytes, headers: Headers) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
