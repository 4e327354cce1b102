"""Runs the API under uvicorn.

On SIGTERM/SIGINT: stop accepting, let in-flight requests finish (bounded by
SHUTDOWN_TIMEOUT_SECONDS), then the lifespan closes the broker connection, and the process
exits 0. A second signal forces the exit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from services.api.app import create_app
from services.api.connections import connection_limit, guarded_protocol
from services.api.settings import ApiSettings
from services.common.runtime import tune_gc

log = logging.getLogger(__name__)


class Server(uvicorn.Server):
    """uvicorn re-raises the signal after its drain, so a clean shutdown would still end as
    "killed by SIGTERM" (exit 143). Here the handler only sets a flag: a clean drain exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
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


def uvicorn_config(
    settings: ApiSettings,
    *,
    app: ASGIApp | None = None,
    host: str | None = None,
    port: int | None = None,
) -> uvicorn.Config:
    """How the API is served (`app`, `host`, `port`: overrides, for tests and `dev`)."""
    return uvicorn.Config(
        app or create_app(settings),
        host=settings.host if host is None else host,
        port=settings.port if port is None else port,
        http=guarded_protocol(
            settings.headers_timeout_seconds, connection_limit(settings.max_connections)
        ),
        lifespan="on",
        log_config=None,  # the CLI's logging configuration applies
        access_log=settings.access_log,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_seconds),
    )


def run(settings: ApiSettings) -> None:
    log.info(
        "starting API on %s:%d (broker %s, %d shards)",
        settings.host,
        settings.port,
        settings.rabbitmq_url_redacted,
        settings.shards_count,
    )
    config = uvicorn_config(settings)
    config.load()
    tune_gc()
    Server(config).run()
    log.info("API stopped")
