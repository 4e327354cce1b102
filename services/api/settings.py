"""The API's settings (environment variables; `server --help` lists the flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator

from services.common.settings import ServiceSettings


class ApiSettings(ServiceSettings):
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
    body_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=600,
        description=(
            "Longest time, in seconds, a request body may take to arrive; a slower client "
            "gets 408 and its connection is closed."
        ),
    )
    headers_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=600,
        description=(
            "Longest time, in seconds, for a request's headers to arrive, from the "
            "connection's start or the previous response; a slower client's connection is "
            "closed (an idle or trickling connection cannot hold a socket forever)."
        ),
    )
    max_connections: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description=(
            "Most open client connections; a new one past it is closed at once. 0 = the "
            "process's open-files limit less 100, within 100..10000."
        ),
    )
    max_inflight_requests: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description=(
            "POST /message requests handled at once (bounds memory: each holds its body); "
            "past it, 503 at once."
        ),
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
    access_log: bool = Field(
        False, description="Log one access line per request (off: metrics count requests)."
    )
    api_tokens: SecretStr | None = Field(
        None,
        description=(
            "Bearer tokens accepted on POST /message, comma-separated; with API_TOKENS_FILE "
            "unset too, POST /message needs no token."
        ),
    )
    api_tokens_file: Path | None = Field(
        None,
        description=(
            "File with one accepted bearer token a line (e.g. a mounted Secret), read at "
            "start-up; adds to API_TOKENS."
        ),
    )

    @field_validator("api_tokens_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not _read_tokens(value):
            raise ValueError(f"{value} holds no token (or cannot be read)")
        return value

    def api_token_list(self) -> list[str]:
        """Every configured token (never log them)."""
        tokens = []
        if self.api_tokens is not None:
            tokens += [t.strip() for t in self.api_tokens.get_secret_value().split(",")]
        if self.api_tokens_file is not None:
            tokens += _read_tokens(self.api_tokens_file)
        return [token for token in tokens if token]


def _read_tokens(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
