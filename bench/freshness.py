"""Freshness benchmark: the consumer's own accepted -> durable histogram
(`adp_consumer_entry_latency_seconds`) beside a client-side measure of the same thing, at
half load, in the same run.

    python -m bench.freshness [--seconds 10] [--repeat 3] [--clients 8]
                              [--entries-per-request 10] [--batch-size 5] [--batch-wait 1.0]

Starts the real `server` and `message-consumer` (queues and an output directory of its own),
then per run:
1. capacity: the clients send as fast as they are answered for --seconds; the entries/s
   the consumer writes meanwhile (its backlog never empties) is the ceiling;
2. once that is drained, half load: the same clients paced to half the ceiling for
   --seconds. Each request's send time is kept; an entry's client-side latency is the
   mtime of the batch file holding it (its last write, just before the fsync and rename)
   minus its request's send time — both on this host's clock;
3. the histogram's observations during the half-load run (scraped before and after): p50
   and p99 interpolated within buckets as PromQL's histogram_quantile does, the mean exact
   (`_sum / _count`).
Prints one line per run and the spread (min / median / max) over runs. The two measures
differ by what lies between the client's send and the API's stamp (the HTTP request,
validation), by the fsync and rename after the mtime, and by the bucket interpolation of the
histogram's quantiles. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.api_load import delete_queues, start, wait_http
from tests.support.freshness import Latency, read, total
from tests.support.net import free_port

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
SHARDS = 5


@dataclass
class Run:
    ceiling: float  # entries/s written under saturation
    rate: float  # entries/s offered at half load
    entries: int
    client_p50: float
    client_p99: float
    client_mean: float
    metric_p50: float
    metric_p99: float
    metric_mean: float


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text


def processed(text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("adp_worker_processed_entries_total{")
    )


def body(tag: str, entries: int) -> list[dict[str, str]]:
    return [
        {"timestamp": f"2019-10-12T07:20:{n % 60:02d}.5Z", "value": f"{tag}-{n}"}
        for n in range(entries)
    ]


async def client(
    api: httpx.AsyncClient,
    number: int,
    entries: int,
    until: float,
    interval: float,
    sent: dict[str, float],
) -> int:
    """Send requests until `until` (monotonic), one every `interval` s (0: back to back);
    `sent` gets each request's tag and wall-clock send time. Returns entries accepted."""
    accepted, seq = 0, 0
    next_at = time.monotonic()
    while time.monotonic() < until:
        tag = f"{number}-{seq}-{uuid.uuid4().hex[:6]}"
        seq += 1
        sent[tag] = time.time()
        response = await api.post("/message", json=body(tag, entries))
        if response.status_code != 201:
            raise SystemExit(f"unexpected {response.status_code}: {response.text}")
        accepted += entries
        if interval:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return accepted


async def load(
    api_url: str, clients: int, entries: int, seconds: float, rate: float | None
) -> tuple[int, dict[str, float]]:
    """`clients` clients for `seconds`, paced to `rate` entries/s in all (None: flat out)."""
    interval = clients * entries / rate if rate else 0.0
    sent: dict[str, float] = {}
    until = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as api:
        counts = await asyncio.gather(
            *(client(api, n, entries, until, interval, sent) for n in range(clients))
        )
    return sum(counts), sent


