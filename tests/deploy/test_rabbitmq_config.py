"""The broker configuration the chart and compose write, read by a real RabbitMQ node.

RabbitMQ refuses to boot on a key it does not know or a value it cannot parse, so each file
is handed to a throw-away node of the machine's own rabbitmq-server (3.10 here; the images
run 4.x, which knows these keys too), on loopback ports of its own, separate from the
shared broker. The node must start and report the memory limit and alarm, and the
partition handling, that the file asks for. The chart's `peer_discovery_backend = k8s`
line is the one part not read here: that plugin (4.1's) asks nothing of a cluster but its
own pod names, which only Kubernetes gives; the node reads the rest with classic discovery.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.deploy.test_chart import _render
from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]
HA_CONF = ROOT / "deploy" / "rabbitmq" / "ha.conf"
CLUSTER = ("-f", str(ROOT / "deploy/helm/async-data-processor/ci/rabbitmq-cluster-values.yaml"))
pytestmark = pytest.mark.timeout(240)


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (
            str(p)
            for p in (Path("/usr/sbin") / name, Path("/usr/lib/rabbitmq/bin") / name)
            if p.exists()
        ),
        None,
    )
    assert found, f"{name} not found: install RabbitMQ (Debian: apt-get install rabbitmq-server)"
    return found


class Node:
    """A RabbitMQ node of its own name, ports, data and config, run as the rabbitmq user
    (whose home holds the Erlang cookie that rabbitmqctl shares)."""

    def __init__(self, base: Path, config: str) -> None:
        self.name = f"adpcfg{uuid.uuid4().hex[:8]}@localhost"
        self.base = base
        port, dist = free_port(), free_port()
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n{config}")
        (base / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ,
            "HOME": os.path.expanduser("~rabbitmq"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_DIST_PORT": str(dist),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        }
        shutil.chown(base, "rabbitmq", "rabbitmq")
        for path in base.iterdir():
            shutil.chown(path, "rabbitmq", "rabbitmq")

    def run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", "rabbitmq", "--", _tool(tool), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ctl(self, *args: str) -> str:
        result = self.run("rabbitmqctl", "-n", self.name, *args)
        assert result.returncode == 0, f"rabbitmqctl {args}: {result.stderr}\n{self.log()}"
        return result.stdout.strip()

    def log(self) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in logs)


@contextmanager
def _node(config: str) -> Iterator[Node]:
    # Not under pytest's tmp_path: its parents are root's alone, and the node runs as
    # the rabbitmq user.
    base = Path(tempfile.mkdtemp(prefix="adp-rabbitmq-config-"))
    base.chmod(0o755)
    node = Node(base, config)
    try:
        started = node.run("rabbitmq-server", "-detached")
        assert started.returncode == 0, started.stderr
        # `await_startup` needs the node registered first; both take seconds, more under load.
        deadline = time.monotonic() + 120
        while node.run("rabbitmq-diagnostics", "-n", node.name, "-q", "ping").returncode != 0:
            assert time.monotonic() < deadline, f"the node did not come up:\n{node.log()}"
            time.sleep(1)
        up = node.run("rabbitmqctl", "-n", node.name, "await_startup", "-t", "120", timeout=150)
        assert up.returncode == 0, f"the node did not start with this config:\n{node.log()}"
        yield node
    finally:
        node.run("rabbitmqctl", "-n", node.name, "stop", timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _eval(node: Node, expression: str) -> str:
    return node.ctl("eval", expression)


def _chart_conf(*args: str) -> str:
    (config,) = [
        item
        for item in _render(*args)
        if item["kind"] == "ConfigMap" and item["metadata"]["name"].endswith("-rabbitmq-config")
    ]
    text: str = config["data"]["adp.conf"]
    return text


@pytest.mark.parametrize(
    ("source", "limit", "alarm"),
    [
        ("chart-cluster", 1610612736, 644245094),
        ("compose-ha", 1073741824, 429496729),
    ],
)
def test_rabbitmq_starts_with_the_written_config_and_applies_it(
    source: str, limit: int, alarm: int
) -> None:
    # The one-node file is the cluster's memory lines alone (the same template).
    if source == "chart-cluster":
        memory = ("--set-string", "rabbitmq.resources.limits.memory=1536Mi")
        config = _chart_conf(*CLUSTER, *memory)
        assert "cluster_formation.peer_discovery_backend = k8s" in config
        config = config.replace(
            "cluster_formation.peer_discovery_backend = k8s",
            "cluster_formation.peer_discovery_backend = classic_config",
        )
    else:
        # The listed peers do not exist here: discovery gives up and the node starts alone.
        config = HA_CONF.read_text() + "cluster_formation.discovery_retry_limit = 1\n"
    with _node(config) as node:
        assert _eval(node, "vm_memory_monitor:get_total_memory().") == str(limit)
        assert _eval(node, "vm_memory_monitor:get_memory_limit().") == str(alarm)
        handling = _eval(node, "application:get_env(rabbit, cluster_partition_handling).")
        assert handling == "{ok,pause_minority}"
        locator = _eval(node, "application:get_env(rabbit, queue_leader_locator).")
        assert re.search(r"balanced", locator), locator
