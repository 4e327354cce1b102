"""The output layout through the real `message-consumer` process: a bad
OUTPUT_PATH_TEMPLATE is refused at start-up, and kill -9 mid-stream with a template and
compression on loses nothing and, with the ledger, writes nothing twice."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from services.common.topology import Topology
from tests.support.net import free_port
from tests.support.output import (
    HIVE,
    batch_files,
    by_directory,
    hive_directory,
    output_lines,
    spread_entries,
    tool_check,
)
from tests.support.process import (
    E2E_BATCHES,
    ServiceProcess,
    console_script,
    consumer_env,
    kill_9_rounds,
    until_drained,
)
from tests.support.publish import feed

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq]


@pytest.mark.parametrize(
    "template",
    [
        "date={date}/{hour}",  # an unknown field
        "/var/data/{year}",  # absolute
        "{year}/../{month}",  # climbs out
        "{year}/.hidden",  # a part starting with "."
    ],
)
def test_a_bad_template_is_refused_at_start_up_with_status_2(template: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OUTPUT_PATH_TEMPLATE": template,
        "DATA_OUTPUT_DIR": str(tmp_path / "out"),
        "METRICS_PORT": str(free_port()),
    }
    done = subprocess.run(
        [console_script(), "message-consumer"], env=env, capture_output=True, timeout=30
    )
    assert done.returncode == 2, done
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "OUTPUT_PATH_TEMPLATE" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before touching anything


async def test_kill_9_with_a_template_and_zstd_loses_nothing_and_duplicates_nothing(
    topology: Callable[..., Topology], amqp: AbstractConnection, tmp_path: Path, rabbitmq_url: str
) -> None:
    topo = topology()
    out = tmp_path / "out"
    port = free_port()
    env = {
        **consumer_env(topo, out, port, rabbitmq_url, **E2E_BATCHES),
        "OUTPUT_PATH_TEMPLATE": HIVE,
        "OUTPUT_COMPRESSION": "zstd",
        "EXACTLY_ONCE": "true",
    }
    total = 4000
    feeding = asyncio.create_task(feed(amqp, topo, total, "zkill", spread_entries))
    await kill_9_rounds(env, port, tmp_path, lambda: len(output_lines(out)), timeout=20)
    await feeding
    with ServiceProcess("message-consumer", env, tmp_path / "final.log") as proc:
        await until_drained(proc, port, amqp, topo, lambda: len(output_lines(out)), total, 40)
        assert await asyncio.to_thread(proc.wait, 15) == 0, proc.log
    sent = spread_entries(total, "zkill")
    written = Counter(e["value"] for e in output_lines(out))
    assert set(written) == {e["value"] for e in sent}  # none lost
    assert [v for v, n in written.items() if n > 1] == []  # none twice: the ledger
    expected = {e["value"]: hive_directory(e, topo.shards_count) for e in sent}
    for directory, entries in by_directory(out).items():
        assert {expected[e["value"]] for e in entries} == {directory}
    files = list(batch_files(out))
    problems = await asyncio.to_thread(lambda: [(p, tool_check(p)) for p in files])
    assert [(p, why) for p, why in problems if why is not None] == []
    assert [p for p in out.rglob(".*.tmp")] == []  # the restarts cleaned up every directory
