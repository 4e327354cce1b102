"""The API's settings (environment variables; `server --help` lists the flags)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import BrokerSettings


class ApiSettings(BrokerSettings):
    host: str = Field("0.0.0.0", description="Address the API listens on.")
    port: int = Field(8080, ge=0, le=65535, description="API listen port (0 = any free port).")
    max_body_bytes: int = Field(
        1_048_576,
        ge=64,
        le=64 * 1_048_576,
        description="Largest request body, in bytes; a larger one gets 413.",
    )
    publish_timeout_seconds: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Longest wait, in seconds, for the broker's confirms before a 503.",
    )
    retry_after_seconds: int = Field(
        1, ge=1, le=3600, description="Retry-After, in seconds, sent with every 503."
    )
    publish_max_inflight: int = Field(
        1,
        ge=1,
        le=1000,
        description=(
            "Unconfirmed messages per shard at a time; while that many are in flight, "
            "concurrent requests' entries are grouped into the next message."
        ),
    )
    publish_max_message_bytes: int = Field(
        1_048_576,
        ge=1024,
        le=64 * 1_048_576,
        description=(
            "Grouping stops adding requests to a message past this size, in bytes "
            "(one request's shard group is never split)."
        ),
    )
    shutdown_timeout_seconds: float = Field(
        20.0,
        gt=0,
        le=300,
        description="Longest graceful drain on SIGTERM, in seconds (keep below the pod's grace).",
    )
    access_log: bool = Field(
        False, description="Log one access line per request (off: metrics count requests)."
    )
