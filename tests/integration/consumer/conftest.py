"""The consumer service's settings for tests: its own queues, a temporary output
directory, short timers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.common.topology import Topology
from services.consumer.settings import ConsumerSettings

Settings = Callable[..., ConsumerSettings]


@pytest.fixture
def settings(rabbitmq_url: str, tmp_path: Path) -> Settings:
    def make(topo: Topology, **overrides: Any) -> ConsumerSettings:
        values: dict[str, Any] = {
            "rabbitmq_url": rabbitmq_url,
            "queue_prefix": topo.prefix,
            "shards_count": topo.shards_count,
            "data_output_dir": tmp_path / "out",
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "batch_max_wait_seconds": 0.2,
            "history_log_interval_seconds": 0,
            "host_name": "testhost",
            "scale_interval_seconds": 0.2,
            **overrides,
        }
        return ConsumerSettings(**values)

    return make
