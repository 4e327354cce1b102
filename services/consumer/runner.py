"""Runs the consumer: the service plus its HTTP server, under one supervisor that owns
SIGTERM/SIGINT. The first signal starts the drain (bounded by SHUTDOWN_TIMEOUT_SECONDS);
a second one exits at once (unacked deliveries are redelivered by the broker, so nothing
is lost)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry

from services.common.http import embedded_server
from services.common.metrics import new_registry
from services.common.runtime import tune_gc
from services.consumer.app import create_app
from services.consumer.service import ConsumerService
from services.consumer.settings import ConsumerSettings
from services.consumer.sink import Sink

log = logging.getLogger(__name__)

FORCED_EXIT_CODE = 130


async def serve(
    settings: ConsumerSettings,
    stop: asyncio.Event,
    *,
    registry: CollectorRegistry | None = None,
    wrap_sink: Callable[[Sink], Sink] | None = None,
    started: Callable[[ConsumerService, int], Awaitable[None] | None] | None = None,
) -> None:
    """Run until `stop` is set, then drain. `started(service, http_port)` is called once
    both are up (tests use it to find the port)."""
    registry = registry if registry is not None else new_registry()
    async with ConsumerService(settings, registry, wrap_sink=wrap_sink) as service:
        server = embedded_server(
            create_app(service, registry), settings.metrics_host, settings.metrics_port
        )
        http = asyncio.create_task(server.serve(), name="consumer-http")
        try:
            # uvicorn offers a flag, not an event, for "listening".
            while not server.started and not http.done():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            if http.done():
                await http  # surfaces why it could not start (port taken, ...)
            port = server.servers[0].sockets[0].getsockname()[1]
            if started is not None:
                result = started(service, port)
                if result is not None:
                    await result
            await stop.wait()
        finally:
            server.should_exit = True
            await http


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(FORCED_EXIT_CODE)
        log.info("%s: draining", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


def run(settings: ConsumerSettings) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        tune_gc()
        await serve(settings, stop)

    import uvloop

    uvloop.run(main())
    exit_now()


def exit_now() -> None:
    """Leave once the drain is over. The interpreter's own exit would join the write
    threads, and one stuck on a hung disk would hold the process past its grace period;
    what such a thread holds was never acked, so leaving now loses nothing."""
    logging.shutdown()
    os._exit(0)
