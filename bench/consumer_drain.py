"""Consumer drain benchmark: the real `async-data-processor message-consumer` draining
backlogs to batch files, each figure beside its ceiling measured in the same run.

    python -m bench.consumer_drain [--runs 3] [--api-entries 150000] [--entries 200000]
                                   [--backlog 1000000] [--latency-seconds 10]

Cases, per run:
- defaults: the disk's own limit on the output directory (`bench.disk_limit`: four
  threads writing 5-line files durably, each on its own; measured before the drain and
  after it, the better of the two counts), then a backlog filled through the real API with
  5-entry requests, drained by the consumer with its default settings (BATCH_SIZE 5,
  EXACTLY_ONCE on): entries/s, files/s and files/s as a share of the disk's limit, timed
  from connected to the last entry on disk. Then, with both still running, load at half
  that rate through the API, then at a quarter (the rate the load generator kept is
  reported): p50/p99 from each request's sending (an upper bound: its 201, read late by a
  busy generator, came after the rename as often as not) to the moment its last entry's
  file was renamed into place (the file's ctime: ext4 sets it on rename;
  read afterwards, so no thread of this process competes with the load for the GIL — an
  inotify reader stamping events here read hundreds of ms late once the load generator
  kept the process busy).
- BATCH_SIZE 1000 with 100-entry messages (filled directly), against the bare
  parse-and-ack consumer (`bench.bare_consumer`), both timed from the process's start to
  the last entry on disk (acked, for the bare one).
Then once: the consumer's RSS sampled while a --backlog entries backlog drains.

Prints each run, then min/median/max over the runs. Queues and files it makes are deleted,
the files only once every case has run (`bench.disk_limit` says why). The consumer's
/metrics is read only every POLL_SECONDS to see that a drain is over (an exposition costs
its event loop milliseconds); the drain's end is the last rename into an output directory
(the newest directory mtime). Not part of `make test`: the machine is shared and noisy;
compare only figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aio_pika

from bench.api_load import body
from bench.disk_limit import files_per_second
from bench.http_load import post_all, request_body
from services.common.topology import Topology
from services.common.wire import PARTS_HEADER
from tests.support.net import free_port

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
SHARDS = 5
POLL_SECONDS = 0.5
# The offered loads after the drain, as fractions of the drained rate: half (the target's)
# and a quarter (where the load generator, the API and RabbitMQ leave the 2 cores room).
LOADS = {"half": 0.5, "quarter": 0.25}
OUTPUTS: list[Path] = []  # removed at the end (module docstring)
SCRIPT = Path(sys.executable).parent / "async-data-processor"


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


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def output_directory(prefix: str = "adp-bench-") -> Path:
    """A new output directory, removed by `remove_outputs` once every case has run."""
    out = Path(tempfile.mkdtemp(prefix=prefix))
    OUTPUTS.append(out)
    return out


def remove_outputs() -> None:
    for out in OUTPUTS:
        shutil.rmtree(out, ignore_errors=True)
    OUTPUTS.clear()


def last_on_disk(out: Path) -> float:
    """The wall-clock time of the last rename into `out` or a directory under it (the
    newest directory mtime; the consumer's own dot-directories left out)."""
    newest = out.stat().st_mtime
    for folder, subdirectories, _ in os.walk(out):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        newest = max(newest, os.stat(folder).st_mtime)
    return newest


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def process(command: str, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [str(SCRIPT), command],
        env={**os.environ, "RABBITMQ_URL": RABBITMQ_URL, "LOG_LEVEL": "WARNING", **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def consumer_env(prefix: str, out: Path, port: int, **settings: str) -> dict[str, str]:
    return {
        "QUEUE_PREFIX": prefix,
        "SHARDS_COUNT": str(SHARDS),
        "DATA_OUTPUT_DIR": str(out),
        "METRICS_PORT": str(port),
        "HISTORY_LOG_INTERVAL_SECONDS": "0",
        **settings,
    }


def wait_until(
    condition: object, proc: subprocess.Popen[bytes], what: str, interval: float = 0.05
) -> None:
    while not condition():  # type: ignore[operator]
        if proc.poll() is not None:
            raise SystemExit(f"{what}: the process exited")
        time.sleep(interval)


def drain_defaults(entries: int, latency_seconds: float) -> dict[str, float]:
    """The defaults case (module docstring)."""
    prefix = f"adp_bench_{uuid.uuid4().hex[:8]}_"
    out = output_directory()
    figures: dict[str, float] = {}
    try:
        before_limit = files_per_second(out / ".limit-before")
        api_port, port = free_port(), free_port()
        api_env = {"QUEUE_PREFIX": prefix, "SHARDS_COUNT": str(SHARDS), "PORT": str(api_port)}
        api_env["HOST"] = "127.0.0.1"
        with process("server", api_env) as api:
            wait_until(lambda: answers(f"http://127.0.0.1:{api_port}/readyz"), api, "api")
            requests = entries // 5
            accepted = asyncio.run(
                post_all(api_port, requests, lambda n: request_body(n, 5, "d"), connections=32)
            )
            filled = 5 * len(accepted)
            with process("message-consumer", consumer_env(prefix, out, port)) as consumer:
                wait_until(lambda: answers(f"http://127.0.0.1:{port}/readyz"), consumer, "ready")
                started = time.time()
                rss = 0.0
                while processed(port) < filled:
                    if consumer.poll() is not None:
                        raise SystemExit("the consumer exited")
                    rss = max(rss, rss_mib(consumer.pid))
                    time.sleep(POLL_SECONDS)
                elapsed = last_on_disk(out) - started
                files = sum(1 for _ in out.glob("*.jsonl"))
                figures.update(
                    entries=filled,
                    entries_s=filled / elapsed,
                    files_s=files / elapsed,
                    rss_mib=rss,
                )
                drained = filled
                for name, fraction in LOADS.items():
                    traced = offered_load(
                        api_port, port, out, drained, figures, fraction, latency_seconds
                    )
                    drained += int(traced.pop("entries"))
                    figures.update({f"{name}_{key}": value for key, value in traced.items()})
        # Again after the drain: the better of the two (files deleted on the disk in the
        # seconds before a measurement slow it down; see bench.disk_limit).
        figures["limit_files_s"] = max(before_limit, files_per_second(out / ".limit-after"))
        figures["share"] = figures["files_s"] / figures["limit_files_s"]
    finally:
        asyncio.run(delete(prefix))
    return figures


def offered_load(
    api_port: int,
    port: int,
    out: Path,
    before: int,
    figures: dict[str, float],
    fraction: float,
    seconds: float,
) -> dict[str, float]:
    """Requests of 5 entries at `fraction` of the drained rate; accepted→on-disk per
    request, and the rate the load generator actually kept (it may fall behind)."""
    rate = figures["entries_s"] * fraction / 5  # requests/s
    count = int(rate * seconds)
    since = time.time()
    tag = f"L{int(fraction * 100)}x"
    started = time.monotonic()
    sent: dict[int, float] = {}
    body = functools.partial(request_body, entries=5, tag=tag)
    accepted = asyncio.run(post_all(api_port, count, body, connections=16, rate=rate, sent=sent))
    sending = max(time.monotonic() - started, seconds)
    deadline = time.monotonic() + 30
    while processed(port) < before + 5 * len(accepted) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    wall_minus_monotonic = time.time() - time.monotonic()
    on_disk: dict[int, float] = {}
    for path in out.glob("*.jsonl"):
        status = path.stat()
        if status.st_ctime < since:
            continue
        moment = status.st_ctime - wall_minus_monotonic  # the rename, on the monotonic clock
        for line in path.read_text().splitlines():
            value = json.loads(line)["value"]
            if value.startswith(tag):
                number = int(value[len(tag) :].split("-")[0])
                on_disk[number] = max(on_disk.get(number, 0.0), moment)
    # From the request's sending: the 201 is read late when the load generator is busy
    # (its file was often renamed before), so timing from it read negative latencies. The
    # send is before the API accepts: these figures are an upper bound.
    latencies = sorted(on_disk[n] - sent[n] for n in accepted if n in on_disk)
    missing = len(accepted) - len(latencies)
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "entries": 5 * len(accepted),
        "rate_entries_s": 5 * len(accepted) / sending,
        "p50_ms": 1000 * quantiles[49],
        "p99_ms": 1000 * quantiles[98],
        "latency_missing": missing,
    }


def drain_large_batches(entries: int) -> dict[str, float]:
    """BATCH_SIZE 1000, 100-entry messages: the consumer against the bare one, both from
    the process's start."""
    prefix = f"adp_bench_{uuid.uuid4().hex[:8]}_"
    out = output_directory()
    try:
        messages = asyncio.run(fill(prefix, entries, 100))
        started = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.bare_consumer",
                RABBITMQ_URL,
                prefix,
                str(SHARDS),
                str(prefetch_for(1000)),
                str(messages),
            ],
            check=True,
            capture_output=True,
        )
        bare = entries / (time.monotonic() - started)
        asyncio.run(fill(prefix, entries, 100))
        port = free_port()
        env = consumer_env(prefix, out, port, BATCH_SIZE="1000")
        started = time.time()
        with process("message-consumer", env) as consumer:
            wait_until(lambda: processed(port) >= entries, consumer, "drain", POLL_SECONDS)
            rate = entries / (last_on_disk(out) - started)
    finally:
        asyncio.run(delete(prefix))
    return {"bare_entries_s": bare, "entries_s": rate, "share": rate / bare}


