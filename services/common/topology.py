"""Queue topology, declared from one small declarative object.

One durable queue per shard, `<prefix><n>`, on the default exchange (routing key = queue
name). Classic queues by default (the Go original's kind, so its queues drain); quorum
queues on request, with a delivery limit: a message redelivered that many times goes to the
dead-letter queue `<prefix>dead` instead of looping. The consumer moves poison messages
(no valid entries) to the same queue, for either type. Declaring is idempotent; a queue that
exists with other arguments makes the broker refuse (PRECONDITION_FAILED), which start-up
reports as a configuration error.

On a cluster, quorum queues are replicated: each on three nodes (the broker's default group
size, `quorum_cluster_size`, 3 on RabbitMQ 3.10 and 4.x alike; fewer on a smaller cluster),
and their leaders spread over the nodes (`x-queue-leader-locator: balanced`, understood by
3.10 and 4.x; without it a leader lands on the node the declaring client is connected to,
so every shard would lead on one node). The dead-letter queue is then a quorum queue too,
so a dead-lettered message survives the loss of a node as well as the shard it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aio_pika.abc import AbstractChannel, AbstractQueue
from pamqp.common import Arguments, FieldTable

from services.common.settings import ServiceSettings


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str
    shards_count: int
    max_length: int = 0  # messages per queue; 0 = unbounded
    queue_type: Literal["classic", "quorum"] = "classic"
    delivery_limit: int = 20  # quorum only: deliveries before a message is dead-lettered

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> Topology:
        return cls(
            settings.queue_prefix,
            settings.shards_count,
            settings.queue_max_length,
            settings.queue_type,
            settings.queue_delivery_limit,
        )

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}dead"

    def queue_name(self, shard: int) -> str:
        if not 0 <= shard < self.shards_count:
            raise ValueError(f"shard {shard} outside 0..{self.shards_count - 1}")
        return f"{self.prefix}{shard}"

    @property
    def queue_names(self) -> list[str]:
        return [self.queue_name(shard) for shard in range(self.shards_count)]

    @property
    def queue_arguments(self) -> Arguments:
        arguments: FieldTable = {}
        if self.max_length:
            # reject-publish: a full queue nacks the publish, so the API can answer 503
            # instead of the broker silently dropping the oldest messages.
            arguments.update({"x-max-length": self.max_length, "x-overflow": "reject-publish"})
        if self.queue_type == "quorum":
            arguments.update(
                {
                    "x-queue-type": "quorum",
                    "x-queue-leader-locator": "balanced",
                    "x-delivery-limit": self.delivery_limit,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.dead_letter_queue,
                }
            )
        return arguments

    async def declare(self, channel: AbstractChannel) -> list[AbstractQueue]:
        """Declare every shard queue (durable), in shard order."""
        return [await self.declare_one(channel, shard) for shard in range(self.shards_count)]

    @property
    def dead_letter_arguments(self) -> Arguments:
        if self.queue_type == "quorum":
            return {"x-queue-type": "quorum", "x-queue-leader-locator": "balanced"}
        return {}

    async def declare_dead_letter(self, channel: AbstractChannel) -> AbstractQueue:
        """The shared dead-letter queue (durable; of the shards' type): poison messages the
        consumer moves there, and, for quorum queues, messages past the delivery limit."""
        return await channel.declare_queue(
            self.dead_letter_queue, durable=True, arguments=self.dead_letter_arguments
        )

    async def declare_one(self, channel: AbstractChannel, shard: int) -> AbstractQueue:
        if self.queue_type == "quorum":
            await self.declare_dead_letter(channel)
        return await channel.declare_queue(
            self.queue_name(shard), durable=True, arguments=self.queue_arguments
        )
