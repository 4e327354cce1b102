"""HTTP pieces both services serve: probes, /metrics, JSON errors for unknown paths.

Errors are translated once, at the edge: every `HTTPException` Starlette raises (404, 405)
becomes the contract's `{"error": ...}` document.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

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


class Server(uvicorn.Server):
    """The one uvicorn server of both services.

    uvicorn's own handlers re-raise the signal after the drain, so a clean shutdown would
    still end as "killed by SIGTERM" (exit 143). With `signals=True` (the API on its own)
    the handlers only set a flag: a clean drain exits 0, a second signal forces the exit.
    With `signals=False` (embedded in a process whose supervisor owns SIGTERM/SIGINT: the
    consumer, `dev`) it installs none and stops when `should_exit` is set."""

    def __init__(self, config: uvicorn.Config, *, signals: bool = False) -> None:
        super().__init__(config)
        self._signals = signals

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if not self._signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def embedded_server(app: ASGIApp, host: str, port: int, *, lifespan: str = "off") -> Server:
    """A small server for probes and metrics, inside a process that owns its signals."""
    return Server(
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
