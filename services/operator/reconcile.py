"""One reconciliation of a ConsumerAutoscaler: observe, decide, act, report.

Observe the broker backlog per shard and every ready consumer pod's pools; decide with
`decision.decide`; before a scale-down mark the least busy pod (fewest in-flight entries)
with `controller.kubernetes.io/pod-deletion-cost` so the ReplicaSet removes it first (its
graceful shutdown drains it; unacked work is redelivered either way); patch the workload's
scale; write the status; post an Event for each change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.common.topology import Topology
from services.operator.cluster import Cluster, ClusterError, ObjectRef
from services.operator.decision import Decision, Memory, Observation, Policy, decide
from services.operator.observe import BacklogReader, ObserveError, PoolReader, PoolState
from services.operator.resource import AutoscalerSpec

log = logging.getLogger(__name__)

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


class Unavailable(Exception):
    """Something needed could not be reached; the handler retries after a delay."""


@dataclass(frozen=True, slots=True)
class Readers:
    backlog: BacklogReader
    pools: PoolReader


async def reconcile(
    spec: AutoscalerSpec,
    status: dict[str, Any],
    namespace: str,
    about: ObjectRef,
    cluster: Cluster,
    readers: Readers,
    now: float,
) -> dict[str, Any]:
    """Returns the new status. Raises `Unavailable` when it cannot observe or act."""
    try:
        url = await cluster.secret_value(namespace, spec.broker.secret_name, spec.broker.secret_key)
        scale = await cluster.scale(namespace, spec.workload.kind, spec.workload.name)
        pods = [p for p in await cluster.pods(namespace, scale.selector) if p.ready and p.ip]
        topology = Topology(spec.broker.queue_prefix, spec.broker.shards_count)
        backlog = await readers.backlog.backlog(url, topology)
        pools = {
            pod.name: await readers.pools.pools(pod.ip or "", spec.metrics_port) for pod in pods
        }
    except (ClusterError, ObserveError) as exc:
        raise Unavailable(str(exc)) from exc

    saturated = bool(pools) and all(p.saturated for states in pools.values() for p in states)
    seen = Observation(scale.replicas, sum(backlog), status.get("backlog"), saturated)
    memory = Memory(status.get("lastScaleTime"), status.get("lowSince"))
    decision = decide(_policy(spec), seen, memory, now)
    try:
        await _act(spec, namespace, about, cluster, decision, scale.replicas, pools)
    except ClusterError as exc:
        raise Unavailable(str(exc)) from exc
    return {
        "replicas": scale.replicas,
        "desiredReplicas": decision.replicas,
        "backlog": sum(backlog),
        "backlogPerShard": backlog,
        "saturated": saturated,
        "readyPods": len(pods),
        "lastDecision": {
            "action": decision.action,
            "reason": decision.reason,
            "time": datetime.fromtimestamp(now, UTC).isoformat(),
        },
        "lastScaleTime": decision.memory.last_scale_at,
        "lowSince": decision.memory.low_since,
    }


def _policy(spec: AutoscalerSpec) -> Policy:
    return Policy(
        spec.min_replicas,
        spec.max_replicas,
        spec.target_backlog_per_replica,
        spec.scale_down_threshold,
        spec.scale_down_cooldown_seconds,
    )


async def _act(
    spec: AutoscalerSpec,
    namespace: str,
    about: ObjectRef,
    cluster: Cluster,
    decision: Decision,
    current: int,
    pools: dict[str, list[PoolState]],
) -> None:
    if decision.replicas == current:
        return
    # pod-deletion-cost is honoured by ReplicaSets (Deployments); a StatefulSet always
    # removes its highest ordinal, which then drains on SIGTERM like any consumer.
    if decision.replicas < current and pools and spec.workload.kind == "Deployment":
        victim = least_busy(pools)
        await cluster.annotate_pod(namespace, victim, {DELETION_COST: "-1000"})
        log.info("marked pod %s (least busy) to be removed first", victim)
    workload = spec.workload
    await cluster.set_replicas(namespace, workload.kind, workload.name, decision.replicas)
    change = f"{current} -> {decision.replicas} replicas"
    message = f"{workload.kind} {workload.name}: {change} ({decision.reason})"
    log.info("%s", message)
    await cluster.event(namespace, about, f"Scaled{decision.action.capitalize()}", message)


def least_busy(pools: dict[str, list[PoolState]]) -> str:
    """The pod with the fewest entries in flight (ties: the fewest live workers, then by
    name, so the choice is stable)."""
    return min(
        pools,
        key=lambda pod: (
            sum(p.inflight_entries for p in pools[pod]),
            sum(p.live for p in pools[pod]),
            pod,
        ),
    )
