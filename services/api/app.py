"""The ingestion API as an ASGI application.

POST /message goes straight to `ingest.Ingest` (the hot path, with its own error edge);
everything else (probes, /metrics, /openapi.json, JSON 404s) is a small Starlette app, which
also owns the lifespan: the broker connection and the publisher live there and reach the
handlers through the lifespan state, never through module globals or `app.state`.
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
from starlette.types import ASGIApp, Receive, Scope, Send

from services.api.auth import TokenCheck
from services.api.ingest import PATH, Ingest
from services.api.metrics import ApiMetrics
from services.api.middleware import RequestMetrics
from services.api.openapi import openapi_document
from services.api.publisher import GroupCommitPublisher, Publisher
from services.api.settings import ApiSettings
from services.common.broker import Broker, BrokerMetrics
from services.common.http import http_error, probe_routes
from services.common.metrics import new_registry
from services.common.topology import Topology

log = logging.getLogger(__name__)


class ApiApp:
    """Dispatches /message to the ingest handler and the rest to Starlette."""

    def __init__(self, ingest: ASGIApp, rest: Starlette) -> None:
        self.ingest = ingest
        self.rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PATH:
            await self.ingest(scope, receive, send)
        else:
            await self.rest(scope, receive, send)


def create_app(
    settings: ApiSettings,
    *,
    registry: CollectorRegistry | None = None,
    publisher: Publisher | None = None,
) -> ApiApp:
    """The API. `publisher` is a seam for tests; by default a `GroupCommitPublisher` on a
    broker connection opened in the background at start-up."""
    registry = registry if registry is not None else new_registry()
    metrics = ApiMetrics(registry, settings.shards_count)
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
        async with Broker.from_settings(
            settings,
            name="adp-api",
            setup=own.attach,
            metrics=BrokerMetrics(registry, "adp_api"),
        ):
            yield {"publisher": own}
            # uvicorn has drained the requests; what is left are sends nobody awaits.
            await own.close(timeout=settings.publish_timeout_seconds)

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def openapi(_: Request) -> Response:
        return JSONResponse(document)

    def not_ready(request: Request) -> str | None:
        return None if request.state.publisher.ready else "broker not connected"

    async def internal(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse({"error": "internal error"}, status_code=500)

    rest = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            *probe_routes(registry, not_ready),
        ],
        middleware=[Middleware(RequestMetrics, metrics=metrics)],
        exception_handlers={HTTPException: http_error, Exception: internal},
        lifespan=lifespan,
    )
    ingest = Ingest(
        metrics,
        shards_count=settings.shards_count,
        max_body_bytes=settings.max_body_bytes,
        retry_after=settings.retry_after_seconds,
        body_timeout=settings.body_timeout_seconds,
        max_inflight=settings.max_inflight_requests,
        tokens=TokenCheck.from_settings(settings),
    )
    return ApiApp(ingest, rest)
