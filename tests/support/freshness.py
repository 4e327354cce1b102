"""The consumer's freshness metrics as read from its /metrics text: per shard, the
accepted -> durable histogram and the oldest unwritten age (tests and bench/ read them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

LATENCY = "adp_consumer_entry_latency_seconds"
OLDEST = "adp_consumer_oldest_unwritten_age_seconds"


@dataclass(frozen=True)
class Latency:
    """One shard's (or all shards' summed) figures at one scrape, or between two."""

    count: float
    sum: float
    buckets: tuple[tuple[float, float], ...]  # (le, cumulative count), +Inf last
    oldest_age: float = 0.0

    def since(self, before: Latency) -> Latency:
        """The observations made between `before` and this scrape."""
        return Latency(
            self.count - before.count,
            self.sum - before.sum,
            tuple(
                (le, now - then)
                for (le, now), (_, then) in zip(self.buckets, before.buckets, strict=True)
            ),
            self.oldest_age,
        )

    def plus(self, other: Latency) -> Latency:
        return Latency(
            self.count + other.count,
            self.sum + other.sum,
            tuple((le, a + b) for (le, a), (_, b) in zip(self.buckets, other.buckets, strict=True)),
            max(self.oldest_age, other.oldest_age),
        )

    def at_most(self, seconds: float) -> float:
        """Observations in buckets up to `seconds` (a bucket bound)."""
        return next(count for le, count in self.buckets if le == seconds)

    def quantile(self, q: float) -> float:
        """As PromQL's histogram_quantile: linear within the bucket; the highest finite
        bound if the rank falls in +Inf; NaN without observations."""
        if self.count <= 0:
            return math.nan
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(le):
                    return lower
                inside = cumulative - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 0.0)
            lower, below = le, cumulative
        return lower


def read(text: str) -> dict[int, Latency]:
    """Per shard, from a /metrics text."""
    buckets: dict[int, list[tuple[float, float]]] = {}
    counts: dict[int, float] = {}
    sums: dict[int, float] = {}
    ages: dict[int, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (LATENCY, OLDEST):
            continue
        for sample in family.samples:
            shard = int(sample.labels["shard"])
            if sample.name == f"{LATENCY}_bucket":
                buckets.setdefault(shard, []).append((float(sample.labels["le"]), sample.value))
            elif sample.name == f"{LATENCY}_count":
                counts[shard] = sample.value
            elif sample.name == f"{LATENCY}_sum":
                sums[shard] = sample.value
            elif sample.name == OLDEST:
                ages[shard] = sample.value
    return {
        shard: Latency(
            counts[shard], sums[shard], tuple(sorted(buckets[shard])), ages.get(shard, 0.0)
        )
        for shard in counts
    }


def total(per_shard: dict[int, Latency]) -> Latency:
    """Every shard's observations together (the oldest age: the largest)."""
    shards = list(per_shard.values())
    result = shards[0]
    for other in shards[1:]:
        result = result.plus(other)
    return result
