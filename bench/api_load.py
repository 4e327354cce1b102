"""API load benchmark: the real `async-data-processor server` (publishing with confirms to
the local RabbitMQ) against a bare validating endpoint, in the same run, under wrk.

    python -m bench.api_load [--duration 10] [--connections 64] [--sizes 3,100]

Prints, per body size: requests/s, entries/s, p50/p99 latency, non-201 answers, and peak
RSS of the server process; the API's entries/s as a share of the bare endpoint's. Queues
it fills are deleted afterwards. Not part of `make test`: machines are noisy, so compare
only figures from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import aio_pika

from tests.support.net import free_port

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
SHARDS = 5


@dataclass
class Result:
    target: str
    entries_per_request: int
    requests_per_s: float
    entries_per_s: float
    p50_ms: float
    p99_ms: float
    non_201: int
    errors: int
    peak_rss_mib: float


def body(entries: int) -> str:
    return json.dumps(
        [
            {"timestamp": f"2019-10-12T07:20:{i % 60:02d}.52Z", "value": f"value-{i}"}
            for i in range(entries)
        ],
        separators=(",", ":"),
    )


LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%s]==]
"""


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status in (200, 405):
                    return
        except urllib.error.HTTPError as exc:
            if exc.code == 405:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout}s")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def run_wrk(url: str, entries: int, duration: int, connections: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA % body(entries))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", script.name, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": rps,
        "p50": p50,
        "p99": p99,
        "non_201": int(non2xx.group(1)) if non2xx else 0,
        "errors": sum(int(g) for g in errors.groups()) if errors else 0,
    }


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def delete_queues(prefix: str) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection, connection.channel() as channel:
        for shard in range(SHARDS):
            await channel.queue_delete(f"{prefix}{shard}")


def measure(
    target: str,
    cmd: list[str],
    env: dict[str, str],
    port: int,
    entries: int,
    args: argparse.Namespace,
) -> Result:
    proc = start(cmd, env)
    try:
        wait_http(
            f"http://127.0.0.1:{port}/readyz"
            if target == "api"
            else f"http://127.0.0.1:{port}/message"
        )
        url = f"http://127.0.0.1:{port}/message"
        run_wrk(url, entries, 2, args.connections)  # warm-up
        figures = run_wrk(url, entries, args.duration, args.connections)
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return Result(
        target,
        entries,
        figures["rps"],
        figures["rps"] * entries,
        figures["p50"],
        figures["p99"],
        int(figures["non_201"]),
        int(figures["errors"]),
        rss,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--sizes", default="3,100")
    parser.add_argument("--repeat", type=int, default=1, help="runs per target; medians kept")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    script = Path(sys.executable).parent / "async-data-processor"
    results: list[Result] = []
    for entries in (int(s) for s in args.sizes.split(",")):
        port = free_port()
        results.append(
            measure(
                "bare", [sys.executable, "-m", "bench.bare_app", str(port)], {}, port, entries, args
            )
        )
        prefix = f"adp_bench_{uuid.uuid4().hex[:8]}_"
        port = free_port()
        env = {
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "QUEUE_PREFIX": prefix,
            "RABBITMQ_URL": RABBITMQ_URL,
            "SHARDS_COUNT": str(SHARDS),
            "LOG_LEVEL": "WARNING",
        }
        try:
            results.append(measure("api", [str(script), "server"], env, port, entries, args))
        finally:
            asyncio.run(delete_queues(prefix))
    print(
        f"{'target':<6} {'entries':>7} {'req/s':>9} {'entries/s':>10} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'non201':>7} {'errors':>6} {'RSS MiB':>8}"
    )
    for r in results:
        print(
            f"{r.target:<6} {r.entries_per_request:>7} {r.requests_per_s:>9.0f} "
            f"{r.entries_per_s:>10.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.non_201:>7} "
            f"{r.errors:>6} {r.peak_rss_mib:>8.1f}"
        )
    for entries in sorted({r.entries_per_request for r in results}):
        bare, api = (
            next(r for r in results if r.target == t and r.entries_per_request == entries)
            for t in ("bare", "api")
        )
        print(
            f"{entries}-entry bodies: API at {api.entries_per_s / bare.entries_per_s:.0%} "
            "of the bare endpoint's entries/s"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
