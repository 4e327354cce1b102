"""The scaling rule, as a pure function (no I/O, no clock): tested exhaustively.

Two tiers of scaling: inside a pod each shard's pool grows 3 -> 4 workers by itself; this
rule adds pods only when that is not enough — the backlog per replica is above target, it
is not shrinking, and every pool of every pod is already at its maximum — and removes pods
one at a time, only after the backlog has stayed small for a cool-down. One step per
reconciliation; never outside [minReplicas, maxReplicas].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["up", "down", "hold", "clamp"]


@dataclass(frozen=True, slots=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target_backlog_per_replica: int
    scale_down_backlog_per_replica: int
    cooldown_seconds: float


@dataclass(frozen=True, slots=True)
class Observation:
    replicas: int  # the workload's current spec.replicas
    backlog: int  # ready messages over all shard queues
    previous_backlog: int | None  # at the last reconciliation
    saturated: bool  # every pool of every pod at its maximum


@dataclass(frozen=True, slots=True)
class Memory:
    """What the decision needs from earlier ones (kept in the resource's status)."""

    last_scale_at: float | None = None
    low_since: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    action: Action
    reason: str
    memory: Memory


def decide(policy: Policy, seen: Observation, memory: Memory, now: float) -> Decision:
    replicas = seen.replicas
    if replicas < policy.min_replicas or replicas > policy.max_replicas:
        bounded = min(max(replicas, policy.min_replicas), policy.max_replicas)
        return Decision(
            bounded,
            "clamp",
            f"{replicas} replicas is outside [{policy.min_replicas}, {policy.max_replicas}]",
            Memory(now, None),
        )
    per_replica = seen.backlog / replicas
    if per_replica > policy.target_backlog_per_replica:
        return _above_target(policy, seen, memory, per_replica, now)
    if per_replica > policy.scale_down_backlog_per_replica:
        return Decision(
            replicas,
            "hold",
            f"backlog {per_replica:.0f}/replica within bounds",
            Memory(memory.last_scale_at, None),
        )
    return _below_target(policy, seen, memory, per_replica, now)


def _above_target(
    policy: Policy, seen: Observation, memory: Memory, per_replica: float, now: float
) -> Decision:
    replicas = seen.replicas
    keep = Memory(memory.last_scale_at, None)
    why = f"backlog {per_replica:.0f}/replica above target {policy.target_backlog_per_replica}"
    if replicas >= policy.max_replicas:
        return Decision(replicas, "hold", f"{why}, already at maxReplicas", keep)
    if not seen.saturated:
        return Decision(replicas, "hold", f"{why}, but the pools have room to grow", keep)
    if seen.previous_backlog is not None and seen.backlog < seen.previous_backlog:
        return Decision(replicas, "hold", f"{why}, but it is shrinking", keep)
    return Decision(replicas + 1, "up", f"{why}, growing, every pool at its maximum", Memory(now))


def _below_target(
    policy: Policy, seen: Observation, memory: Memory, per_replica: float, now: float
) -> Decision:
    replicas = seen.replicas
    low_since = memory.low_since if memory.low_since is not None else now
    why = f"backlog {per_replica:.0f}/replica at or below {policy.scale_down_backlog_per_replica}"
    if replicas <= policy.min_replicas:
        return Decision(
            replicas,
            "hold",
            f"{why}, already at minReplicas",
            Memory(memory.last_scale_at, low_since),
        )
    calm_since = max(low_since, memory.last_scale_at or low_since)
    waited = now - calm_since
    if waited < policy.cooldown_seconds:
        left = policy.cooldown_seconds - waited
        return Decision(
            replicas,
            "hold",
            f"{why}, cooling down ({left:.0f}s left)",
            Memory(memory.last_scale_at, low_since),
        )
    # The next step down waits a full cool-down again.
    return Decision(replicas - 1, "down", f"{why} for {waited:.0f}s", Memory(now, now))
