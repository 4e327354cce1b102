"""Runs the API under uvicorn. uvicorn owns SIGTERM/SIGINT here: it stops accepting,
lets in-flight requests finish (bounded by SHUTDOWN_TIMEOUT_SECONDS), then the lifespan
closes the broker connection."""

from __future__ import annotations

import logging

import uvicorn

from services.api.app import create_app
from services.api.settings import ApiSettings

log = logging.getLogger(__name__)


def uvicorn_config(settings: ApiSettings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_config=None,  # the CLI's logging configuration applies
        access_log=settings.access_log,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_seconds),
    )


def run(settings: ApiSettings) -> None:
    log.info(
        "starting API on %s:%d (broker %s, %d shards)",
        settings.host,
        settings.port,
        settings.rabbitmq_url_redacted,
        settings.shards_count,
    )
    uvicorn.Server(uvicorn_config(settings)).run()
