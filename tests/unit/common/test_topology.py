from __future__ import annotations

import pytest

from services.common.settings import BrokerSettings
from services.common.topology import Topology


def test_queue_per_shard_named_by_prefix() -> None:
    topo = Topology.from_settings(BrokerSettings(shards_count=3))
    assert topo.queue_names == ["task_queue_0", "task_queue_1", "task_queue_2"]
    with pytest.raises(ValueError, match="outside"):
        topo.queue_name(3)


def test_bounded_queues_reject_publishes_instead_of_dropping() -> None:
    assert Topology("q_", 1).queue_arguments == {}
    assert Topology("q_", 1, max_length=10).queue_arguments == {
        "x-max-length": 10,
        "x-overflow": "reject-publish",
    }
