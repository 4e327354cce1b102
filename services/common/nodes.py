"""The broker's nodes: `RABBITMQ_URL` as one URL or a cluster's nodes comma-separated.

Parsed strictly, once, at start-up: every element must be an amqp:// or amqps:// URL with a
host (and a valid port), and all of them must name the same virtual host — the nodes of one
cluster serve the same queues, so a list mixing vhosts would move a service onto other
queues at its first failover. Any element that is not so makes the whole setting invalid
(the CLI ends the process with status 2 naming RABBITMQ_URL); the error names the element
by its position and shows it with its password masked.

`Nodes` also decides the order in which a process tries them: from a start offset chosen at
random per process (so replicas do not all pile onto the first node), then round-robin.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from yarl import URL

SCHEMES = ("amqp", "amqps")


def redact(url: URL) -> str:
    """The URL fit for a log line: its password masked."""
    return str(url.with_password("***")) if url.password else str(url)


def parse_nodes(value: str) -> tuple[URL, ...]:
    """The URLs of `value` (comma-separated, whitespace around an element ignored); raises
    `ValueError` naming the first malformed element."""
    elements = [element.strip() for element in value.split(",")]
    urls: list[URL] = []
    for position, element in enumerate(elements, start=1):
        where = f"element {position} of {len(elements)}" if len(elements) > 1 else "the URL"
        if not element:
            raise ValueError(f"{where} is empty (a stray comma?)")
        try:
            url = URL(element)
            port = url.port  # yarl checks the port only when asked
        except ValueError as exc:
            raise ValueError(f"{where} is not a URL ({exc})") from None
        shown = redact(url)
        if url.scheme not in SCHEMES or not url.host:
            raise ValueError(f"{where} ({shown}) must be an amqp:// or amqps:// URL with a host")
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"{where} ({shown}) has an invalid port")
        if any((url.host, url.port) == (seen.host, seen.port) for seen in urls):
            raise ValueError(f"{where} ({shown}) names a node listed before it")
        urls.append(url)
    vhosts = {_vhost(url) for url in urls}
    if len(vhosts) > 1:
        raise ValueError(
            "the nodes name different virtual hosts "
            f"({', '.join(sorted(vhosts))}): list the nodes of one cluster, same vhost"
        )
    return tuple(urls)


def _vhost(url: URL) -> str:
    return url.path[1:] or "/"


@dataclass(slots=True)
class Nodes:
    """The nodes in the order a process tries them. `current` is the node it connects (or is
    connected) to; `advance()` moves to the next one, round-robin."""

    urls: tuple[URL, ...]
    index: int = field(default=-1)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("no broker node")
        if self.index < 0:
            self.index = random.randrange(len(self.urls))  # a spread, not a secret
        self.index %= len(self.urls)

    @classmethod
    def parse(cls, value: str, *, start: int = -1) -> Nodes:
        """`start`: the first node's index (tests); by default a random one."""
        return cls(parse_nodes(value), start)

    @property
    def current(self) -> URL:
        return self.urls[self.index]

    @property
    def shown(self) -> str:
        """The current node, password masked."""
        return redact(self.current)

    @property
    def label(self) -> str:
        """The current node as a bounded metric label: its position in the list."""
        return str(self.index)

    def find(self, url: URL) -> int | None:
        """The position of the node `url` names (by host and port), if it is one of them."""
        for index, node in enumerate(self.urls):
            if (node.host, node.port) == (url.host, url.port):
                return index
        return None

    def shown_at(self, index: int) -> str:
        return redact(self.urls[index])

    def advance(self) -> URL:
        self.index = (self.index + 1) % len(self.urls)
        return self.current

    def __len__(self) -> int:
        return len(self.urls)
