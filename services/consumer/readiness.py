"""Readiness (`GET /readyz`): the consumer is ready when, all at once,

- the broker is connected and the set-up has consumed every shard;
- every consumer channel is open;
- every shard's queue has a consumer (a restored connection that came back without its
  consumers, a known aio-pika failure, shows as a queue with none, from the autoscaler's
  last reading);
- the output directory is writable: the sink's own check passes (`Directory`, every
  DIRECTORY_CHECK_SECONDS) and no pool's last write failed or hung.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from services.common.broker import Broker
from services.consumer.autoscaler import BrokerDepthProbe
from services.consumer.intake import Intake
from services.consumer.pool import Pool
from services.consumer.settings import ConsumerSettings
from services.consumer.sink import Sink

log = logging.getLogger(__name__)

DIRECTORY_CHECK_SECONDS = 5.0


class Directory:
    """Whether the output (a directory, or the object store) is writable, from the sink's
    check."""

    def __init__(self, sink: Sink, destination: str) -> None:
        self._sink = sink
        self._destination = destination
        self.writable = True

    async def watch(self) -> None:
        while True:
            try:
                await self._sink.check()
            except OSError as exc:
                if self.writable:
                    log.warning("output %s not writable: %s", self._destination, exc)
                self.writable = False
            else:
                self.writable = True
            await asyncio.sleep(DIRECTORY_CHECK_SECONDS)


@dataclass(frozen=True)
class Readiness:
    broker: Broker
    intake: Intake
    probe: BrokerDepthProbe
    pools: list[Pool]
    directory: Directory
    settings: ConsumerSettings

    def not_ready(self) -> str | None:
        """None when ready, else the first reason it is not."""
        if not self.broker.connected or not self.intake.consumers:
            return "broker not connected"
        if any(channel.is_closed for channel in self.intake.channels):
            return "a consumer channel is closed"
        idle = [shard for shard, count in self.probe.consumers.items() if count == 0]
        if idle:
            return f"no consumer on shard(s) {idle}"
        if not self.directory.writable or not all(pool.write_ok for pool in self.pools):
            return (
                f"output {self.settings.output_url or self.settings.data_output_dir} not writable"
            )
        return None
