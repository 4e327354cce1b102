from __future__ import annotations

import pytest

from services.consumer.autoscaler import Hysteresis


def run(depths: list[int], cooldown: float = 3) -> list[str | None]:
    state = Hysteresis(up=100, down=10, cooldown=cooldown)
    return [state.decide(depth, float(t)) for t, depth in enumerate(depths)]


def test_grows_at_the_backlog_threshold() -> None:
    assert run([0, 99, 100, 500]) == [None, None, "grow", "grow"]


def test_shrinks_only_after_a_full_cooldown_of_shallow_readings() -> None:
    assert run([500, 5, 5, 5, 5, 5, 5, 5]) == [
        "grow",
        None,
        None,
        None,
        "shrink",
        None,
        None,
        "shrink",
    ]


@pytest.mark.parametrize("middle", [11, 50, 99])
def test_a_reading_between_thresholds_restarts_the_cooldown(middle: int) -> None:
    assert run([5, 5, middle, 5, 5, 5, 5]) == [None, None, None, None, None, None, "shrink"]


def test_does_not_flap_around_one_threshold() -> None:
    decisions = run([100, 99, 100, 99, 101, 98, 100])
    assert "shrink" not in decisions
