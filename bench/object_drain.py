"""Object-storage benchmark: the real `async-data-processor message-consumer` draining
pre-filled queues into a real SeaweedFS (OUTPUT_URL, the ledger in the bucket) beside the
file sink (DATA_OUTPUT_DIR on the local disk) and the bare consumer that acks without
writing (the ceiling), at BATCH_SIZE 5 and 1000, in the same run. Reported: drain rate
(entries/s from connected until every entry is processed) and the p99 of a batch's write
(seal to durable: PUT, or write + sync + rename; from the consumer's own histogram,
interpolated within its bucket), min/median/max over runs.

    python -m bench.object_drain [--runs 3] [--per-message 100]
                                 [--entries-small 20000] [--entries-large 200000]

EXACTLY_ONCE is on (the default) for both sinks. SeaweedFS runs on loopback (one
`weed server`, its data on the same disk as the files): no network between the consumer and
the store, so a real S3's round trips (tens of ms) are not in these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench.consumer_drain import process
from bench.layout_drain import (
    RABBITMQ_URL,
    SHARDS,
    _get,
    delete,
    drain_bare,
    drain_rate,
    event_bodies,
    fill,
    spread,
)
from tests.support.net import free_port
from tests.support.seaweed import CREDENTIALS, SeaweedServer


@dataclass
class Results:
    rates: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)


def p99(metrics: str, name: str = "adp_consumer_batch_write_duration_seconds") -> float:
    buckets: list[tuple[float, float]] = []
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    total = buckets[-1][1]
    rank = 0.99 * total
    low, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return low
            return low + (bound - low) * (rank - below) / max(count - below, 1e-9)
        low, below = bound, count
    return low


def drain(prefix: str, entries: int, batch_size: int, extra: dict[str, str]) -> tuple[float, float]:
    port = free_port()
    env = {
        **os.environ,
        "RABBITMQ_URL": RABBITMQ_URL,
        "QUEUE_PREFIX": prefix,
        "SHARDS_COUNT": str(SHARDS),
        "METRICS_PORT": str(port),
        "BATCH_SIZE": str(batch_size),
        "BATCH_MAX_WAIT_SECONDS": "0.1",
        "LOG_LEVEL": "WARNING",
        "HISTORY_LOG_INTERVAL_SECONDS": "0",
        **extra,
    }
    with process("message-consumer", env) as proc:
        rate = drain_rate(proc, port, entries)
        return rate, p99(_get(port, "/metrics") or "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--per-message", type=int, default=100)
    parser.add_argument("--entries-small", type=int, default=20_000, help="at BATCH_SIZE 5")
    parser.add_argument("--entries-large", type=int, default=200_000, help="at BATCH_SIZE 1000")
    args = parser.parse_args()
    sizes = {5: args.entries_small, 1000: args.entries_large}
    bodies = {b: event_bodies(n, args.per_message) for b, n in sizes.items()}
    work = Path(tempfile.mkdtemp(prefix="adp-bench-objects-"))
    store = SeaweedServer(work / "weed")
    os.environ.update(CREDENTIALS)
    store.start()
    sinks = ("bare", "file", "seaweedfs")
    results = {(sink, b): Results() for sink in sinks for b in sizes}
    try:
        for run in range(args.runs):
            for b, entries in sizes.items():
                for sink in sinks:
                    prefix = f"adp_bench_{uuid.uuid4().hex[:8]}_"
                    out = work / f"out-{prefix}"
                    try:
                        asyncio.run(fill(prefix, bodies[b]))
                        r = results[(sink, b)]
                        if sink == "bare":
                            r.rates.append(drain_bare(prefix, len(bodies[b]), entries, b))
                        else:
                            extra = {"DATA_OUTPUT_DIR": str(out)}
                            if sink == "seaweedfs":
                                bucket = f"adp-bench-{uuid.uuid4().hex[:8]}"
                                store.create_bucket(bucket)
                                extra |= {"OUTPUT_URL": f"s3://{bucket}/b",
                                          "S3_ENDPOINT_URL": store.endpoint}  # fmt: skip
                            rate, latency = drain(prefix, entries, b, extra)
                            r.rates.append(rate)
                            r.p99s.append(latency * 1000)
                        print(f"run {run + 1} {sink} {b}: {r.rates[-1]:,.0f} entries/s",
                              file=sys.stderr)  # fmt: skip
                    finally:  # the files stay until the end (bench.disk_limit says why)
                        asyncio.run(delete(prefix))
    finally:
        store.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.per_message} entries per message; min / median / max over {args.runs} runs")
    print(
        "| sink | BATCH_SIZE | entries | entries/s | share of bare (median) | p99 batch write ms |"
    )
    print("|---|---|---|---|---|---|")
    for b in sizes:
        bare = statistics.median(results[("bare", b)].rates)
        for sink in sinks:
            r = results[(sink, b)]
            shown = spread(r.p99s, 1) if r.p99s else "-"
            print(
                f"| {sink} | {b} | {sizes[b]:,} | {spread(r.rates)} | "
                f"{statistics.median(r.rates) / bare:.0%} | {shown} |"
            )


if __name__ == "__main__":
    main()
