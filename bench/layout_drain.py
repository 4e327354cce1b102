"""Output layout benchmark: what OUTPUT_COMPRESSION (and OUTPUT_PATH_TEMPLATE) cost and
save. Pre-fills the shard queues, times the real `async-data-processor message-consumer`
draining them to batch files, and measures the files: entries/s, and bytes on disk per
entry — the files' sizes, and the blocks they take (at small BATCH_SIZE the file system's
block, not the bytes, is what fills a disk). The ceiling beside each figure, from the same
run: a bare aio-pika consumer that acks without writing (entries/s), and the uncompressed
JSON Lines (bytes per entry).

    python -m bench.layout_drain [--runs 3] [--per-message 100]
                                 [--entries-small 30000] [--entries-large 300000]

Each case runs `--runs` times, interleaved (case by case within a run), and is reported as
min/median/max. The entries look like event data (a user, a path, a number, a fraction of a
second), spread over four UTC hours so the template's cases write several directories; the
Hive cases run with OUTPUT_PATH_TEMPLATE=date={year}-{month}-{day}/hour={hour}/shard={shard}.
Queues and files it makes are deleted, the files once every case has run (`bench.disk_limit`
says why). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika

from bench.consumer_drain import (
    POLL_SECONDS,
    last_on_disk,
    output_directory,
    process,
    remove_outputs,
)
from services.common.wire import PARTS_HEADER
from services.consumer.encoding import COMPRESSIONS, encode
from tests.support.net import free_port

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
SHARDS = 5
HIVE = "date={year}-{month}-{day}/hour={hour}/shard={shard}"


@dataclass(frozen=True)
class Case:
    compression: str
    batch_size: int
    template: str = ""
    interleaved: bool = False  # each message's entries alternate hours (the worst case)

    @property
    def layout(self) -> str:
        return ("hive" if self.template else "flat") + (", interleaved" if self.interleaved else "")

    @property
    def label(self) -> str:
        return f"{self.compression:>4} {self.batch_size:>5} {self.layout}"


@dataclass
class Results:
    rates: list[float] = field(default_factory=list)
    bares: list[float] = field(default_factory=list)
    size_per_entry: list[float] = field(default_factory=list)
    disk_per_entry: list[float] = field(default_factory=list)
    files: list[int] = field(default_factory=list)


def event_bodies(
    entries: int, per_message: int, *, interleaved: bool = False, seed: int = 7
) -> list[bytes]:
    """Messages of `per_message` entries over four UTC hours, each message's entries in
    time order (a client sending its events as they came: a message's entries for one hour
    are consecutive) or, `interleaved`, alternating hours entry by entry (every entry its
    own run: a file then holds one ledger range per entry)."""
    rng = random.Random(seed)
    bodies = []
    for start in range(0, entries, per_message):
        batch = []
        for i in range(start, min(start + per_message, entries)):
            hour = 6 + i % 4
            batch.append(
                {
                    "timestamp": f"2019-10-12T{hour:02d}:{rng.randrange(60):02d}:"
                    f"{rng.randrange(60):02d}.{rng.randrange(10**6):06d}Z",
                    "value": f"user-{rng.randrange(20000)} GET /items/{rng.randrange(5000)} "
                    f"{rng.choice(['200', '200', '200', '304', '404'])} "
                    f"{rng.random() * 250:.3f}ms",
                }
            )
        if not interleaved:
            batch.sort(key=lambda entry: entry["timestamp"])
        bodies.append(json.dumps(batch, separators=(",", ":")).encode())
    return bodies


def uncompressed_per_entry(bodies: list[bytes]) -> float:
    """Bytes per entry of the JSON Lines the consumer writes (compact JSON, one a line)."""
    lines = sum(
        len(json.dumps(e, separators=(",", ":"))) + 1 for b in bodies for e in json.loads(b)
    )
    return lines / sum(len(json.loads(b)) for b in bodies)


async def fill(prefix: str, bodies: list[bytes]) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection, connection.channel(publisher_confirms=True) as channel:
        for shard in range(SHARDS):
            await channel.declare_queue(f"{prefix}{shard}", durable=True)
        for start in range(0, len(bodies), 500):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            body,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            message_id=uuid.uuid4().hex,  # as the API sends them
                            headers={PARTS_HEADER: str(len(json.loads(body)))},
                        ),
                        routing_key=f"{prefix}{(start + i) % SHARDS}",
                    )
                    for i, body in enumerate(bodies[start : start + 500])
                )
            )


async def delete(prefix: str) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection, connection.channel() as channel:
        for shard in range(SHARDS):
            await channel.queue_delete(f"{prefix}{shard}")
        await channel.queue_delete(f"{prefix}dead")


def _get(port: int, path: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return None


def processed(port: int) -> float:
    text = _get(port, "/metrics") or ""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("adp_worker_processed_entries_total{")
    )


def drain(prefix: str, entries: int, case: Case, out: Path) -> float:
    """Entries/s of the real consumer draining the filled queues, from connected."""
    port = free_port()
    env = {
        **os.environ,
        "RABBITMQ_URL": RABBITMQ_URL,
        "QUEUE_PREFIX": prefix,
        "SHARDS_COUNT": str(SHARDS),
        "DATA_OUTPUT_DIR": str(out),
        "METRICS_PORT": str(port),
        "BATCH_SIZE": str(case.batch_size),
        # Short: a directory's last partial batch waits this long, which the flat cases
        # (whole batches per shard) never do; the timer is not what is measured.
        "BATCH_MAX_WAIT_SECONDS": "0.1",
        "OUTPUT_COMPRESSION": case.compression,
        "OUTPUT_PATH_TEMPLATE": case.template,
        "LOG_LEVEL": "WARNING",
        "HISTORY_LOG_INTERVAL_SECONDS": "0",
    }
    with process("message-consumer", env) as proc:
        return drain_rate(proc, port, entries, out)


def drain_rate(
    proc: subprocess.Popen[bytes], port: int, entries: int, out: Path | None = None
) -> float:
    """Entries/s of the consumer at `port` from ready until it has processed `entries`.
    With `out` (files), the end is the last rename into it (`bench.consumer_drain.
    last_on_disk`) and /metrics is read every 0.5 s; without (objects), it is read every
    0.1 s — each exposition costs the consumer's event loop milliseconds (twenty a second
    took a fifth of it), so the harness reads it as seldom as its precision allows."""
    while _get(port, "/readyz") is None:
        if proc.poll() is not None:
            raise SystemExit("the consumer exited")
        time.sleep(0.005)
    started = time.time()
    while processed(port) < entries:
        if proc.poll() is not None:
            raise SystemExit("the consumer exited")
        time.sleep(POLL_SECONDS if out is not None else 0.1)
    ended = last_on_disk(out) if out is not None else time.time()
    return entries / (ended - started)


def drain_bare(prefix: str, messages: int, entries: int, batch_size: int) -> float:
    prefetch = min(10_000, max(32, 2 * batch_size * 4))  # the consumer's default
    out = subprocess.run(
        [
            *(sys.executable, "-m", "bench.bare_consumer", RABBITMQ_URL, prefix),
            *(str(SHARDS), str(prefetch), str(messages)),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return entries / float(out.strip())


def measure(out: Path) -> tuple[int, int, int]:
    """(files, bytes in them, bytes of the blocks they take) under `out`, dot-dirs aside."""
    files = size = blocks = 0
    for folder, directories, names in os.walk(out):
        directories[:] = [d for d in directories if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            info = os.stat(Path(folder) / name)
            files += 1
            size += info.st_size
            blocks += info.st_blocks * 512
    return files, size, blocks


def run_case(case: Case, bodies: list[bytes], entries: int, results: Results) -> None:
    prefix = f"adp_bench_{uuid.uuid4().hex[:8]}_"
    out = output_directory("adp-bench-layout-")  # removed at the end (bench.disk_limit)
    try:
        asyncio.run(fill(prefix, bodies))
        results.bares.append(drain_bare(prefix, len(bodies), entries, case.batch_size))
        asyncio.run(fill(prefix, bodies))
        results.rates.append(drain(prefix, entries, case, out))
        files, size, blocks = measure(out)
        results.files.append(files)
        results.size_per_entry.append(size / entries)
        results.disk_per_entry.append(blocks / entries)
    finally:
        asyncio.run(delete(prefix))


def encode_rates(bodies: list[bytes], batch_size: int, runs: int) -> dict[str, list[float]]:
    """Entries/s that `encoding.encode` turns into file bytes, one thread, per compression:
    the CPU ceiling of the encoding step alone (what a writer thread does before its
    write)."""
    entries = [e for body in bodies for e in json.loads(body)]
    batches = [entries[i : i + batch_size] for i in range(0, len(entries), batch_size)]
    rates: dict[str, list[float]] = {}
    for compression in COMPRESSIONS:
        for _ in range(runs):
            started = time.perf_counter()
            for batch in batches:
                encode(batch, compression)
            rates.setdefault(compression, []).append(len(entries) / (time.perf_counter() - started))
    return rates


def spread(values: list[float], digits: int = 0) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{low:,.{digits}f} / {mid:,.{digits}f} / {high:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--per-message", type=int, default=100)
    parser.add_argument("--entries-small", type=int, default=30_000, help="at BATCH_SIZE 5")
    parser.add_argument("--entries-large", type=int, default=300_000, help="at BATCH_SIZE 1000")
    parser.add_argument("--compressions", default="none,gzip,zstd")
    parser.add_argument(
        "--encode-only", action="store_true", help="only the encoding step's own rates"
    )
    args = parser.parse_args()
    if args.encode_only:
        print_encode_rates(args.runs, args.per_message, args.entries_large)
        return
    cases = [Case(c, b) for b in (5, 1000) for c in args.compressions.split(",")]
    cases += [Case("none", 5, HIVE), Case("zstd", 1000, HIVE), Case("zstd", 1000, HIVE, True)]
    sizes = {5: args.entries_small, 1000: args.entries_large}
    bodies = {
        (b, mixed): event_bodies(n, args.per_message, interleaved=mixed)
        for b, n in sizes.items()
        for mixed in (False, True)
    }
    results = {case: Results() for case in cases}
    try:
        for run in range(args.runs):
            for case in cases:
                messages = bodies[case.batch_size, case.interleaved]
                for attempt in range(3):  # the shared broker may close every connection
                    try:
                        run_case(case, messages, sizes[case.batch_size], results[case])
                        break
                    except (
                        aio_pika.exceptions.AMQPError,
                        ConnectionError,
                        subprocess.SubprocessError,
                        SystemExit,
                    ) as exc:
                        print(f"run {run + 1} {case.label}: {exc!r}; again", file=sys.stderr)
                        if attempt == 2:
                            raise
                print(f"run {run + 1} {case.label}: {results[case].rates[-1]:,.0f} entries/s",
                      file=sys.stderr)  # fmt: skip
    finally:
        remove_outputs()
    plain = uncompressed_per_entry(bodies[5, False])
    print(
        f"{args.per_message} entries per message; min / median / max over {args.runs} runs; "
        f"uncompressed JSON Lines: {plain:.1f} bytes per entry"
    )
    print(
        "| OUTPUT_COMPRESSION | BATCH_SIZE | layout | entries | consumer entries/s | "
        "bare consumer entries/s (ceiling) | share of bare (median) | file bytes per entry | "
        "disk bytes per entry (blocks) | files |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        r = results[case]
        share = statistics.median(r.rates) / statistics.median(r.bares)
        print(
            f"| {case.compression} | {case.batch_size} | {case.layout} "
            f"| {sizes[case.batch_size]:,} | {spread(r.rates)} | {spread(r.bares)} | "
            f"{share:.0%} | {spread(r.size_per_entry, 1)} | {spread(r.disk_per_entry, 1)} | "
            f"{statistics.median(r.files):,.0f} |"
        )
    print_encode_rates(args.runs, args.per_message, args.entries_large)


def print_encode_rates(runs: int, per_message: int, entries: int) -> None:
    bodies = event_bodies(entries, per_message)
    print("| encoding alone, one thread | BATCH_SIZE | entries/s (min / median / max) |")
    print("|---|---|---|")
    for batch_size in (5, 1000):
        for compression, rates in encode_rates(bodies, batch_size, runs).items():
            print(f"| {compression} | {batch_size} | {spread(rates)} |")


if __name__ == "__main__":
    main()
