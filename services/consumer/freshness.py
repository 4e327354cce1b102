"""Freshness: how long from an entry's acceptance by the API until its batch file is durable.

The API stamps every message with when its entries were accepted (`wire.ACCEPTED_HEADER`).
Per shard, this keeps the acceptance time of each delivery in flight — arrived, not every
entry of it durable yet — and exports, computed when /metrics is read:

- `adp_consumer_entry_latency_seconds`, a histogram of accepted -> durable, one observation
  per entry: when a batch has been written (renamed, directory fsynced: just before its
  acks), each of its entries counts with its delivery's age. Entries the ledger found
  already written (a redelivery) count when their batch settles them;
- `adp_consumer_oldest_unwritten_age_seconds`, the age of the oldest delivery in flight (0
  when none), so a stalled shard shows a rising line while nothing is written.

Deliveries without the stamp (the Go original's messages, hand-published ones) are not
measured. A delivery leaves the set when it is complete or its channel is gone (the broker
redelivers it, and the redelivery carries the same stamp).

Clock skew: the stamp is the API pod's wall clock, the age the consumer pod's. A consumer
clock ahead adds its lead to every figure; one behind takes its lag off, and an age that
would be negative counts as 0 — a p50 pinned near 0, below the batch wait, means the
clocks disagree (check NTP on the nodes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from services.common.wire import ACCEPTED_HEADER, parse_accepted
from services.consumer.batch import Batch, Delivery

# Seconds: from a batch wait's worth (BATCH_MAX_WAIT_SECONDS) to a 10-minute stall. Finer
# from 50 ms to 2.5 s, where a healthy pipeline lives, so the quantiles PromQL interpolates
# within a bucket stay close to the true ones; 60 is the output-stale alert's default
# threshold, so a p99 there is exact.
FRESHNESS_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.35,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# A delivery leaves the in-flight set when the batch completing it is durable. Those whose
# channel died (and any completed otherwise) are swept out on each scrape, and on arrival
# whenever the set has doubled since the last sweep, so it stays bounded unscraped.
SWEEP_MIN = 256


class _Shard:
    __slots__ = ("buckets", "count", "inflight", "sum", "sweep_at")

    def __init__(self) -> None:
        self.inflight: dict[Delivery, float] = {}  # delivery -> accepted, epoch seconds
        self.buckets = [0] * len(FRESHNESS_BUCKETS)  # not cumulative; +Inf is `count`
        self.count = 0
        self.sum = 0.0
        self.sweep_at = SWEEP_MIN

    def sweep(self) -> None:
        for delivery in [d for d in self.inflight if d.complete or d.stale]:
            del self.inflight[delivery]


class Freshness:
    """The freshness metric set (a collector on `registry`); `arrived` and `durable` are its
    two hooks, at the intake and where written batches are settled."""

    def __init__(
        self,
        registry: CollectorRegistry,
        shards: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._shards = [_Shard() for _ in range(shards)]
        registry.register(self)

    def arrived(self, shard: int, delivery: Delivery) -> None:
        accepted = parse_accepted(delivery.message.headers.get(ACCEPTED_HEADER))
        if accepted is None:
            return
        state = self._shards[shard]
        state.inflight[delivery] = accepted
        if len(state.inflight) >= state.sweep_at:
            state.sweep()
            state.sweep_at = max(SWEEP_MIN, 2 * len(state.inflight))

    def durable(self, batch: Batch) -> None:
        """`batch` is durable now: each entry it settles is observed once, weighted in one
        step (an observation per entry, without a call per entry)."""
        state = self._shards[batch.shard]
        if not state.inflight:
            return
        now = self._clock()
        for delivery, count, _ in batch.sources:
            accepted = state.inflight.get(delivery)
            if accepted is None or count <= 0:
                continue
            if delivery.pending <= count:  # this batch completes it (its acks go out next)
                del state.inflight[delivery]
            age = max(0.0, now - accepted)
            for index, bound in enumerate(FRESHNESS_BUCKETS):
                if age <= bound:
                    state.buckets[index] += count
                    break
            state.count += count
            state.sum += age * count

    def oldest_age(self, shard: int) -> float:
        """Seconds since the oldest in-flight delivery of `shard` was accepted; 0 if none."""
        state = self._shards[shard]
        state.sweep()
        if not state.inflight:
            return 0.0
        return max(0.0, self._clock() - min(state.inflight.values()))

    def collect(self) -> Iterator[Metric]:
        latency = HistogramMetricFamily(
            "adp_consumer_entry_latency_seconds",
            "Time from the API's acceptance of an entry (x-adp-accepted-ms) until its batch "
            "file was durable, by shard; one observation per entry.",
            labels=["shard"],
        )
        oldest = GaugeMetricFamily(
            "adp_consumer_oldest_unwritten_age_seconds",
            "Age of the oldest entry delivered but not yet durably written, by shard (0 when "
            "none).",
            labels=["shard"],
        )
        for shard, state in enumerate(self._shards):
            cumulative, running = [], 0
            for bound, count in zip(FRESHNESS_BUCKETS, state.buckets, strict=True):
                running += count
                cumulative.append((_bound(bound), float(running)))
            cumulative.append(("+Inf", float(state.count)))
            latency.add_metric([str(shard)], cumulative, state.sum)
            oldest.add_metric([str(shard)], self.oldest_age(shard))
        yield latency
        yield oldest


def _bound(value: float) -> str:
    """An `le` label as prometheus_client writes it (`1.0`, `0.01`)."""
    return repr(float(value))
