"""The API's HTTP connections, guarded: uvicorn times out idle connections only between
requests (keep-alive), never before the first request's headers, and caps concurrency only
once headers are complete. So a client that opens connections and sends nothing, or sends
its headers a byte at a time, would hold a socket and a file descriptor each, forever.

Here, on top of uvicorn's httptools protocol:
- a request's headers must be complete within HEADERS_TIMEOUT_SECONDS of the connection's
  start, or of the previous response (a slow body is bounded separately, BODY_TIMEOUT);
  else the connection is closed;
- past MAX_CONNECTIONS open connections, a new one is closed at once, so the process keeps
  descriptors for its broker connection and its real clients.
"""

from __future__ import annotations

import asyncio
import logging
import resource

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

FD_MARGIN = 100  # descriptors kept for everything but client connections


def connection_limit(configured: int) -> int:
    """MAX_CONNECTIONS, or (0) the open-files limit less a margin, within 100..10000."""
    if configured:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(100, min(10_000, soft - FD_MARGIN))


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    headers_timeout = 10.0
    max_connections = 10_000
    _headers_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("over %d open connections: closing a new one", self.max_connections)
            transport.close()
            return
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Waiting for the next request, unless a pipelined one has started already.
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._headers_timer = self.loop.call_later(self.headers_timeout, self._expired)

    def _disarm(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None

    def _expired(self) -> None:
        self._headers_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(headers_timeout: float, max_connections: int) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn's `http` setting, with these limits."""
    limits = {"headers_timeout": headers_timeout, "max_connections": max_connections}
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), limits)
