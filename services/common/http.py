"""HTTP pieces both services serve: probes, /metrics, JSON errors for unknown paths.

Errors are translated once, at the edge: every `HTTPException` Starlette raises (404, 405)
becomes the contract's `{"error": ...}` document.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import uvicorn
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from services.common.metrics import exposition

# Returns None when ready, else why not (a short phrase for the probe's body and logs).
ReadinessCheck = Callable[[Request], str | None]


def probe_routes(registry: CollectorRegistry, not_ready: ReadinessCheck) -> list[Route]:
    """/healthz (the process answers), /readyz (it can do its job), /metrics."""

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        reason = not_ready(request)
        if reason is None:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    async def metrics(_: Request) -> Response:
        body, content_type = exposition(registry)
        return Response(body, media_type=content_type)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]


async def http_error(_: Request, exc: Exception) -> Response:
    """Starlette's own HTTP errors (404, 405, ...) as JSON."""
    assert isinstance(exc, HTTPException)
    messages = {404: "not found", 405: "method not allowed"}
    return JSONResponse(
        {"error": messages.get(exc.status_code, exc.detail)},
        status_code=exc.status_code,
        headers=exc.headers,
    )


class EmbeddedServer(uvicorn.Server):
    """uvicorn serving inside a process whose own supervisor owns SIGTERM/SIGINT: it
    installs no signal handlers and stops when `should_exit` is set."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def embedded_server(app: ASGIApp, host: str, port: int, *, lifespan: str = "off") -> EmbeddedServer:
    return EmbeddedServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan=lifespan,  # type: ignore[arg-type]
            log_config=None,
            access_log=False,
            server_header=False,
        )
    )
