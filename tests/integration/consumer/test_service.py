"""The consumer service's start-up and shutdown: what started is stopped, also when the
start-up fails half-way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NoReturn

import pytest

import services.consumer.service as service_module
from services.common.metrics import new_registry
from services.common.topology import Topology
from services.consumer.service import ConsumerService
from tests.integration.consumer.conftest import Settings

pytestmark = pytest.mark.rabbitmq


class FailingAutoscaler:
    """Stands in for the autoscaler: building it fails, a step of the start-up that comes
    after the pools have started their workers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("autoscaler refused")

    @classmethod
    def from_settings(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("autoscaler refused")


async def test_a_start_up_failing_after_the_pools_started_leaves_nothing_running(
    settings: Settings,
    topology: Callable[..., Topology],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topo = topology()
    service = ConsumerService(settings(topo, workers_min=2), new_registry(process=False))
    monkeypatch.setattr(service_module, "Autoscaler", FailingAutoscaler)
    before = asyncio.all_tasks()  # the workers, the broker's connect task, the loops: new
    with pytest.raises(RuntimeError, match="autoscaler refused"):
        await service.__aenter__()
    # The pools had started their workers before the failure.
    assert len(service.history.records()) == 2 * topo.shards_count
    left = [task for task in asyncio.all_tasks() - before if not task.done()]
    assert left == [], f"tasks left running after a failed start-up: {left}"
    assert not service._broker.connected
    assert service._executor._shutdown
