"""Queue topology, declared from one small declarative object.

One durable queue per shard, `<prefix><n>`, on the default exchange (routing key = queue
name). Declaring is idempotent; a queue that exists with other arguments makes the broker
refuse (PRECONDITION_FAILED), which start-up reports as a configuration error.
"""

from __future__ import annotations

from dataclasses import dataclass

from aio_pika.abc import AbstractChannel, AbstractQueue
from pamqp.common import Arguments

from services.common.settings import BrokerSettings


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str
    shards_count: int
    max_length: int = 0  # messages per queue; 0 = unbounded

    @classmethod
    def from_settings(cls, settings: BrokerSettings) -> Topology:
        return cls(settings.queue_prefix, settings.shards_count, settings.queue_max_length)

    def queue_name(self, shard: int) -> str:
        if not 0 <= shard < self.shards_count:
            raise ValueError(f"shard {shard} outside 0..{self.shards_count - 1}")
        return f"{self.prefix}{shard}"

    @property
    def queue_names(self) -> list[str]:
        return [self.queue_name(shard) for shard in range(self.shards_count)]

    @property
    def queue_arguments(self) -> Arguments:
        if not self.max_length:
            return {}
        # reject-publish: a full queue nacks the publish, so the API can answer 503
        # instead of the broker silently dropping the oldest messages.
        return {"x-max-length": self.max_length, "x-overflow": "reject-publish"}

    async def declare(self, channel: AbstractChannel) -> list[AbstractQueue]:
        """Declare every shard queue (durable), in shard order."""
        return [await self.declare_one(channel, shard) for shard in range(self.shards_count)]

    async def declare_one(self, channel: AbstractChannel, shard: int) -> AbstractQueue:
        return await channel.declare_queue(
            self.queue_name(shard), durable=True, arguments=self.queue_arguments
        )
