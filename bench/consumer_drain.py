"""Consumer drain benchmark: pre-fill the shard queues, then time the real
`async-data-processor message-consumer` draining them to batch files, against a bare
aio-pika consumer that acks without writing (the ceiling), in the same run.

    python -m bench.consumer_drain [--entries 200000] [--per-message 1,100]
                                   [--batch-sizes 5,1000] [--backlog 1000000]
                                   [--exactly-once on,off]

Prints entries/s per case — with the ledger (EXACTLY_ONCE=true, the default) and without,
which is the ledger's cost — the share of the bare consumer's rate, and the consumer's RSS
sampled while a large backlog (--backlog entries) waits and drains. Queues and files it
makes are deleted. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import aio_pika

from bench.api_load import body
from services.common.topology import Topology
from services.common.wire import PARTS_HEADER
from tests.support.net import free_port

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
SHARDS = 5


async def fill(
    prefix: str,
    entries: int,
    per_message: int,
    *,
    url: str = RABBITMQ_URL,
    topology: Topology | None = None,
) -> int:
    """Publish `entries` entries in messages of `per_message`, spread over the shards
    (declared as `topology` says; classic queues by default)."""
    payload = body(per_message).encode()
    messages = entries // per_message
    connection = await aio_pika.connect(url)
    async with connection, connection.channel(publisher_confirms=True) as channel:
        await (topology or Topology(prefix, SHARDS)).declare(channel)
        for start in range(0, messages, 1000):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            payload,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            message_id=uuid.uuid4().hex,  # as the API sends: the ledger
                            headers={PARTS_HEADER: str(per_message)},  # records its parts
                        ),
                        routing_key=f"{prefix}{i % SHARDS}",
                    )
                    for i in range(start, min(start + 1000, messages))
                )
            )
    return messages


async def delete(prefix: str, url: str = RABBITMQ_URL) -> None:
    connection = await aio_pika.connect(url)
    async with connection, connection.channel() as channel:
        for shard in range(SHARDS):
            await channel.queue_delete(f"{prefix}{shard}")
        await channel.queue_delete(f"{prefix}dead")


def processed(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("adp_worker_processed_entries_total{")
    )


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drain_consumer(
    prefix: str,
    entries: int,
    batch_size: int,
    out: Path,
    sample_rss: bool = False,
    exactly_once: bool = True,
    *,
    url: str = RABBITMQ_URL,
    extra: dict[str, str] | None = None,
) -> tuple[float, list[float]]:
    port = free_port()
    env = {
        **os.environ,
        "RABBITMQ_URL": url,
        "QUEUE_PREFIX": prefix,
        "SHARDS_COUNT": str(SHARDS),
        "DATA_OUTPUT_DIR": str(out),
        "METRICS_PORT": str(port),
        "BATCH_SIZE": str(batch_size),
        "LOG_LEVEL": "WARNING",
        "HISTORY_LOG_INTERVAL_SECONDS": "0",
        "EXACTLY_ONCE": str(exactly_once).lower(),
        **(extra or {}),
    }
    script = Path(sys.executable).parent / "async-data-processor"
    proc = subprocess.Popen(
        [str(script), "message-consumer"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples: list[float] = []
    try:
        while not ready(port):  # connected: timed from here, as the bare consumer is
            if proc.poll() is not None:
                raise SystemExit("the consumer exited")
            time.sleep(0.005)
        started = time.monotonic()
        while processed(port) < entries:
            if proc.poll() is not None:
                raise SystemExit("the consumer exited")
            if sample_rss:
                samples.append(rss_mib(proc.pid))
            time.sleep(0.5 if sample_rss else 0.02)
        elapsed = time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(30)
    return entries / elapsed, samples


def drain_bare(prefix: str, messages: int, entries: int, prefetch: int) -> float:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bare_consumer",
            RABBITMQ_URL,
            prefix,
            str(SHARDS),
            str(prefetch),
            str(messages),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return entries / float(out.strip())


def prefetch_for(batch_size: int) -> int:
    return min(10_000, max(32, 2 * batch_size * 4))  # the consumer's default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--per-message", default="1,100")
    parser.add_argument("--batch-sizes", default="5,1000")
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--exactly-once", default="on,off")
    args = parser.parse_args()
    modes = [mode == "on" for mode in args.exactly_once.split(",")]
    rows = []
    for per_message in (int(x) for x in args.per_message.split(",")):
        for batch_size in (int(x) for x in args.batch_sizes.split(",")):
            prefix = f"adp_bench_{uuid.uuid4().hex[:8]}_"
            try:
                messages = asyncio.run(fill(prefix, args.entries, per_message))
                bare = drain_bare(prefix, messages, args.entries, prefetch_for(batch_size))
                for exactly_once in modes:
                    out = Path(tempfile.mkdtemp(prefix="adp-bench-"))
                    try:
                        asyncio.run(fill(prefix, args.entries, per_message))
                        rate, _ = drain_consumer(
                            prefix, args.entries, batch_size, out, exactly_once=exactly_once
                        )
                        files = len(list(out.glob("*.jsonl")))
                    finally:
                        shutil.rmtree(out, ignore_errors=True)
                    rows.append((per_message, batch_size, exactly_once, bare, rate, files))
            finally:
                asyncio.run(delete(prefix))
    print(
        f"{'entries/msg':>11} {'BATCH_SIZE':>10} {'ledger':>6} {'bare e/s':>10} "
        f"{'consumer e/s':>12} {'share':>6} {'files':>7}"
    )
    for per_message, batch_size, exactly_once, bare, rate, files in rows:
        print(
            f"{per_message:>11} {batch_size:>10} {'on' if exactly_once else 'off':>6} "
            f"{bare:>10.0f} {rate:>12.0f} {rate / bare:>6.0%} {files:>7}"
        )
    if args.backlog:
        prefix = f"adp_bench_{uuid.uuid4().hex[:8]}_"
        out = Path(tempfile.mkdtemp(prefix="adp-bench-"))
        try:
            asyncio.run(fill(prefix, args.backlog, 100))
            rate, samples = drain_consumer(prefix, args.backlog, 5, out, sample_rss=True)
        finally:
            asyncio.run(delete(prefix))
            shutil.rmtree(out, ignore_errors=True)
        print(
            f"backlog of {args.backlog} entries (100 per message), BATCH_SIZE 5: drained at "
            f"{rate:.0f} entries/s; consumer RSS MiB min {min(samples):.1f}, "
            f"max {max(samples):.1f} over {len(samples)} samples "
            f"(first {samples[:3]}, last {samples[-3:]})"
        )


if __name__ == "__main__":
    main()
