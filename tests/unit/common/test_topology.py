from __future__ import annotations

import pytest

from services.common.settings import ServiceSettings
from services.common.topology import Topology


def test_queue_per_shard_named_by_prefix() -> None:
    topo = Topology.from_settings(ServiceSettings(shards_count=3))
    assert topo.queue_names == ["task_queue_0", "task_queue_1", "task_queue_2"]
    with pytest.raises(ValueError, match="outside"):
        topo.queue_name(3)


def test_bounded_queues_reject_publishes_instead_of_dropping() -> None:
    assert Topology("q_", 1).queue_arguments == {}
    assert Topology("q_", 1, max_length=10).queue_arguments == {
        "x-max-length": 10,
        "x-overflow": "reject-publish",
    }


def test_quorum_queues_have_a_delivery_limit_and_a_dead_letter_queue() -> None:
    topo = Topology("q_", 2, queue_type="quorum", delivery_limit=3)
    assert topo.queue_arguments == {
        "x-queue-type": "quorum",
        "x-queue-leader-locator": "balanced",
        "x-delivery-limit": 3,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "q_dead",
    }
    assert topo.dead_letter_queue == "q_dead"


def test_the_dead_letter_queue_is_of_the_shards_type() -> None:
    assert Topology("q_", 2).dead_letter_arguments == {}
    assert Topology("q_", 2, queue_type="quorum").dead_letter_arguments == {
        "x-queue-type": "quorum",
        "x-queue-leader-locator": "balanced",
    }
