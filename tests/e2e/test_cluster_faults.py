"""The fault suite on a three-node cluster: the real API and consumer on the cluster's node
list (RABBITMQ_URL, comma-separated) with quorum queues, the retrying keyed load of the
fault suite (tests.support.load), and a node lost per scenario:

- kill -9 of the node leading most shard queues (one a service is connected to, when one
  of those is), started again after ~8 s;
- a rolling restart: each node stopped and started in turn, as a StatefulSet upgrade does;
- the services' own path to their node cut (TCP proxies of the test's) while the cluster
  stays healthy.

Each asserts what the single-node suite does (0 accepted entries lost, 0 written twice,
never a 5xx but 503, the queues settled) and saves its figures beside the others
(`python -m bench.fault_report`): the longest stretch without a 201 after the fault, the
time until the consumer writes again, the 503s seen. The cluster is this session's own
(the `rabbitmq_cluster` fixture: scripts/rabbitmq-cluster.sh, ports 5791-5793), so nothing
here touches the broker others use.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import httpx
import pytest

from services.common.topology import Topology
from tests.e2e.test_faults import PUBLISH_TIMEOUT, Stack, finish, progress, terminate
from tests.support.cluster import NODES, Cluster
from tests.support.load import Load
from tests.support.polling import eventually
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq, pytest.mark.timeout(300)]

RESTART_AFTER = 8.0  # seconds a killed node stays down
NODE_LINE = re.compile(r'^adp_(api|consumer)_broker_node\{host="[^"]*",node="(\d+)"\} 1\.0$')


@pytest.fixture
async def cluster_topology(
    rabbitmq_cluster: Cluster, unique_prefix: Callable[[], str]
) -> AsyncIterator[Topology]:
    topo = Topology(unique_prefix(), 5, queue_type="quorum")
    yield topo
    for node in NODES:  # a scenario may end with a node still starting
        await rabbitmq_cluster.start(node)
    connection = await aio_pika.connect(rabbitmq_cluster.urls[0], timeout=10)
    async with connection, connection.channel() as channel:
        for name in [*topo.queue_names, topo.dead_letter_queue]:
            await channel.queue_delete(name)


@pytest.fixture
def cluster_stack(
    cluster_topology: Topology, rabbitmq_cluster: Cluster, tmp_path: Path
) -> Iterator[Stack]:
    logs = tmp_path / "logs"
    logs.mkdir()
    url = rabbitmq_cluster.rabbitmq_url
    the_stack = Stack(
        cluster_topology,
        logs,
        tmp_path / "out",
        url,
        url,
        env={"QUEUE_TYPE": "quorum"},
        counts=rabbitmq_cluster.queue_counts,
    )
    try:
        yield the_stack
    finally:
        the_stack.close()


async def connected_nodes(stack: Stack) -> dict[str, int]:
    """Which node (its index in RABBITMQ_URL) the API and the consumer are connected to,
    from their adp_*_broker_node metrics."""
    found: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=5) as http:
        for base in (stack.api_url, stack.consumer_url):
            for line in (await http.get(f"{base}/metrics")).text.splitlines():
                if match := NODE_LINE.match(line):
                    found[match[1]] = int(match[2])
    return found


@dataclass
class WriteClock:
    """Samples the consumer's entries-written counter (every 0.2 s) to tell how long the
    consumer went without writing after a fault (to 0.2 s)."""

    url: str
    samples: list[tuple[float, float]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _sample(self) -> None:
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                try:
                    text = (await http.get(f"{self.url}/metrics")).text
                except httpx.HTTPError:
                    pass
                else:
                    written = sum(
                        float(line.split()[-1])
                        for line in text.splitlines()
                        if line.startswith("adp_worker_processed_entries_total{")
                    )
                    self.samples.append((time.monotonic(), written))
                await asyncio.sleep(0.2)

    def longest_pause(self, since: float) -> float:
        """The longest stretch, in seconds, from `since` on, in which the counter did not
        rise: how long the consumer went without writing."""
        pairs = itertools.pairwise(self.samples)
        rises = [t for (_, before), (t, v) in pairs if v > before and t > since]
        end = self.samples[-1][0] if self.samples else since
        return max(b - a for a, b in itertools.pairwise([since, *rises, end]))


def fault_note(load: Load, fault: float, clock: WriteClock, what: str) -> str:
    refused = load.statuses["503"]
    return (
        f"{what}; longest stretch without a 201 {load.longest_gap(fault):.1f} s, without a "
        f"file written {clock.longest_pause(fault):.1f} s; {refused} 503s (slowest "
        f"{load.slowest_refusal:.1f} s, timeout {PUBLISH_TIMEOUT:g} s), "
        f"{load.retries} client retries; "
    )


def assert_served(load: Load, fault: float) -> None:
    """Never a 5xx but 503, each in time, and 201s again within 10 s (the goal of a
    failover)."""
    errors = {s: n for s, n in load.statuses.items() if s.startswith("5") and s != "503"}
    assert not errors, load.statuses
    assert load.longest_gap(fault) < 10.0
    assert load.slowest_refusal <= PUBLISH_TIMEOUT + 1.0  # a 503 in time, never a hang


async def start_both(stack: Stack) -> WriteClock:
    await stack.start_api()
    await stack.start_consumer()
    clock = WriteClock(stack.consumer_url)
    clock.start()
    return clock


async def onto(stack: Stack, node: int, tries: int = 15) -> dict[str, int]:
    """Restart the API and the consumer (before the load) until each is connected to
    `node`: each starts at a random node of the list, so a few restarts do it."""
    connected = await connected_nodes(stack)
    for _ in range(tries):
        if connected.get("api") != node:
            await terminate(stack.api)
            await stack.start_api()
        if connected.get("consumer") != node:
            await terminate(stack.consumer)
            await stack.start_consumer()
        connected = await connected_nodes(stack)
        if set(connected.values()) == {node}:
            break
    return connected


async def test_killing_the_busiest_leader_node_loses_nothing(
    cluster_stack: Stack, rabbitmq_cluster: Cluster
) -> None:
    stack, cluster = cluster_stack, rabbitmq_cluster
    await stack.start_api()  # declares the queues: their leaders spread
    await stack.start_consumer()
    placement = await cluster.placement(stack.topo.prefix)
    assert all(len(members) == 3 for _, members in placement.values()), placement
    leads = {node: sum(1 for lead, _ in placement.values() if lead == node) for node in NODES}
    victim = max(NODES, key=lambda node: leads[node])
    connected = await onto(stack, NODES.index(victim))
    clock = WriteClock(stack.consumer_url)
    clock.start()
    load = Load(stack.api_url, "qkill")
    load.start()
    await progress(load, 1500)
    fault = time.monotonic()
    await cluster.kill(victim)
    await asyncio.sleep(RESTART_AFTER)
    await cluster.start(victim)
    await progress(load, 1500)
    await clock.stop()
    on = [name for name, index in connected.items() if NODES[index] == victim]
    what = (
        f"{victim} led {leads[victim]} of 5 shard queues"
        + (f", the {' and the '.join(on)} connected to it" if on else "")
        + f"; restarted after {RESTART_AFTER:.0f} s"
    )
    note = fault_note(load, fault, clock, what)
    await finish(stack, load, "cluster: kill -9 of the busiest quorum leader node", note)
    assert_served(load, fault)


async def test_a_rolling_restart_loses_nothing(
    cluster_stack: Stack, rabbitmq_cluster: Cluster
) -> None:
    stack, cluster = cluster_stack, rabbitmq_cluster
    clock = await start_both(stack)
    load = Load(stack.api_url, "qroll")
    load.start()
    await progress(load, 1500)
    fault = time.monotonic()
    for node in NODES:
        await cluster.stop(node)
        await cluster.start(node)
        await progress(load, 300)  # serving again before the next node goes
    await progress(load, 1500)
    await clock.stop()
    took = time.monotonic() - fault
    note = fault_note(load, fault, clock, f"n1, n2, n3 stopped and started in turn ({took:.0f} s)")
    await finish(stack, load, "cluster: rolling restart of the three nodes", note)
    assert_served(load, fault)


async def test_the_services_path_to_their_node_cut_while_the_cluster_stays_up(
    cluster_stack: Stack, rabbitmq_cluster: Cluster
) -> None:
    stack, cluster = cluster_stack, rabbitmq_cluster
    api_proxies = [TcpProxy.to_broker(url) for url in cluster.urls]
    consumer_proxies = [TcpProxy.to_broker(url) for url in cluster.urls]
    for proxy in api_proxies + consumer_proxies:
        await proxy.start()
    stack.api_broker = ",".join(p.url for p in api_proxies)
    stack.consumer_broker = ",".join(p.url for p in consumer_proxies)
    try:
        clock = await start_both(stack)
        load = Load(stack.api_url, "qpath")
        load.start()
        await progress(load, 1500)
        connected = await connected_nodes(stack)
        fault = time.monotonic()
        await api_proxies[connected["api"]].cut()
        await consumer_proxies[connected["consumer"]].cut()

        async def moved() -> bool:
            now = await connected_nodes(stack)
            return now.keys() == connected.keys() and all(now[k] != connected[k] for k in connected)

        await eventually(moved, timeout=15, interval=0.2, what="both on another node")
        await progress(load, 1500)
        await clock.stop()
        what = (
            f"API's path to {NODES[connected['api']]} and consumer's to "
            f"{NODES[connected['consumer']]} cut, the cluster up"
        )
        note = fault_note(load, fault, clock, what)
        await finish(stack, load, "cluster: the services' path to their node cut", note)
        assert_served(load, fault)
    finally:
        for proxy in api_proxies + consumer_proxies:
            await proxy.cut()
