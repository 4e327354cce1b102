"""The fault suite: the real API and consumer processes on the real broker, a steady load of
retrying clients (tests.support.load), and one fault per scenario. Each scenario asserts
zero accepted entries lost and zero written twice, and saves its figures (sent, accepted,
written, duplicated, lost) under ADP_FAULTS_RESULTS (default .cache/faults); README's table
comes from them (`python -m bench.fault_report`).

Sized for the test command (a few minutes in all). ADP_FAULT_SCALE=N (`make soak`) runs each
scenario N times longer, with N times more kills.

The broker is shared by the machine: the broker scenario cuts the services off through TCP
proxies the test owns and closes every connection with `rabbitmqctl close_all_connections`;
it never stops RabbitMQ.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import httpx
import pytest

from services.common.topology import Topology
from tests.support.consumer import written_lines
from tests.support.faults import fill, tmpfs_volume
from tests.support.load import Figures, Load
from tests.support.net import free_port
from tests.support.polling import eventually
from tests.support.process import ServiceProcess
from tests.support.queues import queue_counts
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq, pytest.mark.timeout(600)]

SCALE = max(1, int(os.environ.get("ADP_FAULT_SCALE", "1")))
RESULTS = Path(os.environ.get("ADP_FAULTS_RESULTS", ".cache/faults"))
PUBLISH_TIMEOUT = 2.0

Counts = Callable[[], Awaitable[dict[str, tuple[int, int]]]]


@pytest.fixture
async def fault_topology(
    unique_prefix: Callable[[], str], rabbitmq_url: str
) -> AsyncIterator[Topology]:
    """Queues of the scenario's own, deleted afterwards on a fresh connection (the broker
    scenario closes every connection the machine has, the shared fixture's included)."""
    topo = Topology(unique_prefix(), 5)
    yield topo
    connection = await aio_pika.connect(rabbitmq_url, timeout=10)
    async with connection, connection.channel() as channel:
        for name in [*topo.queue_names, topo.dead_letter_queue]:
            await channel.queue_delete(name)


@dataclass
class Stack:
    """The API and the consumer as real processes, restartable."""

    topo: Topology
    logs: Path
    out: Path
    api_broker: str
    consumer_broker: str
    api_port: int = field(default_factory=free_port)
    consumer_port: int = field(default_factory=free_port)
    api: ServiceProcess | None = None
    consumer: ServiceProcess | None = None
    env: dict[str, str] = field(default_factory=dict)  # for both services (QUEUE_TYPE, ...)
    counts: Counts = field(default=queue_counts)  # (ready, unacked) per queue, of its broker
    _runs: Counter[str] = field(default_factory=Counter)
    tallies: Counter[str] = field(default_factory=Counter)
    _exits: ExitStack = field(default_factory=ExitStack)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def consumer_url(self) -> str:
        return f"http://127.0.0.1:{self.consumer_port}"

    def _common(self) -> dict[str, str]:
        return {
            "QUEUE_PREFIX": self.topo.prefix,
            "SHARDS_COUNT": str(self.topo.shards_count),
            "LOG_LEVEL": "INFO",
            **self.env,
        }

    async def start_api(self) -> ServiceProcess:
        env = {
            **self._common(),
            "RABBITMQ_URL": self.api_broker,
            "PORT": str(self.api_port),
            "PUBLISH_TIMEOUT_SECONDS": str(PUBLISH_TIMEOUT),
            "RETRY_AFTER_SECONDS": "1",
        }
        self.api = self._start("server", env)
        await self.api.wait_ready(self.api_url)
        return self.api

    async def start_consumer(self, **extra: str) -> ServiceProcess:
        env = {
            **self._common(),
            "RABBITMQ_URL": self.consumer_broker,
            "DATA_OUTPUT_DIR": str(self.out),
            "METRICS_PORT": str(self.consumer_port),
            "METRICS_HOST": "127.0.0.1",
            "BATCH_SIZE": "20",
            "BATCH_MAX_WAIT_SECONDS": "0.2",
            "SHUTDOWN_TIMEOUT_SECONDS": "10",
            "HOST_NAME": "faults",
            **extra,
        }
        self.consumer = self._start("message-consumer", env)
        await self.consumer.wait_ready(self.consumer_url)
        return self.consumer

    def _start(self, command: str, env: dict[str, str]) -> ServiceProcess:
        self._runs[command] += 1
        log = self.logs / f"{command}-{self._runs[command]}.log"
        return self._exits.enter_context(ServiceProcess(command, env, log))

    def close(self) -> None:
        self._exits.close()

    async def settled(self, load: Load, timeout: float = 60) -> None:
        """Every accepted entry written, and the queues empty with nothing unacked."""
        accepted = set(load.accepted)

        async def all_written() -> bool:
            values = {e["value"] for e in written_lines(self.out)}
            return accepted <= values

        await eventually(all_written, timeout=timeout, interval=0.5, what="accepted written")
        await eventually(
            lambda: queues_empty(self.topo, self.counts),
            timeout=timeout,
            interval=0.5,
            what="queues empty",
        )

    async def count_consumer(self) -> None:
        """Add the running consumer's redeliveries and ledger skips to the tallies (read
        before a kill, whose process takes its counters with it)."""
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(f"{self.consumer_url}/metrics")).text
        for line in text.splitlines():
            for name in (
                "adp_consumer_redeliveries_total",
                "adp_consumer_duplicates_skipped_total",
            ):
                if line.startswith(name + "{"):
                    self.tallies[name] += int(float(line.split()[-1]))

    def consumer_note(self) -> str:
        return (
            f"{self.tallies['adp_consumer_redeliveries_total']} redeliveries, "
            f"{self.tallies['adp_consumer_duplicates_skipped_total']} entries left out by the "
            "ledger"
        )

    async def stop(self) -> None:
        consumer = self.consumer
        if consumer is not None and consumer.proc is not None and consumer.proc.poll() is None:
            await self.count_consumer()
        for process in (self.api, self.consumer):
            if process is not None and process.proc is not None and process.proc.poll() is None:
                process.signal(signal.SIGTERM)
                assert await asyncio.to_thread(process.wait, 20) == 0, process.log


async def queues_empty(topo: Topology, counted: Counts = queue_counts) -> bool:
    """No ready and no unacked message in the scenario's shard queues."""
    counts = await counted()
    return not any(sum(counts.get(name, (0, 0))) for name in topo.queue_names)


@pytest.fixture
def stack(fault_topology: Topology, tmp_path: Path, rabbitmq_url: str) -> Iterator[Stack]:
    logs = tmp_path / "logs"
    logs.mkdir()
    the_stack = Stack(fault_topology, logs, tmp_path / "out", rabbitmq_url, rabbitmq_url)
    try:
        yield the_stack
    finally:
        the_stack.close()


async def finish(
    stack: Stack, load: Load, scenario: str, note: str = "", *, exact: bool = True
) -> None:
    """Stop the load, wait until every accepted entry is written and the queues are empty,
    stop both services (SIGTERM, exit 0), save the figures and assert them: nothing lost,
    and (`exact`) nothing written twice."""
    await load.stop()
    await stack.settled(load)
    await stack.stop()
    notes = "; ".join(part for part in (note.rstrip("; "), stack.consumer_note()) if part)
    figures = Figures.count(scenario, load, stack.out, notes)
    figures.save(RESULTS)
    assert figures.accepted > 0, figures
    assert figures.lost == 0, figures
    if exact:
        assert figures.duplicated == 0, figures


async def terminate(process: ServiceProcess | None) -> float:
    """SIGTERM; asserts exit 0; returns how long the drain took."""
    assert process is not None
    started = time.monotonic()
    process.signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 20) == 0, process.log
    return time.monotonic() - started


async def progress(load: Load, entries: int, timeout: float = 30) -> None:
    target = len(load.accepted) + entries

    async def reached() -> bool:
        return len(load.accepted) >= target

    await eventually(reached, timeout=timeout, interval=0.1, what=f"{entries} more accepted")


async def kill_9(process: ServiceProcess | None) -> None:
    assert process is not None
    process.signal(signal.SIGKILL)
    await asyncio.to_thread(process.wait, 10)


@pytest.mark.parametrize("exactly_once", [True, False], ids=["ledger", "no-ledger"])
async def test_consumer_killed_9_repeatedly_under_load(stack: Stack, exactly_once: bool) -> None:
    """kill -9 lands anywhere: mid-batch, between a rename and its ack. With the ledger
    (the default) nothing is lost or written twice; without it (EXACTLY_ONCE=false, for
    comparison) nothing is lost either, but redelivered entries may be written twice."""
    # Small batches: many files a second, so kills often land between a rename and its ack.
    flag = {"EXACTLY_ONCE": str(exactly_once).lower(), "BATCH_SIZE": "5"}
    await stack.start_api()
    await stack.start_consumer(**flag)
    load = Load(stack.api_url, "ckill")
    load.start()
    kills = 4 * SCALE
    for _ in range(kills):
        await progress(load, 1500)
        await stack.count_consumer()
        await kill_9(stack.consumer)
        await stack.start_consumer(**flag)
    await progress(load, 1500)
    # Without the ledger (the comparison) the same guarantee against loss, none against
    # duplicates: those are counted, not asserted.
    mode = "" if exactly_once else ", EXACTLY_ONCE=false"
    await finish(stack, load, f"consumer kill -9 x{kills}, restarted{mode}", exact=exactly_once)


async def test_api_killed_9_under_load(stack: Stack) -> None:
    await stack.start_api()
    await stack.start_consumer()
    load = Load(stack.api_url, "akill")
    load.start()
    kills = 3 * SCALE
    for _ in range(kills):
        await progress(load, 1500)
        await kill_9(stack.api)
        await stack.start_api()
    await progress(load, 1500)
    note = f"{load.retries} client retries with the same Idempotency-Key"
    await finish(stack, load, f"API kill -9 x{kills}, restarted", note)


async def through_proxies(stack: Stack, rabbitmq_url: str) -> tuple[TcpProxy, TcpProxy]:
    """The API and the consumer reach the broker each through a TCP proxy of the test's."""
    api_proxy, consumer_proxy = TcpProxy.to_broker(rabbitmq_url), TcpProxy.to_broker(rabbitmq_url)
    await api_proxy.start()
    await consumer_proxy.start()
    stack.api_broker, stack.consumer_broker = api_proxy.url, consumer_proxy.url
    return api_proxy, consumer_proxy


async def test_broker_lost_then_back(stack: Stack, rabbitmq_url: str) -> None:
    """Both services reach the broker through proxies the test owns; the outage cuts both
    and closes every broker connection. While it lasts the API answers 503 within its
    publish timeout (never a 500, never a hang); within 10 s of the broker's return it
    answers 201 again, and the consumer resumes, all without a restart."""
    api_proxy, consumer_proxy = await through_proxies(stack, rabbitmq_url)
    api = await stack.start_api()
    consumer = await stack.start_consumer()
    load = Load(stack.api_url, "broker")
    load.start()
    recoveries: list[float] = []
    try:
        for _ in range(SCALE):
            await progress(load, 1500)
            await api_proxy.cut()
            await consumer_proxy.cut()
            await asyncio.to_thread(
                subprocess.run,
                ["rabbitmqctl", "-q", "close_all_connections", "fault suite: broker outage"],
                check=True,
                capture_output=True,
            )
            await refused_while_down(stack)
            await asyncio.sleep(3)  # the outage
            back = time.monotonic()
            await api_proxy.start()
            await consumer_proxy.start()

            async def serving(back: float = back) -> bool:
                return load.accepted_since(back) > 0

            await eventually(serving, timeout=10, interval=0.1, what="201 again within 10 s")
            recoveries.append(time.monotonic() - back)
        await progress(load, 1500)
        for process in (api, consumer):  # never restarted
            assert process.proc is not None
            assert process.proc.poll() is None
        note = (
            f"slowest 503 {load.slowest_refusal:.1f} s (timeout {PUBLISH_TIMEOUT:g} s), no 500; "
            f"201 again {max(recoveries):.1f} s after the broker returned; "
            f"{load.retries} client retries; "
        )
        scenario = f"broker lost x{SCALE} (proxies cut + close_all_connections)"
        await finish(stack, load, scenario, note)
        assert load.statuses["500"] == 0, load.statuses
        assert load.slowest_refusal <= PUBLISH_TIMEOUT + 1.0, load.slowest_refusal
    finally:
        await api_proxy.cut()
        await consumer_proxy.cut()


async def test_broker_stalled_then_back(stack: Stack, rabbitmq_url: str) -> None:
    """The broker stops answering but keeps the connections open (proxies forwarding
    nothing): the API cannot tell at once, so its publishes time out — 503 within
    PUBLISH_TIMEOUT_SECONDS, never a hang. The messages held in the stall reach the broker
    when it answers again, after their clients were told 503 and retried with the same
    key: the ledger writes those entries once."""
    api_proxy, consumer_proxy = await through_proxies(stack, rabbitmq_url)
    await stack.start_api()
    await stack.start_consumer()
    load = Load(stack.api_url, "stall")
    load.start()
    recoveries: list[float] = []
    try:
        for _ in range(SCALE):
            await progress(load, 1500)
            api_proxy.pause()
            consumer_proxy.pause()
            timeouts = load.statuses["503"]

            async def refusing(before: int = timeouts) -> bool:
                return load.statuses["503"] > before

            await eventually(refusing, timeout=PUBLISH_TIMEOUT + 3, what="503s in the stall")
            await asyncio.sleep(2)
            back = time.monotonic()
            api_proxy.resume()
            consumer_proxy.resume()

            async def serving(back: float = back) -> bool:
                return load.accepted_since(back) > 0

            await eventually(serving, timeout=10, interval=0.1, what="201 again within 10 s")
            recoveries.append(time.monotonic() - back)
        await progress(load, 1500)
        note = (
            f"slowest 503 {load.slowest_refusal:.1f} s (timeout {PUBLISH_TIMEOUT:g} s), no 500; "
            f"201 again {max(recoveries):.1f} s after it answered; {load.retries} client retries"
        )
        await finish(stack, load, f"broker stalled x{SCALE} (proxies forward nothing)", note)
        assert load.statuses["500"] == 0, load.statuses
        assert PUBLISH_TIMEOUT - 0.5 <= load.slowest_refusal <= PUBLISH_TIMEOUT + 1.0
    finally:
        await api_proxy.cut()
        await consumer_proxy.cut()


async def refused_while_down(stack: Stack) -> None:
    """A request during the outage gets a 503 with Retry-After, within the publish timeout
    plus a little; and the consumer reports itself not ready."""
    async with httpx.AsyncClient(timeout=PUBLISH_TIMEOUT + 5) as http:
        started = time.monotonic()
        body = [{"timestamp": "2019-10-12T07:20:50Z", "value": "probe-during-outage"}]
        response = await http.post(f"{stack.api_url}/message", json=body)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert time.monotonic() - started <= PUBLISH_TIMEOUT + 1.0

        async def consumer_not_ready() -> bool:
            return (await http.get(f"{stack.consumer_url}/readyz")).status_code == 503

        await eventually(consumer_not_ready, timeout=10, what="consumer not ready")


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of the test's own, to fill up."""
    with tmpfs_volume(tmp_path / "volume") as mountpoint:
        yield mountpoint


async def test_output_volume_full_then_freed(stack: Stack, small_volume: Path) -> None:
    """The consumer's volume fills up: nothing is acked (the queues keep the entries),
    readiness turns false, the API keeps accepting; once there is room again the consumer
    catches up by itself."""
    stack.out = small_volume / "out"
    await stack.start_api()
    await stack.start_consumer()
    load = Load(stack.api_url, "full")
    load.start()
    await progress(load, 1500)
    filler = small_volume / "filler"
    await asyncio.to_thread(fill, filler)
    written_when_full = len(written_lines(stack.out))
    async with httpx.AsyncClient(timeout=5) as http:

        async def not_ready() -> bool:
            return (await http.get(f"{stack.consumer_url}/readyz")).status_code == 503

        await eventually(not_ready, timeout=15, what="consumer not ready on a full volume")
        await progress(load, 1500)  # the API goes on accepting: the broker holds them
        assert not await queues_empty(stack.topo)
        held = len(written_lines(stack.out)) - written_when_full
        filler.unlink()

        async def ready() -> bool:
            return (await http.get(f"{stack.consumer_url}/readyz")).status_code == 200

        await eventually(ready, timeout=20, what="ready again once freed")
    note = f"{held} entries written while full; readiness false, then true; "
    await finish(stack, load, "output volume full (tmpfs), then freed", note)


async def test_sigterm_under_load_drains_both_services(stack: Stack) -> None:
    """SIGTERM to the consumer mid-load: it drains within its bound and exits 0; a new one
    carries on. Then SIGTERM to the API mid-load: in-flight requests finish, exit 0."""
    await stack.start_api()
    await stack.start_consumer()
    load = Load(stack.api_url, "term")
    load.start()
    await progress(load, 1500)
    consumer_drain = await terminate(stack.consumer)
    assert consumer_drain < 10.5  # SHUTDOWN_TIMEOUT_SECONDS=10
    await stack.start_consumer()
    await progress(load, 1500)
    api_drain = await terminate(stack.api)
    await stack.start_api()
    await progress(load, 1500)
    note = f"consumer drained in {consumer_drain:.1f} s, API in {api_drain:.1f} s; exit 0; "
    await finish(stack, load, "SIGTERM consumer, then API, under load", note)
