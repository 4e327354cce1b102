"""Fixtures shared by every test: the real broker (never skipped), isolated queues."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from services.common.topology import Topology
from tests.support.cluster import Cluster, ClusterError, script
from tests.support.seaweed import CREDENTIALS, SeaweedServer
from tests.support.tcp_proxy import TcpProxy

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture
def rabbitmq_url() -> str:
    return RABBITMQ_URL


@pytest.fixture
async def amqp(rabbitmq_url: str) -> AsyncIterator[AbstractConnection]:
    """A plain connection for the test's own look at the queues. No broker is a failure
    with a clear message, never a skip: `make test` starts RabbitMQ first."""
    try:
        connection = await aio_pika.connect(rabbitmq_url, timeout=10)
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing
        pytest.fail(
            f"RabbitMQ is not reachable at {rabbitmq_url} ({exc!r}). "
            "Run the tests with `make test`, which starts it, or start it with "
            "`rabbitmq-server -detached`.",
            pytrace=False,
        )
    async with connection:
        yield connection


@pytest.fixture
def unique_prefix() -> Callable[[], str]:
    def make() -> str:
        return f"adp_test_{uuid.uuid4().hex[:10]}_"

    return make


@pytest.fixture
async def topology(
    amqp: AbstractConnection, unique_prefix: Callable[[], str]
) -> AsyncIterator[Callable[..., Topology]]:
    """Factory of topologies with a queue prefix of their own; their queues are deleted
    after the test."""
    made: list[Topology] = []

    def make(shards_count: int = 5, max_length: int = 0) -> Topology:
        made.append(Topology(unique_prefix(), shards_count, max_length))
        return made[-1]

    yield make
    async with amqp.channel() as channel:
        for topo in made:
            for name in [*topo.queue_names, topo.dead_letter_queue]:
                await channel.queue_delete(name)


@pytest.fixture
async def proxy(rabbitmq_url: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy to the broker, owned by the test (not started); cut after the test."""
    the_proxy = TcpProxy.to_broker(rabbitmq_url)
    yield the_proxy
    await the_proxy.cut()


@pytest.fixture(scope="session")
def rabbitmq_cluster() -> Iterator[Cluster]:
    """The local three-node cluster (scripts/rabbitmq-cluster.sh), brought up once for the
    session and torn down (state deleted) at its end. Cannot come up: a failure saying why,
    never a skip."""
    try:
        cluster = Cluster.up()
    except (ClusterError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(
            f"the local three-node RabbitMQ cluster did not come up: {exc}\n"
            "It needs the machine's rabbitmq-server (Debian: apt-get install rabbitmq-server) "
            "and root (the nodes run as the rabbitmq user); try "
            "`scripts/rabbitmq-cluster.sh up` by hand.",
            pytrace=False,
        )
    try:
        yield cluster
    finally:
        script("down")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A real SeaweedFS server (S3 API on a free loopback port) for the session; each
    test makes its own bucket. The AWS_* variables the consumer reads are set for it."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"SeaweedFS could not start: {exc}", pytrace=False)
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    yield server
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def bucket(seaweed: SeaweedServer) -> str:
    """A new bucket of its own in the session's SeaweedFS: its name."""
    name = f"adp-{uuid.uuid4().hex[:12]}"
    seaweed.create_bucket(name)
    return name