def wait_processed(port: int, target: float, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while processed(scrape(port)) < target:
        if time.monotonic() > deadline:
            raise SystemExit(f"the consumer did not write {target:.0f} entries in {timeout}s")
        time.sleep(0.1)


def client_latencies(out: Path, sent: dict[str, float]) -> list[float]:
    """Per entry of a request in `sent`: its file's mtime minus the request's send time."""
    latencies = []
    for path in out.glob("*.jsonl"):
        mtime = path.stat().st_mtime
        for line in path.read_text().splitlines():
            tag = json.loads(line)["value"].rsplit("-", 1)[0]
            if tag in sent:
                latencies.append(mtime - sent[tag])
    return latencies


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_run(args: argparse.Namespace, api_url: str, consumer_port: int, out: Path) -> Run:
    base = processed(scrape(consumer_port))
    started = time.monotonic()
    accepted, _ = asyncio.run(
        load(api_url, args.clients, args.entries_per_request, args.seconds, None)
    )
    elapsed = time.monotonic() - started
    ceiling = (processed(scrape(consumer_port)) - base) / elapsed
    wait_processed(consumer_port, base + accepted)

    rate = ceiling / 2
    before_text = scrape(consumer_port)
    before, written_before = total(read(before_text)), processed(before_text)
    accepted, sent = asyncio.run(
        load(api_url, args.clients, args.entries_per_request, args.seconds, rate)
    )
    wait_processed(consumer_port, written_before + accepted)
    during: Latency = total(read(scrape(consumer_port))).since(before)
    measured = client_latencies(out, sent)
    if len(measured) != accepted or during.count != accepted:
        raise SystemExit(
            f"{accepted} accepted, {len(measured)} found in files, {during.count:.0f} observed"
        )
    return Run(
        ceiling=ceiling,
        rate=rate,
        entries=accepted,
        client_p50=quantile(measured, 0.5),
        client_p99=quantile(measured, 0.99),
        client_mean=statistics.fmean(measured),
        metric_p50=during.quantile(0.5),
        metric_p99=during.quantile(0.99),
        metric_mean=during.sum / during.count,
    )


def line(run: Run) -> str:
    return (
        f"ceiling {run.ceiling:9,.0f} entries/s | half load {run.rate:8,.0f}/s, "
        f"{run.entries:6,} entries | client p50 {run.client_p50 * 1000:6.0f} ms "
        f"p99 {run.client_p99 * 1000:6.0f} ms mean {run.client_mean * 1000:6.0f} ms | "
        f"metric p50 {run.metric_p50 * 1000:6.0f} ms p99 {run.metric_p99 * 1000:6.0f} ms "
        f"mean {run.metric_mean * 1000:6.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--entries-per-request", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--batch-wait", type=float, default=1.0)
    args = parser.parse_args()

    prefix = f"bench_fresh_{uuid.uuid4().hex[:8]}_"
    api_port, consumer_port = free_port(), free_port()
    script = str(Path(sys.executable).parent / "async-data-processor")
    common = {
        "RABBITMQ_URL": RABBITMQ_URL,
        "QUEUE_PREFIX": prefix,
        "SHARDS_COUNT": str(SHARDS),
        "LOG_LEVEL": "WARNING",
    }
    with tempfile.TemporaryDirectory(prefix="adp-bench-fresh-") as scratch:
        out = Path(scratch) / "out"
        api = start([script, "server"], {**common, "PORT": str(api_port), "HOST": "127.0.0.1"})
        consumer = start(
            [script, "message-consumer"],
            {
                **common,
                "DATA_OUTPUT_DIR": str(out),
                "METRICS_PORT": str(consumer_port),
                "METRICS_HOST": "127.0.0.1",
                "BATCH_SIZE": str(args.batch_size),
                "BATCH_MAX_WAIT_SECONDS": str(args.batch_wait),
                "HISTORY_LOG_INTERVAL_SECONDS": "0",
            },
        )
        try:
            api_url = f"http://127.0.0.1:{api_port}"
            wait_http(f"{api_url}/readyz")
            wait_http(f"http://127.0.0.1:{consumer_port}/readyz")
            print(
                f"BATCH_SIZE {args.batch_size}, BATCH_MAX_WAIT_SECONDS {args.batch_wait:g}, "
                f"{args.clients} clients x {args.entries_per_request} entries a request, "
                f"{args.seconds:g} s per phase"
            )
            runs = []
            for _ in range(args.repeat):
                runs.append(one_run(args, api_url, consumer_port, out))
                print(line(runs[-1]), flush=True)
        finally:
            for process in (api, consumer):
                process.terminate()
                process.wait(30)
            asyncio.run(delete_queues(prefix))
    print("spread over runs (min / median / max):")
    for field in ("ceiling", "rate", "client_p50", "metric_p50", "client_p99", "metric_p99"):
        values = [getattr(run, field) for run in runs]
        scale, unit = (1, "entries/s") if field in ("ceiling", "rate") else (1000, "ms")
        spread = [min(values), statistics.median(values), max(values)]
        print(f"  {field:11}", " / ".join(f"{v * scale:9,.0f}" for v in spread), unit)


if __name__ == "__main__":
    main()
