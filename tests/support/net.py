"""Ports for servers the tests start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ports below the kernel's ephemeral range: outgoing connections take their local ports
# from that range, so a server that stops and listens again on a port there (a proxy cut
# and restored) can find it taken by one — "address already in use", seen once.
LOWEST = 20_000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, below the ephemeral range where there is
    room (else any free one)."""
    top = _ephemeral_start()
    for _ in range(100 if top - LOWEST >= 1_000 else 0):
        port = random.randrange(LOWEST, top)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen
