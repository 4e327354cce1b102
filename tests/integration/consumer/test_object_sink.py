"""The object-store sink (OUTPUT_URL=s3://bucket/prefix) against a real SeaweedFS server and
the real broker, in-process: objects with the file sink's names, layout and compression
under the prefix, exactly once; a client's keyed retry written once, by the same process
or another replica sharing the bucket (the ledger lives in the bucket); the store stopped
and started again under load; a missing bucket refused at start-up."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from services.common.topology import Topology
from services.common.wire import key_id, part_spec, request_key
from services.consumer.encoding import SUFFIXES
from services.consumer.object_store import BucketMissing
from tests.integration.consumer.conftest import Settings
from tests.support.consumer import run_consumer
from tests.support.output import HIVE, hive_directory, spread_entries
from tests.support.polling import eventually
from tests.support.publish import entries, publish, publish_parts
from tests.support.queues import queue_counts
from tests.support.seaweed import CREDENTIALS, SeaweedServer, all_entries, object_entries

pytestmark = pytest.mark.rabbitmq


async def acked(topo: Topology) -> bool:
    counts = await queue_counts()
    return not any(sum(counts.get(name, (0, 0))) for name in topo.queue_names)


async def objects_reach(seaweed: SeaweedServer, url: str, count: int, timeout: float = 40) -> None:
    store = seaweed.store(url)

    async def enough() -> bool:
        return len(await asyncio.to_thread(all_entries, store)) >= count

    await eventually(enough, timeout=timeout, what=f"{count} entries in objects under {url}")


async def test_entries_land_in_objects_under_the_prefix_once_with_the_files_layout(
    settings: Settings,
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    seaweed: SeaweedServer,
    bucket: str,
    tmp_path: Path,
) -> None:
    topo = topology()
    url = f"s3://{bucket}/out/v1"
    sent = spread_entries(600, "obj")
    config = settings(
        topo, batch_size=7, output_path_template=HIVE, output_compression="zstd",
        output_url=url, s3_endpoint_url=seaweed.endpoint,
    )  # fmt: skip
    async with run_consumer(config) as consumer:
        await publish(amqp, topo, sent, per_message=3)
        await objects_reach(seaweed, url, len(sent))
        await eventually(lambda: acked(topo), timeout=10, what="every message acked")
        metrics = (await consumer.http.get("/metrics")).text
    found = object_entries(seaweed.store(url))
    values = Counter(e["value"] for objs in found.values() for e in objs)
    assert values == Counter(e["value"] for e in sent)  # every entry, once
    expected = {e["value"]: hive_directory(e, topo.shards_count) for e in sent}
    for key, objs in found.items():
        directory, _, name = key.rpartition("/")
        assert name.startswith("testhost_"), key
        assert name.endswith(SUFFIXES["zstd"]), key
        assert {expected[e["value"]] for e in objs} == {directory}
        assert len(objs) <= 7
    everything = [key for key, _ in seaweed.store(f"s3://{bucket}").keys("")]
    assert all(key.startswith("out/v1/") for key in everything), everything
    assert any(key.startswith("out/v1/.ledger/testhost/") for key in everything)
    assert not (tmp_path / "out").exists()  # no local volume used
    assert "adp_consumer_object_put_seconds_count" in metrics


def keyed_bodies() -> tuple[list[tuple[bytes, str]], list[dict[str, str]]]:
    """A keyed request and its client's retry (grouped behind another request's part):
    the bodies, and the entries expected once each."""
    first = entries(3, "keyed")
    other = entries(2, "other")
    part = json.dumps(first).encode()
    kid = key_id(request_key(b"order-17", part), part)
    bodies = [
        (part, part_spec(3, kid)),
        (json.dumps(other + first).encode(), f"{part_spec(2, None)},{part_spec(3, kid)}"),
    ]
    return bodies, first + other


@pytest.mark.parametrize("after", ["same-process", "other-replica"])
async def test_a_clients_keyed_retry_is_written_once_with_the_ledger_in_the_bucket(
    settings: Settings,
    topology: Callable[..., Topology],
    amqp: AbstractConnection,
    seaweed: SeaweedServer,
    bucket: str,
    after: str,
) -> None:
    topo = topology(shards_count=1)
    url = f"s3://{bucket}/keyed"
    bodies, expected = keyed_bodies()
    first_config = settings(topo, batch_size=5, output_url=url, s3_endpoint_url=seaweed.endpoint)
    if after == "same-process":
        await publish_parts(amqp, topo, bodies)
        async with run_consumer(first_config):
            await objects_reach(seaweed, url, len(expected))
            await eventually(lambda: acked(topo), timeout=15, what="queue settled")
    else:
        await publish_parts(amqp, topo, bodies[:1])
        async with run_consumer(first_config):
            await objects_reach(seaweed, url, 3)
            await eventually(lambda: acked(topo), timeout=15, what="first attempt acked")
        # Another replica (another host name, no volume shared: only the bucket) gets the retry.
        await publish_parts(amqp, topo, bodies[1:])
        replica = settings(
            topo, batch_size=5, output_url=url, s3_endpoint_url=seaweed.endpoint,
            host_name="replica2",
        )  # fmt: skip
        async with run_consumer(replica) as consumer:
            await objects_reach(seaweed, url, len(expected))
            await eventually(lambda: acked(topo), timeout=15, what="retry acked")
            metrics = (await consumer.http.get("/metrics")).text
        assert 'adp_consumer_duplicates_skipped_total{shard="0"} 3.0' in metrics
    values = Counter(e["value"] for e in all_entries(seaweed.store(url)))
    assert values == Counter(e["value"] for e in expected)


async def test_a_missing_bucket_is_a_clear_start_up_error(
    settings: Settings, topology: Callable[..., Topology], seaweed: SeaweedServer
) -> None:
    config = settings(
        topology(), output_url="s3://adp-no-such-bucket/x", s3_endpoint_url=seaweed.endpoint
    )
    with pytest.raises(BucketMissing, match=r"adp-no-such-bucket.*does not exist"):
        async with run_consumer(config):
            pass


async def test_wrong_credentials_mean_not_ready_with_a_clear_log_line(
    settings: Settings,
    topology: Callable[..., Topology],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A store of its own that checks credentials (an identity in -s3.config): the
    consumer with a wrong secret starts, is not ready, and says why in one line — without
    the secret."""
    identities = tmp_path / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "adp",
                        "credentials": [
                            {"accessKey": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                             "secretKey": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
                        ],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )  # fmt: skip
    store = SeaweedServer(tmp_path / "weed", (f"-s3.config={identities}",))
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    await asyncio.to_thread(store.start)
    try:
        store.create_bucket("adp-creds")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-wrong-secret")
        config = settings(topology(), output_url="s3://adp-creds/x", s3_endpoint_url=store.endpoint)
        async with run_consumer(config) as consumer:

            async def connected_but_not_ready() -> str | None:
                ready = await consumer.http.get("/readyz")
                assert ready.status_code == 503, ready.text
                return ready.text if "s3://adp-creds/x" in ready.text else None

            await eventually(connected_but_not_ready, timeout=15, what="not ready for the output")
        lines = [r.getMessage() for r in caplog.records if "credentials refused" in r.getMessage()]
        assert lines, [r.getMessage() for r in caplog.records]
        assert all("a-wrong-secret" not in r.getMessage() for r in caplog.records)
    finally:
        await asyncio.to_thread(store.stop)
