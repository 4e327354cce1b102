"""The ingestion API as a Starlette application.

Resources (broker connection, publisher) live in the `lifespan` context and reach the
endpoints through the lifespan state. Errors are translated to statuses once, by the
exception handlers at the bottom.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ExceptionHandler

from services.api.errors import BodyTooLarge, PublishFailed
from services.api.metrics import ApiMetrics
from services.api.middleware import RequestMetrics
from services.api.openapi import openapi_document
from services.api.publisher import GroupCommitPublisher, Publisher
from services.api.settings import ApiSettings
from services.common.broker import Broker
from services.common.http import http_error, probe_routes
from services.common.metrics import new_registry
from services.common.schema import InvalidEntries, dump_entries, parse_entries
from services.common.sharding import group_by_shard
from services.common.topology import Topology

log = logging.getLogger(__name__)

JSON = "application/json"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) past `limit` bytes without reading the rest: a declared
    Content-Length is checked before any byte is read, a chunked body as it streams."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def create_app(
    settings: ApiSettings,
    *,
    registry: CollectorRegistry | None = None,
    publisher: Publisher | None = None,
) -> Starlette:
    """The API. `publisher` is a seam for tests; by default a `GroupCommitPublisher` on a
    broker connection opened in the background at start-up."""
    registry = registry if registry is not None else new_registry()
    metrics = ApiMetrics(registry, settings.shards_count)
    shards_count = settings.shards_count
    limit = settings.max_body_bytes
    document = openapi_document(version("async-data-processor"))

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[dict[str, Any]]:
        if publisher is not None:
            yield {"publisher": publisher}
            return
        own = GroupCommitPublisher(
            Topology.from_settings(settings),
            metrics,
            timeout=settings.publish_timeout_seconds,
            max_inflight=settings.publish_max_inflight,
            max_message_bytes=settings.publish_max_message_bytes,
        )
        metrics.broker_connected.set_function(lambda: float(own.ready))
        async with Broker(
            settings.rabbitmq_url,
            name="adp-api",
            setup=own.attach,
            connect_timeout=settings.broker_connect_timeout_seconds,
            retry_max_seconds=settings.broker_retry_max_seconds,
            redacted_url=settings.rabbitmq_url_redacted,
        ):
            yield {"publisher": own}
            # uvicorn has drained the requests; what is left are sends nobody awaits.
            await own.close(timeout=settings.publish_timeout_seconds)

    async def post_message(request: Request) -> Response:
        the_publisher: Publisher = request.state.publisher
        body = await read_body(request, limit)
        entries = parse_entries(body)
        groups = group_by_shard(entries, shards_count)
        await the_publisher.publish(groups)
        for shard, group in groups.items():
            metrics.accepted_by_shard[shard].inc(len(group))
        return Response(dump_entries(entries), status_code=201, media_type=JSON)

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def openapi(_: Request) -> Response:
        return JSONResponse(document)

    def not_ready(request: Request) -> str | None:
        return None if request.state.publisher.ready else "broker not connected"

    return Starlette(
        routes=[
            Route("/message", post_message, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            *probe_routes(registry, not_ready),
        ],
        middleware=[Middleware(RequestMetrics, metrics=metrics)],
        exception_handlers=_error_handlers(settings.retry_after_seconds),
        lifespan=lifespan,
    )


def _error_handlers(retry_after: int) -> dict[Any, ExceptionHandler]:
    """The one place where errors become statuses."""

    async def invalid_entries(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, InvalidEntries)
        content: dict[str, Any] = {"error": str(exc)}
        if exc.errors and exc.errors[0].index is not None:
            content["errors"] = [error.as_dict() for error in exc.errors]
            content["error_count"] = exc.total
        return JSONResponse(content, status_code=400)

    async def too_large(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, BodyTooLarge)
        # The unread rest of the body makes keeping the connection unsafe: close it.
        return JSONResponse(
            {"error": str(exc), "limit_bytes": exc.limit},
            status_code=413,
            headers={"Connection": "close"},
        )

    async def unavailable(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, PublishFailed)
        return JSONResponse(
            {
                "error": f"the broker did not take the entries ({exc.reason}); retry later",
                "reason": exc.reason,
            },
            status_code=503,
            headers={"Retry-After": str(retry_after)},
        )

    async def internal(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse({"error": "internal error"}, status_code=500)

    return {
        InvalidEntries: invalid_entries,
        BodyTooLarge: too_large,
        PublishFailed: unavailable,
        HTTPException: http_error,
        Exception: internal,
    }
