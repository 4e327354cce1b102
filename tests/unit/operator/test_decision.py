from __future__ import annotations

import pytest

from services.operator.decision import Decision, Memory, Observation, Policy, decide

POLICY = Policy(
    min_replicas=1,
    max_replicas=5,
    target_backlog_per_replica=1000,
    scale_down_backlog_per_replica=100,
    cooldown_seconds=300,
)


def step(
    replicas: int,
    backlog: int,
    *,
    previous: int | None = None,
    saturated: bool = True,
    memory: Memory | None = None,
    now: float = 10_000.0,
) -> Decision:
    return decide(
        POLICY, Observation(replicas, backlog, previous, saturated), memory or Memory(), now
    )


def test_grows_one_step_when_above_target_growing_and_saturated() -> None:
    decision = step(2, 2001 * 2, previous=3000)
    assert (decision.replicas, decision.action) == (3, "up")
    assert decision.memory.last_scale_at == 10_000.0


@pytest.mark.parametrize(
    ("saturated", "previous", "reason"),
    [
        (False, None, "room to grow"),  # in-pod scaling first
        (True, 9000, "shrinking"),  # already draining: more pods would only flap
    ],
)
def test_holds_above_target_unless_pools_are_full_and_backlog_grows(
    saturated: bool, previous: int | None, reason: str
) -> None:
    decision = step(2, 5000, previous=previous, saturated=saturated)
    assert (decision.replicas, decision.action) == (2, "hold")
    assert reason in decision.reason


def test_never_above_max() -> None:
    decision = step(5, 100_000)
    assert (decision.replicas, decision.action) == (5, "hold")


@pytest.mark.parametrize(("replicas", "bounded"), [(0, 1), (9, 5)])
def test_a_workload_outside_the_bounds_is_brought_back(replicas: int, bounded: int) -> None:
    decision = step(replicas, 0)
    assert (decision.replicas, decision.action) == (bounded, "clamp")


def test_at_target_exactly_is_not_above() -> None:
    assert step(2, 2000).action == "hold"


def test_shrinks_only_after_a_full_cooldown_of_small_backlog() -> None:
    first = step(3, 30, now=0)
    assert (first.action, first.memory.low_since) == ("hold", 0)
    waiting = step(3, 30, memory=first.memory, now=299)
    assert waiting.action == "hold"
    assert "cooling down" in waiting.reason
    down = step(3, 30, memory=waiting.memory, now=300)
    assert (down.replicas, down.action) == (2, "down")
    again = step(2, 20, memory=down.memory, now=301)
    assert again.action == "hold"  # the next step down waits a full cool-down again
    assert step(2, 20, memory=down.memory, now=600).replicas == 1


def test_a_larger_backlog_in_between_restarts_the_cooldown() -> None:
    low = step(3, 30, now=0)
    middle = step(3, 600, memory=low.memory, now=200)
    assert middle.memory.low_since is None
    assert step(3, 30, memory=middle.memory, now=400).action == "hold"


def test_no_scale_down_within_a_cooldown_of_a_scale_up() -> None:
    up = step(2, 5000, previous=4000, now=0)
    assert up.action == "up"
    low = step(3, 0, memory=up.memory, now=10)
    later = step(3, 0, memory=low.memory, now=299)
    assert later.action == "hold"
    assert step(3, 0, memory=later.memory, now=310).action == "down"


def test_never_below_min() -> None:
    decision = step(1, 0, memory=Memory(None, 0), now=10_000)
    assert (decision.replicas, decision.action) == (1, "hold")


def test_flapping_input_moves_at_most_one_step_per_call_and_stays_in_bounds() -> None:
    memory = Memory()
    replicas = 3
    previous: int | None = None
    for t, backlog in enumerate([50_000, 0, 50_000, 0, 60_000, 10, 70_000, 0] * 5):
        decision = step(replicas, backlog, previous=previous, memory=memory, now=float(t))
        assert abs(decision.replicas - replicas) <= 1
        assert POLICY.min_replicas <= decision.replicas <= POLICY.max_replicas
        assert decision.action != "down"  # the cool-down never completes
        replicas, memory, previous = decision.replicas, decision.memory, backlog
