"""Exactly-once output on the real broker: a message whose file was renamed into place but
whose ack never reached the broker comes back (redelivered), and the ledger keeps its
entries from being written a second time — in the same process, in a restarted one, and in
another replica sharing the volume. A client's retry (same Idempotency-Key) is skipped too.

The fault — the consumer "dies" between the rename and the ack — is made through the sink
seam: right after the real file sink returns, the test cuts the consumer's broker
connection (a TCP proxy the test owns), so the ack is lost, as with `kill -9` at that
moment (the e2e fault suite does it with real kills)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from services.common.topology import Topology
from services.common.wire import key_id, part_spec, request_key
from services.consumer.batch import Batch
from services.consumer.sink import Sink
from tests.integration.consumer.conftest import Settings
from tests.support.consumer import (
    WrappedSink,
    lines_reach,
    run_consumer,
    unacked,
    written_lines,
)
from tests.support.polling import eventually
from tests.support.publish import entries, publish, publish_parts
from tests.support.queues import depth
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.rabbitmq


class CutAfterWrite(WrappedSink):
    """The real file sink; after its first write returns, the broker connection is cut
    before the pool can ack."""

    def __init__(self, inner: Sink, proxy: TcpProxy) -> None:
        super().__init__(inner)
        self.proxy = proxy
        self.cut = False

    async def write(self, batch: Batch, worker: str) -> Batch:
        written = await self.inner.write(batch, worker)
        if not self.cut:
            self.cut = True
            await self.proxy.cut()
        return written


@pytest.mark.parametrize("after", ["same-process", "restarted", "other-replica"])
async def test_a_renamed_but_unacked_file_is_not_written_again(
    after: str,
    settings: Settings,
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    proxy: TcpProxy,
    rabbitmq_url: str,
    tmp_path: Path,
) -> None:
    topo = topology(shards_count=1)
    out = tmp_path / "out"
    sent = entries(10, after)  # one message of 10 entries: two files of 5
    await publish(amqp, topo, sent, per_message=10)
    await proxy.start()
    config = settings(
        topo, rabbitmq_url=proxy.url, batch_size=5, data_output_dir=out, shutdown_timeout_seconds=2
    )
    async with run_consumer(config, lambda sink: CutAfterWrite(sink, proxy)) as consumer:
        await lines_reach(out, 5)  # the first file, renamed; its ack is lost
        if after == "same-process":
            await proxy.start()  # the consumer reconnects and gets the message again
            await lines_reach(out, 10, timeout=30)
            await eventually(
                lambda: depth_and_unacked(amqp, topo), timeout=15, what="queue settled"
            )

            async def forgotten() -> bool:
                # Once the redelivery's ack is known applied (the barrier), the ledger
                # forgets the message: the lost ack's record included.
                text = (await consumer.http.get("/metrics")).text
                return sample(text, "adp_consumer_ledger_parts") == 0

            await eventually(forgotten, timeout=10, what="ledger settled")
            metrics = (await consumer.http.get("/metrics")).text
    if after != "same-process":
        # The process is gone (its broker connection died with it); the message comes
        # back to a fresh consumer — this host again, or another replica.
        host = "testhost" if after == "restarted" else "otherhost"
        fresh = settings(topo, batch_size=5, data_output_dir=out, host_name=host)
        async with run_consumer(fresh) as consumer:
            await lines_reach(out, 10, timeout=30)
            await eventually(
                lambda: depth_and_unacked(amqp, topo), timeout=15, what="queue settled"
            )
            metrics = (await consumer.http.get("/metrics")).text
    values = Counter(e["value"] for e in written_lines(out))
    assert values == Counter(e["value"] for e in sent)  # each exactly once
    # At least the first file's entries came back and were left out (the second file may
    # have been renamed before the cut too).
    assert sample(metrics, 'adp_consumer_duplicates_skipped_total{shard="0"}') in (5, 10)
    assert sample(metrics, 'adp_consumer_redeliveries_total{shard="0"}') == 1


def sample(metrics: str, series: str) -> float:
    (value,) = [line.split()[-1] for line in metrics.splitlines() if line.startswith(series)]
    return float(value)


async def depth_and_unacked(amqp: AbstractConnection, topo: Topology) -> bool:
    queue = topo.queue_name(0)
    return await depth(amqp, queue) == 0 and await unacked(queue) == 0


async def test_a_clients_retry_with_the_same_idempotency_key_is_written_once(
    settings: Settings,
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    tmp_path: Path,
) -> None:
    """The API gives both attempts' parts the same id (another message each time, grouped
    with other requests' parts): the second is acked without being written. Another body
    under the same key is not a retry: it is written."""
    topo = topology(shards_count=1)
    out = tmp_path / "out"
    first = entries(3, "keyed")
    other = entries(2, "other")
    changed = entries(3, "changed")
    part = json.dumps(first).encode()
    kid = key_id(request_key(b"order-17", part), part)
    changed_part = json.dumps(changed).encode()
    changed_id = key_id(request_key(b"order-17", changed_part), changed_part)
    bodies = [
        # attempt 1: alone; attempt 2 (the retry): grouped behind another request's part
        (part, part_spec(3, kid)),
        (
            json.dumps(other + first).encode(),
            f"{part_spec(2, None)},{part_spec(3, kid)}",
        ),
        (
            json.dumps(changed).encode(),
            part_spec(3, changed_id),
        ),
    ]
    await publish_parts(amqp, topo, bodies)
    config = settings(topo, batch_size=5, data_output_dir=out)
    async with run_consumer(config) as consumer:
        await lines_reach(out, 8)
        await eventually(lambda: depth_and_unacked(amqp, topo), timeout=15, what="queue settled")
        metrics = (await consumer.http.get("/metrics")).text
    values = Counter(e["value"] for e in written_lines(out))
    assert values == Counter(e["value"] for e in first + other + changed)
    assert 'adp_consumer_duplicates_skipped_total{shard="0"} 3.0' in metrics
