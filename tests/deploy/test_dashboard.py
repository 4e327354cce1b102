"""The dashboard and the alert rules against the real tools: promtool and the JSON checks
(scripts/check-observability.sh), then every dashboard query run by a real Prometheus that
scrapes the real `server` and `message-consumer` processes."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractConnection

from services.common.topology import Topology
from tests.support.net import free_port
from tests.support.polling import eventually
from tests.support.process import ServiceProcess, api_env, consumer_env

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "async-data-processor.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
CHECK_SCRIPT = ROOT / "scripts" / "check-observability.sh"

# What Grafana would put in place of the dashboard's variables. 1m covers the whole test
# at a 1 s scrape interval, so every counter has several samples in each rate window.
VARIABLES = {
    "api_job": "api",
    "consumer_job": "consumer",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
}

ENTRIES_PER_REQUEST = 20


@pytest.mark.timeout(300)  # room for the script to install promtool when it is missing
def test_check_observability_script_passes() -> None:
    """promtool checks and unit-tests the rules, and the dashboard JSON is checked. A missing
    promtool is installed by the script (or fails it): never a skip."""
    subprocess.run(["bash", str(CHECK_SCRIPT)], cwd=ROOT, check=True, timeout=280)


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expression) of every query in the dashboard, rows included."""
    found: list[tuple[str, str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((panel["title"], target["refId"], target["expr"]))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        return VARIABLES[match.group(1) or match.group(2)]

    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", value, expr)


def test_every_query_filters_on_its_job() -> None:
    for title, ref, expr in dashboard_targets():
        assert 'job="$api_job"' in expr or 'job="$consumer_job"' in expr, (title, ref)
        assert "[" not in expr or "[$__rate_interval]" in expr, (title, ref)


@contextmanager
def prometheus(tmp_path: Path, api_port: int, consumer_port: int) -> Iterator[str]:
    """A real Prometheus scraping both services every second and evaluating alerts.yml;
    yields its base URL and stops it on exit. Its data stays in tmp_path."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "prometheus is not installed: run scripts/check-observability.sh (which installs "
            "the Debian package) or `apt-get install prometheus`",
            pytrace=False,
        )
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "api", "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]},
            {
                "job_name": "consumer",
                "static_configs": [{"targets": [f"127.0.0.1:{consumer_port}"]}],
            },
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(json.dumps(config))
    port = free_port()
    with (tmp_path / "prometheus.log").open("ab") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def query(client: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    """Run an instant query; a query Prometheus cannot run fails with its error."""
    response = await client.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body.get('error')}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def post_traffic(client: httpx.AsyncClient, seconds: float, counts: dict[str, int]) -> None:
    """POST /message for `seconds`: valid batches, with an invalid body (400) and an unknown
    path (404) now and then so 4xx series exist. Counts accepted entries in `counts`."""
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        if i % 25 == 0:
            bad = await client.post("/message", json=[{"value": "no timestamp"}])
            assert bad.status_code == 400, bad.text
            assert (await client.get("/no-such-path")).status_code == 404
            continue
        body = [
            {"timestamp": f"2019-10-12T07:20:{(i + n) % 60:02d}Z", "value": f"{i}-{n}"}
            for n in range(ENTRIES_PER_REQUEST)
        ]
        response = await client.post("/message", json=body)
        assert response.status_code == 201, response.text
        counts["accepted"] += len(response.json())


async def traffic(base_url: str, seconds: float, counts: dict[str, int]) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        await asyncio.gather(*(post_traffic(client, seconds, counts) for _ in range(8)))


@pytest.mark.e2e
@pytest.mark.rabbitmq
async def test_every_dashboard_query_runs_on_prometheus_scraping_the_services(
    topology: Callable[..., Topology], amqp: AbstractConnection, tmp_path: Path, rabbitmq_url: str
) -> None:
    topo = topology()
    api_port, consumer_port = free_port(), free_port()
    server_env = api_env(topo, api_port, rabbitmq_url)
    cons_env = consumer_env(
        topo,
        tmp_path / "out",
        consumer_port,
        rabbitmq_url,
        HOST_NAME="dashboard",
        BATCH_MAX_WAIT_SECONDS="0.2",
        # The backlog left before the consumer starts grows every pool to WORKERS_MAX (4)
        # within its first readings; the cool-down keeps it there for several scrapes.
        PREFETCH_COUNT="10",
        SCALE_INTERVAL_SECONDS="0.2",
        SCALE_UP_BACKLOG="20",
        SCALE_DOWN_COOLDOWN_SECONDS="3",
        SHUTDOWN_TIMEOUT_SECONDS="10",
    )
    api_url = f"http://127.0.0.1:{api_port}"
    counts = {"accepted": 0}
    with (
        ServiceProcess("server", server_env, tmp_path / "server.log") as api,
        prometheus(tmp_path, api_port, consumer_port) as prom_url,
    ):
        await api.wait_ready(api_url)
        await traffic(api_url, 2, counts)  # the backlog the consumer finds at start
        # One message with no valid entry, so the rejected-messages series exists.
        async with amqp.channel() as channel:
            await channel.default_exchange.publish(
                aio_pika.Message(b"not json"), routing_key=topo.queue_name(0)
            )
        with ServiceProcess("message-consumer", cons_env, tmp_path / "consumer.log") as cons:
            await cons.wait_ready(f"http://127.0.0.1:{consumer_port}")
            await traffic(api_url, 3, counts)
            async with httpx.AsyncClient(base_url=prom_url, timeout=10) as prom:
                await scraped(prom, counts["accepted"])
                await check_every_panel_query(prom)
                await check_freshness(prom)
                await check_scaling_and_rules(prom)
            cons.signal()
            assert await asyncio.to_thread(cons.wait, 15) == 0, cons.log
        api.signal()
        assert await asyncio.to_thread(api.wait, 15) == 0, api.log


async def scraped(prom: httpx.AsyncClient, accepted: int) -> None:
    """Wait until Prometheus scrapes both targets and has seen every accepted entry written,
    so each counter has samples from before and after the traffic."""

    async def both_up() -> bool:
        up = await query(prom, "up")
        return {(s["metric"]["job"], s["value"][1]) for s in up} == {
            ("api", "1"),
            ("consumer", "1"),
        }

    async def all_processed() -> bool:
        done = await query(prom, 'sum(adp_worker_processed_entries_total{job="consumer"})')
        return bool(done) and float(done[0]["value"][1]) >= accepted

    await eventually(both_up, timeout=20, interval=0.5, what="both targets scraped")
    await eventually(all_processed, timeout=30, interval=0.5, what="every entry scraped")


async def check_every_panel_query(prom: httpx.AsyncClient) -> None:
    """Each query parses and returns at least one series. (The fault counters return zeros:
    the services create their series at start-up, so no panel says "No data".)"""
    targets = dashboard_targets()
    empty: list[tuple[str, str]] = []
    for title, ref, expr in targets:
        promql = substitute(expr)
        assert "$" not in promql, promql
        await query(prom, promql)  # parses and runs

        async def has_data(promql: str = promql) -> bool:
            return bool(await query(prom, promql))

        try:
            await eventually(has_data, timeout=5, interval=0.5, what=promql)
        except AssertionError:
            empty.append((title, ref))
    assert not empty, f"panel queries without data: {empty}"
    for var, metric in (("api", "adp_api_requests_total"), ("consumer", "adp_consumer_workers")):
        response = await prom.get("/api/v1/label/job/values", params={"match[]": metric})
        assert var in response.json()["data"], f"label_values({metric}, job) lacks {var}"


async def check_freshness(prom: httpx.AsyncClient) -> None:
    """The Freshness row on real series: every shard has a p99 accepted -> durable (the
    traffic reached them all), and an oldest unwritten age. The backlog left before the
    consumer started waited for its start-up, hence a bound of minutes, not seconds."""
    p99 = await query(
        prom,
        "histogram_quantile(0.99, sum by (shard, le) "
        '(rate(adp_consumer_entry_latency_seconds_bucket{job="consumer"}[1m])))',
    )
    values = {s["metric"]["shard"]: float(s["value"][1]) for s in p99}
    assert sorted(values) == ["0", "1", "2", "3", "4"], values
    assert all(0 < v < 120 for v in values.values()), values
    ages = await query(prom, 'adp_consumer_oldest_unwritten_age_seconds{job="consumer"}')
    assert len(ages) == 5, ages


async def check_scaling_and_rules(prom: httpx.AsyncClient) -> None:
    """The workers panel has the 3 -> 4 scaling to show; the alert rules evaluate without
    error on the real series, and the `_created` series they lean on exist."""
    peak = await query(prom, 'max(max_over_time(adp_consumer_workers{job="consumer"}[5m]))')
    assert float(peak[0]["value"][1]) == 4
    assert await query(prom, 'adp_api_requests_created{job="api", route="/message"}')

    async def rules_healthy() -> bool:
        groups = (await prom.get("/api/v1/rules")).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not [b for b in bad if b[1] == "err"], bad
        return bool(rules) and not bad

    await eventually(rules_healthy, timeout=10, interval=0.5, what="alert rules evaluated")
