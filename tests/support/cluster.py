"""The local three-node RabbitMQ cluster (scripts/rabbitmq-cluster.sh) from a test: its
URL list, its nodes stopped, killed and started, and where the queues lead."""

from __future__ import annotations

import asyncio
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from yarl import URL

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rabbitmq-cluster.sh"
NODES = ("n1", "n2", "n3")


class ClusterError(RuntimeError):
    pass


def script(*args: str, timeout: float = 180) -> str:
    done = subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise ClusterError(f"rabbitmq-cluster.sh {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


@dataclass(frozen=True)
class Cluster:
    urls: tuple[str, ...]  # one per node, in NODES order

    @classmethod
    def up(cls) -> Cluster:
        script("up")
        return cls(tuple(script("urls").strip().split(",")))

    @property
    def rabbitmq_url(self) -> str:
        """RABBITMQ_URL for the services: every node, comma-separated."""
        return ",".join(self.urls)

    def node_of_port(self, port: int) -> str:
        (node,) = [n for n, url in zip(NODES, self.urls, strict=True) if URL(url).port == port]
        return node

    async def kill(self, node: str) -> None:
        await asyncio.to_thread(script, "kill", node)

    async def stop(self, node: str) -> None:
        await asyncio.to_thread(script, "stop", node)

    async def start(self, node: str) -> None:
        await asyncio.to_thread(script, "start", node)

    async def ctl(self, *args: str, on: str | None = None) -> str:
        """rabbitmqctl on a running node (`on`, or the first that answers)."""
        errors = []
        for node in [on] if on else NODES:
            done = await asyncio.to_thread(
                subprocess.run,
                ["rabbitmqctl", "-q", "-n", f"{node}@localhost", *args],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if done.returncode == 0:
                return done.stdout
            errors.append(f"{node}: {done.stderr.strip()}")
        raise ClusterError(f"rabbitmqctl {' '.join(args)}: {'; '.join(errors)}")

    async def placement(self, prefix: str) -> dict[str, tuple[str, list[str]]]:
        """Queue name -> (leader node, member nodes), for the queues named `prefix`*."""
        out = await self.ctl("list_queues", "name", "leader", "members")
        found = {}
        for line in out.splitlines():
            name, leader, members = line.split("\t")
            if name.startswith(prefix):
                nodes = [m.strip().split("@")[0] for m in members.strip("[]").split(",")]
                found[name] = (leader.split("@")[0], nodes)
        return found

    async def busiest_leader(self, prefix: str) -> str:
        """The node leading most of the `prefix` queues."""
        leaders = Counter(leader for leader, _ in (await self.placement(prefix)).values())
        return leaders.most_common(1)[0][0]

    async def queue_counts(self) -> dict[str, tuple[int, int]]:
        """Every queue's (ready, unacked) messages."""
        out = await self.ctl("list_queues", "name", "messages_ready", "messages_unacknowledged")
        counts = {}
        for line in out.splitlines():
            name, ready, unacked = line.split("\t")
            if ready.isdigit() and unacked.isdigit():
                counts[name] = (int(ready), int(unacked))
        return counts
