"""Quorum queues on three nodes against classic queues on one, same machine, same load,
one run: the API's entries/s under wrk (and the bare endpoint's, the ceiling without a
broker), and the consumer draining pre-filled queues.

    python -m bench.cluster_throughput [--duration 6] [--repeat 3] [--sizes 3,100]
                                       [--entries 50000]

Runs on the local cluster (scripts/rabbitmq-cluster.sh, started if it is not up, stopped
again at the end unless --keep): "classic" is classic queues on node n1 alone (the
services given n1's URL only), "quorum" is QUEUE_TYPE=quorum with the services given every
node's URL; the two other nodes run in both cases. Targets are interleaved, `--repeat` times,
and each figure is printed as min/median/max over the repeats, with the broker's CPU
seconds (every node's beam.smp) per 1,000 entries accepted, which is where the quorum
queues' cost goes: each message is written to the Raft log of three nodes, and confirmed
only once two of them have it on disk. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.api_load import measure
from bench.consumer_drain import (
    POLL_SECONDS,
    answers,
    consumer_env,
    delete,
    fill,
    last_on_disk,
    process,
    processed,
    wait_until,
)
from services.common.topology import Topology
from tests.support.cluster import NODES, Cluster, script
from tests.support.net import free_port

SHARDS = 5
STATE = Path(os.environ.get("ADP_CLUSTER_DIR", "/tmp/adp-rabbitmq-cluster"))
TICKS = os.sysconf("SC_CLK_TCK")


def broker_cpu_seconds() -> float:
    """User + system CPU of every node of the local cluster, so far."""
    total = 0.0
    for node in NODES:
        pid = (STATE / node / "pid").read_text().strip()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


@dataclass
class Mode:
    name: str
    url: str
    queue_type: str

    def topology(self, prefix: str) -> Topology:
        return Topology(prefix, SHARDS, queue_type=self.queue_type)  # type: ignore[arg-type]

    @property
    def env(self) -> dict[str, str]:
        return {"RABBITMQ_URL": self.url, "QUEUE_TYPE": self.queue_type}


@dataclass
class Figures:
    runs: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.runs.setdefault(key, []).append(value)

    def spread(self, key: str, fmt: Callable[[float], str] = "{:,.0f}".format) -> str:
        values = self.runs.get(key, [])
        if not values:
            return "-"
        low, mid, high = min(values), statistics.median(values), max(values)
        return f"{fmt(mid)} ({fmt(low)}-{fmt(high)})"

    def median(self, key: str) -> float:
        return statistics.median(self.runs[key])


def api_run(mode: Mode, entries: int, args: argparse.Namespace, figures: Figures) -> None:
    prefix = f"adp_bench_{uuid.uuid4().hex[:8]}_"
    port = free_port()
    env = {
        **mode.env,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "QUEUE_PREFIX": prefix,
        "SHARDS_COUNT": str(SHARDS),
        "LOG_LEVEL": "WARNING",
    }
    script_path = Path(sys.executable).parent / "async-data-processor"
    cpu = broker_cpu_seconds()
    try:
        result = measure("api", [str(script_path), "server"], env, port, entries, args)
    finally:
        cpu = broker_cpu_seconds() - cpu
        asyncio.run(delete(prefix, mode.url.split(",")[0]))
    key = f"api {mode.name} {entries}"
    figures.add(key, result.entries_per_s)
    figures.add(f"{key} p99", result.p99_ms)
    # warm-up and measured runs both published: CPU per entry over both
    accepted = result.entries_per_s * (args.duration + 2)
    figures.add(f"{key} cpu", 1000 * cpu / accepted)


def bare_run(entries: int, args: argparse.Namespace, figures: Figures) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.bare_app", str(port)]
    figures.add(f"bare {entries}", measure("bare", cmd, {}, port, entries, args).entries_per_s)


def drain_run(mode: Mode, args: argparse.Namespace, figures: Figures) -> None:
    prefix = f"adp_bench_{uuid.uuid4().hex[:8]}_"
    first = mode.url.split(",")[0]
    out = Path(tempfile.mkdtemp(prefix="adp-bench-"))
    try:
        asyncio.run(fill(prefix, args.entries, 1, url=first, topology=mode.topology(prefix)))
        cpu = broker_cpu_seconds()
        rate = drain(prefix, args.entries, out, mode)
        cpu = broker_cpu_seconds() - cpu
    finally:
        asyncio.run(delete(prefix, first))
        shutil.rmtree(out, ignore_errors=True)
    figures.add(f"drain {mode.name}", rate)
    figures.add(f"drain {mode.name} cpu", 1000 * cpu / args.entries)


def drain(prefix: str, entries: int, out: Path, mode: Mode) -> float:
    """Entries/s of the real consumer draining the filled queues (BATCH_SIZE 1000, so the
    broker rather than the disk bounds it), timed from its readiness."""
    port = free_port()
    env = consumer_env(
        prefix, out, port, BATCH_SIZE="1000", RABBITMQ_URL=mode.url, QUEUE_TYPE=mode.queue_type
    )
    with process("message-consumer", env) as consumer:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/readyz"), consumer, "ready")
        started = time.time()  # read /metrics seldom; the end is the last rename
        while processed(port) < entries:
            if consumer.poll() is not None:
                raise SystemExit("the consumer exited")
            time.sleep(POLL_SECONDS)
        return entries / (last_on_disk(out) - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--sizes", default="3,100")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--entries", type=int, default=50_000, help="per drain, 1 per message")
    parser.add_argument("--keep", action="store_true", help="leave the cluster up")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    cluster = Cluster.up()
    modes = [
        Mode("classic", cluster.urls[0], "classic"),
        Mode("quorum", cluster.rabbitmq_url, "quorum"),
    ]
    sizes = [int(s) for s in args.sizes.split(",")]
    figures = Figures()
    try:
        for run in range(args.repeat):
            print(f"run {run + 1} of {args.repeat}", file=sys.stderr)
            for entries in sizes:
                bare_run(entries, args, figures)
                for mode in modes if run % 2 == 0 else modes[::-1]:
                    api_run(mode, entries, args, figures)
            for mode in modes if run % 2 == 0 else modes[::-1]:
                drain_run(mode, args, figures)
    finally:
        if not args.keep:
            script("down")
    report(figures, sizes, args)


def report(figures: Figures, sizes: list[int], args: argparse.Namespace) -> None:
    ms = "{:.1f}".format
    cpu = "{:.3f}".format
    print(
        f"medians of {args.repeat} runs (min-max); broker CPU = every node's, s per 1,000 entries"
    )
    print("| load | bare endpoint | classic, 1 node | quorum, 3 nodes | quorum / classic |")
    print("|---|---|---|---|---|")
    for entries in sizes:
        c, q = f"api classic {entries}", f"api quorum {entries}"
        print(
            f"| API, {entries}-entry bodies, entries/s | {figures.spread(f'bare {entries}')} "
            f"| {figures.spread(c)} | {figures.spread(q)} "
            f"| {figures.median(q) / figures.median(c):.0%} |"
        )
        print(
            f"| API, {entries}-entry bodies, p99 ms | | {figures.spread(c + ' p99', ms)} "
            f"| {figures.spread(q + ' p99', ms)} | |"
        )
        print(
            f"| API, {entries}-entry bodies, broker CPU | | {figures.spread(c + ' cpu', cpu)} "
            f"| {figures.spread(q + ' cpu', cpu)} "
            f"| {figures.median(q + ' cpu') / figures.median(c + ' cpu'):.1f}x |"
        )
    print(
        f"| consumer drain, 1-entry messages, BATCH_SIZE 1000, entries/s | "
        f"| {figures.spread('drain classic')} | {figures.spread('drain quorum')} "
        f"| {figures.median('drain quorum') / figures.median('drain classic'):.0%} |"
    )
    print(
        f"| consumer drain, broker CPU | | {figures.spread('drain classic cpu', cpu)} "
        f"| {figures.spread('drain quorum cpu', cpu)} "
        f"| {figures.median('drain quorum cpu') / figures.median('drain classic cpu'):.1f}x |"
    )


if __name__ == "__main__":
    main()
