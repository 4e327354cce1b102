"""Freshness: acceptance stamps of deliveries in flight, observed when their batch is durable,
and the oldest unwritten age computed when /metrics is read."""

from __future__ import annotations

from typing import cast

import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import AbstractChannel as RawChannel
from prometheus_client import CollectorRegistry, generate_latest

from services.common.schema import Entry
from services.common.wire import ACCEPTED_HEADER
from services.consumer.batch import Batch, Delivery
from services.consumer.freshness import Freshness


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeChannel:
    is_closed = False


class FakeMessage:
    def __init__(self, headers: dict[str, object]) -> None:
        self.headers = headers


def delivery(count: int, accepted_ms: int | None, channel: FakeChannel | None = None) -> Delivery:
    headers: dict[str, object] = {} if accepted_ms is None else {ACCEPTED_HEADER: accepted_ms}
    message = cast(AbstractIncomingMessage, FakeMessage(headers))
    return Delivery(message, count, channel=cast(RawChannel, channel))


def batch_of(shard: int, *sources: tuple[Delivery, int]) -> Batch:
    batch = Batch(shard)
    for source, count in sources:
        batch.add(source, [Entry(timestamp="2019-10-12T07:20:50Z", value="v")] * count)
    return batch


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, (name, labels, generate_latest(registry).decode())
    return value


def written(freshness: Freshness, batch: Batch) -> None:
    """What the acker does with a written batch: observe, then settle."""
    freshness.durable(batch)
    for source, count, _ in batch.sources:
        source.mark_written(count)


def test_every_shard_exports_both_series_from_the_start() -> None:
    registry = CollectorRegistry()
    Freshness(registry, 3, Clock(1000.0))
    for shard in ("0", "1", "2"):
        assert sample(registry, "adp_consumer_entry_latency_seconds_count", shard=shard) == 0
        assert sample(registry, "adp_consumer_oldest_unwritten_age_seconds", shard=shard) == 0
        bucket = "adp_consumer_entry_latency_seconds_bucket"
        assert sample(registry, bucket, shard=shard, le="0.01") == 0
        assert sample(registry, bucket, shard=shard, le="600.0") == 0
        assert sample(registry, bucket, shard=shard, le="+Inf") == 0


def test_entries_are_observed_once_each_with_their_deliverys_age() -> None:
    registry, clock = CollectorRegistry(), Clock(1000.0)
    freshness = Freshness(registry, 2, clock)
    old, new = delivery(3, 990_000), delivery(2, 999_800)  # accepted 10 s and 0.2 s ago
    freshness.arrived(1, old)
    freshness.arrived(1, new)
    written(freshness, batch_of(1, (old, 3), (new, 2)))
    count = sample(registry, "adp_consumer_entry_latency_seconds_count", shard="1")
    total = sample(registry, "adp_consumer_entry_latency_seconds_sum", shard="1")
    assert count == 5
    assert total == pytest.approx(3 * 10.0 + 2 * 0.2)
    bucket = "adp_consumer_entry_latency_seconds_bucket"
    assert sample(registry, bucket, shard="1", le="0.25") == 2
    assert sample(registry, bucket, shard="1", le="5.0") == 2
    assert sample(registry, bucket, shard="1", le="10.0") == 5
    assert sample(registry, "adp_consumer_entry_latency_seconds_count", shard="0") == 0


def test_the_oldest_unwritten_age_rises_while_nothing_is_written_and_falls_to_zero() -> None:
    registry, clock = CollectorRegistry(), Clock(1000.0)
    freshness = Freshness(registry, 1, clock)
    age = "adp_consumer_oldest_unwritten_age_seconds"
    spanning, later = delivery(4, 999_000), delivery(1, 999_500)
    freshness.arrived(0, spanning)
    freshness.arrived(0, later)
    assert sample(registry, age, shard="0") == 1.0
    clock.now = 1060.0  # a stall: nothing written, the line keeps rising
    assert sample(registry, age, shard="0") == 61.0
    written(freshness, batch_of(0, (spanning, 2)))  # half of it durable: still unwritten
    assert sample(registry, age, shard="0") == 61.0
    written(freshness, batch_of(0, (spanning, 2), (later, 1)))
    assert sample(registry, age, shard="0") == 0.0


def test_deliveries_without_a_stamp_are_not_measured() -> None:
    registry = CollectorRegistry()
    freshness = Freshness(registry, 1, Clock(1000.0))
    unstamped = delivery(2, None)
    freshness.arrived(0, unstamped)
    assert sample(registry, "adp_consumer_oldest_unwritten_age_seconds", shard="0") == 0
    written(freshness, batch_of(0, (unstamped, 2)))
    assert sample(registry, "adp_consumer_entry_latency_seconds_count", shard="0") == 0


def test_a_stamp_from_a_clock_ahead_counts_as_zero_not_negative() -> None:
    registry = CollectorRegistry()
    freshness = Freshness(registry, 1, Clock(1000.0))
    ahead = delivery(1, 1_002_000)  # the API's clock is 2 s ahead of the consumer's
    freshness.arrived(0, ahead)
    assert sample(registry, "adp_consumer_oldest_unwritten_age_seconds", shard="0") == 0
    written(freshness, batch_of(0, (ahead, 1)))
    assert sample(registry, "adp_consumer_entry_latency_seconds_sum", shard="0") == 0
    bucket = "adp_consumer_entry_latency_seconds_bucket"
    assert sample(registry, bucket, shard="0", le="0.01") == 1


def test_a_delivery_whose_channel_died_stops_counting_as_unwritten() -> None:
    registry, channel = CollectorRegistry(), FakeChannel()
    freshness = Freshness(registry, 1, Clock(1000.0))
    freshness.arrived(0, delivery(1, 900_000, channel))
    assert sample(registry, "adp_consumer_oldest_unwritten_age_seconds", shard="0") == 100
    channel.is_closed = True  # the broker redelivers it (with the same stamp)
    assert sample(registry, "adp_consumer_oldest_unwritten_age_seconds", shard="0") == 0


def test_settled_deliveries_are_swept_on_arrival_without_scrapes() -> None:
    freshness = Freshness(CollectorRegistry(), 1, Clock(1000.0))
    for _ in range(10_000):
        one = delivery(1, 999_000)
        freshness.arrived(0, one)
        written(freshness, batch_of(0, (one, 1)))
    assert len(freshness._shards[0].inflight) <= 2 * 256
