"""Settings both services read from the environment (12-factor).

One pydantic-settings class per service derives from `ServiceSettings`; the CLI builds it
once at start-up and passes it down. Field descriptions are the configuration table of the
README and the chart's values: keep the words in step.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.nodes import Nodes, parse_nodes, redact

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class ServiceSettings(BaseSettings):
    """What both services read: the broker and its topology (which they must agree on),
    the shutdown bound and logging."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", validate_default=True)

    rabbitmq_url: str = Field(
        "amqp://guest:guest@localhost:5672/",
        description=(
            "AMQP URL of the RabbitMQ broker (amqp:// or amqps://), or the URLs of a "
            "cluster's nodes comma-separated (same virtual host): the service connects to "
            "one reachable node and moves to the next one when it loses it."
        ),
    )
    shards_count: int = Field(
        5,
        ge=1,
        le=1000,
        description="Number of shards, one durable queue each; API and consumer must agree.",
    )
    queue_prefix: str = Field(
        "task_queue_",
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Queue name prefix: shard n is the queue <prefix><n>.",
    )
    queue_max_length: int = Field(
        0,
        ge=0,
        description=(
            "Most messages a shard queue holds before the broker rejects publishes "
            "(the API then answers 503); 0 = unbounded. Part of the queue's identity: "
            "API and consumer must agree."
        ),
    )
    queue_type: Literal["classic", "quorum"] = Field(
        "classic",
        description=(
            "Kind of the shard queues: classic (the Go original's, so its queues drain) or "
            "quorum (replicated, with a delivery limit and a dead-letter queue <prefix>dead). "
            "Part of the queues' identity: API and consumer must agree."
        ),
    )
    queue_delivery_limit: int = Field(
        20,
        ge=1,
        le=10_000,
        description=(
            "Quorum queues only: deliveries of a message before it goes to the dead-letter "
            "queue instead of being redelivered again."
        ),
    )
    broker_connect_timeout_seconds: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Seconds one connection attempt to the broker may take.",
    )
    broker_retry_max_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Longest pause, in seconds, between connection attempts (backoff cap).",
    )
    shutdown_timeout_seconds: float = Field(
        20.0,
        gt=0,
        le=300,
        description=(
            "Longest drain on SIGTERM, in seconds: the API finishes the requests in flight, "
            "the consumer writes and acks what it received (keep below the pod's 30 s grace "
            "period)."
        ),
    )
    log_level: LogLevel = Field("INFO", description="Log level of the process.")

    @field_validator("rabbitmq_url")
    @classmethod
    def _amqp_urls(cls, value: str) -> str:
        parse_nodes(value)  # raises naming the malformed element, its password masked
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def rabbitmq_url_redacted(self) -> str:
        """The broker URL (every node's) fit for a log line: the passwords replaced."""
        return ",".join(redact(url) for url in parse_nodes(self.rabbitmq_url))

    def broker_nodes(self) -> Nodes:
        """The nodes, from a random one of them (each process its own start)."""
        return Nodes.parse(self.rabbitmq_url)
