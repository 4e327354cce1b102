"""Runs the API under uvicorn.

On SIGTERM/SIGINT: stop accepting, let in-flight requests finish (bounded by
SHUTDOWN_TIMEOUT_SECONDS), then the lifespan closes the broker connection, and the process
exits 0. A second signal forces the exit.
"""

from __future__ import annotations

import logging
import math

import uvicorn
from starlette.types import ASGIApp

from services.api.app import create_app
from services.api.connections import connection_limit, guarded_protocol
from services.api.settings import ApiSettings
from services.common.http import Server
from services.common.runtime import tune_gc

log = logging.getLogger(__name__)


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
    Server(config, signals=True).run()
    log.info("API stopped")
