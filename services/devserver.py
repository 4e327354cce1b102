"""`async-data-processor dev`: the API and the consumer in one process, for a laptop.

The consumer's supervisor owns SIGTERM/SIGINT; on the first signal the API stops taking
requests and finishes those in flight, then the consumer drains. Each keeps its own port
and metrics (PORT, METRICS_PORT)."""

from __future__ import annotations

import asyncio
import logging

from services.api.server import uvicorn_config
from services.api.settings import ApiSettings
from services.common.http import Server
from services.common.runtime import tune_gc
from services.consumer.runner import exit_now, install_signal_handlers, serve
from services.consumer.settings import ConsumerSettings

log = logging.getLogger(__name__)


def run(api: ApiSettings, consumer: ConsumerSettings) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        api_server = Server(uvicorn_config(api))  # as `server` serves it
        api_task = asyncio.create_task(api_server.serve(), name="api")
        consumer_stop = asyncio.Event()

        async def stop_api_then_consumer() -> None:
            # The API stops first, so every entry it accepted is in the queues; then the
            # consumer drains what it has received (the rest waits in the queues).
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({stopping, api_task}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            api_server.should_exit = True
            try:
                await api_task  # raises if the API could not start (port taken, ...)
            finally:
                consumer_stop.set()

        tune_gc()
        log.info(
            "dev: API on %s:%d, consumer metrics on port %d",
            api.host,
            api.port,
            consumer.metrics_port,
        )
        await asyncio.gather(serve(consumer, consumer_stop), stop_api_then_consumer())

    import uvloop

    uvloop.run(main())
    exit_now()
