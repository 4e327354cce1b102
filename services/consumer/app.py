"""The consumer's HTTP side (METRICS_PORT): /metrics, /healthz, /readyz, /workers (the
history) and /pools (each shard's pool state, read by the operator)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.common.http import http_error, probe_routes
from services.consumer.service import ConsumerService


def create_app(service: ConsumerService, registry: CollectorRegistry) -> Starlette:
    async def workers(_: Request) -> Response:
        rows = [record.as_dict() for record in service.history.records()]
        return JSONResponse({"workers": rows})

    async def pools(_: Request) -> Response:
        return JSONResponse({"pools": service.pools_state()})

    return Starlette(
        routes=[
            *probe_routes(registry, lambda _: service.not_ready()),
            Route("/workers", workers, methods=["GET"]),
            Route("/pools", pools, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
