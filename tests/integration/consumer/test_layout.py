"""The output layout against the real RabbitMQ, in-process: OUTPUT_PATH_TEMPLATE's
directories, OUTPUT_COMPRESSION's files (checked with the standard tools), BATCH_MAX_BYTES,
and the bound on open batches."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from services.common.topology import Topology
from services.consumer.batch import MAX_OPEN_BATCHES
from services.consumer.encoding import SUFFIXES, Compression, json_lines
from tests.integration.consumer.conftest import Settings
from tests.support.consumer import lines_reach, run_consumer
from tests.support.output import (
    HIVE,
    batch_files,
    by_directory,
    file_lines,
    hive_directory,
    output_lines,
    spread_entries,
    tool_check,
)
from tests.support.polling import eventually
from tests.support.publish import publish
from tests.support.queues import queue_counts

pytestmark = pytest.mark.rabbitmq


async def all_written(root: Path, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    """Every entry under `root` (the layout's files, nested and compressed) once `count`."""
    return await lines_reach(root, count, timeout, read=output_lines)


async def acked(topo: Topology) -> bool:
    counts = await queue_counts()
    return not any(sum(counts.get(name, (0, 0))) for name in topo.queue_names)


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
async def test_entries_land_in_their_utc_hours_directories_once_and_compressed(
    settings: Settings,
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    compression: Compression,
) -> None:
    """Entries over two UTC dates and four hours, some with offsets that change the date:
    each lands in its (date, hour, shard) directory, exactly once, in files of at most
    BATCH_SIZE lines, each of which the standard tool checks whole."""
    topo = topology()
    sent = spread_entries(700, f"layout-{compression}")
    config = settings(topo, batch_size=7, output_path_template=HIVE, output_compression=compression)
    async with run_consumer(config):
        await publish(amqp, topo, sent, per_message=3)
        await all_written(config.data_output_dir, len(sent))
        await eventually(lambda: acked(topo), timeout=10, what="every message acked")
    root = config.data_output_dir
    found = by_directory(root)
    expected: dict[str, list[str]] = {}
    for entry in sent:
        expected.setdefault(hive_directory(entry, topo.shards_count), []).append(entry["value"])
    assert {d: Counter(e["value"] for e in got) for d, got in found.items()} == {
        d: Counter(values) for d, values in expected.items()
    }
    assert {d.split("/")[0] for d in found} == {"date=2019-10-12", "date=2019-10-13"}
    assert len({d.rsplit("/", 1)[0] for d in found}) == 4  # (date, hour) pairs
    files = list(batch_files(root))
    assert all(f.name.endswith(SUFFIXES[compression]) for f in files)
    assert all(len(file_lines(f)) <= 7 for f in files)
    if compression != "none":
        problems = await asyncio.to_thread(lambda: [(p, tool_check(p)) for p in files])
        assert [(p, why) for p, why in problems if why is not None] == []
    # Nothing else anywhere: no temporary file left, the consumer's own only at the root.
    leftovers = [p for p in root.rglob(".*") if p.parent != root and ".ledger" not in p.parts]
    assert leftovers == []


async def test_byte_bound_holds_for_every_file(
    settings: Settings, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    topo = topology(shards_count=2)
    sent = [
        {"timestamp": f"2019-10-12T07:20:{i % 60:02d}Z", "value": f"b-{i}-" + "x" * (i * 37 % 400)}
        for i in range(400)
    ]
    sent.append({"timestamp": "2019-10-12T07:20:00Z", "value": "huge-" + "y" * 5000})
    config = settings(topo, batch_size=50, batch_max_bytes=1000, output_compression="zstd")
    async with run_consumer(config):
        await publish(amqp, topo, sent, per_message=10)
        await all_written(config.data_output_dir, len(sent))
        await eventually(lambda: acked(topo), timeout=10, what="every message acked")
    sizes = []
    for path in batch_files(config.data_output_dir):
        lines = file_lines(path)
        size = len(json_lines(lines))  # type: ignore[arg-type]
        assert size <= 1000 or len(lines) == 1, (path, size, len(lines))
        sizes.append(size)
    assert max(sizes) > 5000  # the huge one, alone and whole
    assert Counter(e["value"] for e in output_lines(config.data_output_dir)) == Counter(
        e["value"] for e in sent
    )


async def test_many_distinct_hours_at_once_stay_within_the_open_batch_bound(
    settings: Settings, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    """A backlog scattered over 300 hours, in one shard: the batcher never holds more than
    MAX_OPEN_BATCHES batches open (it seals the oldest), and every entry still lands in its
    hour's directory, once."""
    topo = topology(shards_count=1)
    sent = [
        {"timestamp": f"2019-10-{1 + h // 24:02d}T{h % 24:02d}:00:{i % 60:02d}Z", "value": f"h-{i}"}
        for i in range(1500)
        for h in [(i * 7919) % 300]
    ]
    config = settings(
        topo, batch_size=50, batch_max_wait_seconds=5, output_path_template="{day}/{hour}"
    )
    await publish(amqp, topo, sent, per_message=20)
    async with run_consumer(config) as consumer:
        await all_written(config.data_output_dir, len(sent))
        [batcher] = consumer.service.batchers
        peak = batcher.peak_open
    assert peak == MAX_OPEN_BATCHES  # reached, never passed
    found = by_directory(config.data_output_dir)
    assert len(found) == 300
    for directory, got in found.items():
        day, hour = directory.split("/")
        assert {e["timestamp"][8:13] for e in got} == {f"{day}T{hour}"}
    assert sorted(e["value"] for es in found.values() for e in es) == sorted(
        e["value"] for e in sent
    )


async def test_an_entry_naming_no_instant_makes_its_message_poison_under_a_template(
    settings: Settings, topology: Callable[..., Topology], amqp: AbstractConnection
) -> None:
    """The API refuses 2019-02-30; a hand-published message may hold it. Under a template
    it has no directory: the message goes to the dead-letter queue with the reason (nothing
    is lost), and the shard keeps flowing."""
    topo = topology(shards_count=1)
    config = settings(topo, output_path_template=HIVE)
    bad = b'[{"timestamp": "2019-10-12T07:20:50Z"}, {"timestamp": "2019-02-30T07:20:50Z"}]'
    async with amqp.channel() as channel:
        await topo.declare(channel)
        await channel.default_exchange.publish(
            aio_pika.Message(bad, message_id="no-instant"), routing_key=topo.queue_name(0)
        )
    good = spread_entries(14, "after")
    await publish(amqp, topo, good, per_message=7)
    async with run_consumer(config):
        await all_written(config.data_output_dir, len(good))
        await eventually(lambda: acked(topo), timeout=10, what="every message settled")
    assert sorted(e["value"] for e in output_lines(config.data_output_dir)) == sorted(
        e["value"] for e in good
    )
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(topo.dead_letter_queue, passive=True)
        message = await queue.get(fail=False, no_ack=True)
    assert message is not None
    assert (message.message_id, message.body) == ("no-instant", bad)
    reason = str(message.headers["x-adp-reason"])
    assert "entry 1: timestamp: not a real instant" in reason, reason
