"""The API's own errors. Each is mapped once to an HTTP status, at the edge in `ingest.py`:
`schema.InvalidEntries` → 400, `BodyTooLarge` → 413, `PublishFailed` → 503."""

from __future__ import annotations


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than {limit} bytes")
        self.limit = limit


class PublishFailed(Exception):
    """The broker did not confirm a message: nacked, returned (unroutable), timed out, or no
    connection. `reason` is one of `REASONS` (a metric label)."""

    REASONS = ("nack", "returned", "timeout", "disconnected")

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in self.REASONS, reason
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class ClientDisconnected(Exception):
    """The client went away before its body was read; nothing is published."""


class BodyTimeout(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"the body did not arrive within {seconds:g}s")