def backlog_rss(entries: int) -> tuple[float, list[float]]:
    prefix = f"adp_bench_{uuid.uuid4().hex[:8]}_"
    out = output_directory()
    try:
        asyncio.run(fill(prefix, entries, 100))
        port = free_port()
        samples: list[float] = []
        with process("message-consumer", consumer_env(prefix, out, port)) as consumer:
            wait_until(lambda: answers(f"http://127.0.0.1:{port}/readyz"), consumer, "ready")
            started = time.time()
            while processed(port) < entries:
                if consumer.poll() is not None:
                    raise SystemExit("the consumer exited")
                samples.append(rss_mib(consumer.pid))
                time.sleep(POLL_SECONDS)
            rate = entries / (last_on_disk(out) - started)
    finally:
        asyncio.run(delete(prefix))
    return rate, samples


def prefetch_for(batch_size: int) -> int:
    return min(10_000, max(32, 2 * batch_size * 4))  # the consumer's default


def spread(values: list[float]) -> str:
    return f"{min(values):.0f} / {statistics.median(values):.0f} / {max(values):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--api-entries", type=int, default=150_000)
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--cases", default="defaults,large")
    args = parser.parse_args()
    cases = args.cases.split(",")
    defaults: list[dict[str, float]] = []
    large: list[dict[str, float]] = []
    for run in range(1, args.runs + 1):
        if "defaults" in cases:
            d = drain_defaults(args.api_entries, args.latency_seconds)
            defaults.append(d)
            print(
                f"run {run} defaults: disk limit {d['limit_files_s']:.0f} files/s; drained "
                f"{d['entries']:.0f} entries at {d['entries_s']:.0f} entries/s = "
                f"{d['files_s']:.0f} files/s = {d['share']:.2f} of the limit; RSS max "
                f"{d['rss_mib']:.0f} MiB; "
                + "; ".join(
                    f"at {name} load ({d[name + '_rate_entries_s']:.0f} entries/s) "
                    f"accepted->on disk p50 {d[name + '_p50_ms']:.0f} ms, p99 "
                    f"{d[name + '_p99_ms']:.0f} ms ({d[name + '_latency_missing']:.0f} "
                    "requests not traced)"
                    for name in LOADS
                ),
                flush=True,
            )
        if "large" in cases:
            r = drain_large_batches(args.entries)
            large.append(r)
            print(
                f"run {run} BATCH_SIZE 1000, 100 entries/message: bare {r['bare_entries_s']:.0f}"
                f" entries/s, consumer {r['entries_s']:.0f} entries/s = {r['share']:.2f} of bare",
                flush=True,
            )
    if defaults:
        print("defaults over runs, min / median / max:")
        for key, label in [
            ("limit_files_s", "disk limit files/s"),
            ("entries_s", "entries/s"),
            ("files_s", "files/s"),
            ("share", "share of the limit x100"),
            ("half_p50_ms", "p50 ms at half load"),
            ("half_p99_ms", "p99 ms at half load"),
            ("quarter_p50_ms", "p50 ms at quarter load"),
            ("quarter_p99_ms", "p99 ms at quarter load"),
            ("rss_mib", "RSS MiB"),
        ]:
            values = [d[key] * (100 if key == "share" else 1) for d in defaults]
            print(f"  {label:<26} {spread(values)}")
    if large:
        print("BATCH_SIZE 1000 over runs, min / median / max:")
        for key, label in [
            ("bare_entries_s", "bare entries/s"),
            ("entries_s", "consumer entries/s"),
            ("share", "share of bare x100"),
        ]:
            values = [r[key] * (100 if key == "share" else 1) for r in large]
            print(f"  {label:<26} {spread(values)}")
    if args.backlog:
        rate, samples = backlog_rss(args.backlog)
        print(
            f"backlog of {args.backlog} entries (100 per message), defaults: drained at "
            f"{rate:.0f} entries/s; consumer RSS MiB min {min(samples):.1f}, "
            f"max {max(samples):.1f} over {len(samples)} samples "
            f"(first {samples[:3]}, last {samples[-3:]})"
        )


if __name__ == "__main__":
    try:
        main()
    finally:
        remove_outputs()
