"""The API's own errors. Each is mapped once to an HTTP status, at the edge in `ingest.py`:
`schema.InvalidEntries` → 400, `BodyTooLarge` → 413, `PublishFailed` → 503."""

from __future__ import annotations

from typing import Literal, get_args

# Why the broker did not take a request's entries: the 503's `reason`, the metric's label.
PublishFailure = Literal["nack", "returned", "timeout", "disconnected"]


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than {limit} bytes")
        self.limit = limit


class PublishFailed(Exception):
    """The broker did not confirm a message: nacked, returned (unroutable), timed out, or no
    connection."""

    REASONS: tuple[PublishFailure, ...] = get_args(PublishFailure)

    def __init__(self, reason: PublishFailure, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class ClientDisconnected(Exception):
    """The client went away before its body was read; nothing is published."""
