"""The timer handler called directly with kopf's arguments; Kubernetes is a recorder behind
the operator's `Cluster` seam, the broker and pods are readers behind theirs."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import kopf
import pytest

from services.common.topology import Topology
from services.operator.cluster import ObjectRef, Pod, Scale
from services.operator.handlers import cleanup, on_timer, startup
from services.operator.observe import ObserveError, PoolState
from services.operator.reconcile import DELETION_COST, Readers
from services.operator.settings import OperatorSettings

SPEC = {
    "workload": {"kind": "Deployment", "name": "adp-consumer"},
    "minReplicas": 1,
    "maxReplicas": 3,
    "targetBacklogPerReplica": 100,
    "scaleDownCooldownSeconds": 60,
    "broker": {"secretName": "adp-broker", "shardsCount": 2},
}


@dataclass
class Recorder:
    """A cluster that remembers what the operator asked of it."""

    replicas: int = 2
    pod_list: list[Pod] = field(
        default_factory=lambda: [Pod("c-a", "10.0.0.1", True), Pod("c-b", "10.0.0.2", True)]
    )
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    async def secret_value(self, namespace: str, name: str, key: str) -> str:
        self.calls.append(("secret", namespace, name, key))
        return "amqp://u:p@broker:5672/"

    async def scale(self, namespace: str, kind: str, name: str) -> Scale:
        return Scale(self.replicas, "app.kubernetes.io/component=consumer")

    async def set_replicas(self, namespace: str, kind: str, name: str, replicas: int) -> None:
        self.calls.append(("scale", kind, name, replicas))
        self.replicas = replicas

    async def pods(self, namespace: str, selector: str) -> list[Pod]:
        return list(self.pod_list)

    async def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self.calls.append(("annotate", name, annotations))

    async def event(self, namespace: str, about: ObjectRef, reason: str, message: str) -> None:
        self.calls.append(("event", about.kind, about.name, reason))


class Backlog:
    def __init__(self, counts: list[int] | Exception) -> None:
        self.counts = counts

    async def backlog(self, url: str, topology: Topology) -> list[int]:
        if isinstance(self.counts, Exception):
            raise self.counts
        assert topology.queue_names == ["task_queue_0", "task_queue_1"]
        return self.counts


class Pools:
    def __init__(self, by_ip: dict[str, list[PoolState]] | Exception) -> None:
        self.by_ip = by_ip

    async def pools(self, ip: str, port: int) -> list[PoolState]:
        if isinstance(self.by_ip, Exception):
            raise self.by_ip
        assert port == 9100
        return self.by_ip[ip]


def full(inflight: int) -> list[PoolState]:
    return [PoolState(0, 4, 4, inflight), PoolState(1, 4, 4, inflight)]


def room() -> list[PoolState]:
    return [PoolState(0, 3, 4, 0), PoolState(1, 4, 4, 0)]


async def tick(
    cluster: Recorder,
    backlog: Backlog,
    pools: Pools,
    status: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
) -> kopf.Patch:
    patch = kopf.Patch()
    memo = kopf.Memo(
        config=OperatorSettings(retry_delay_seconds=7),
        cluster=cluster,
        readers=Readers(backlog, pools),
    )
    await on_timer(
        spec=cast(kopf.Spec, spec or SPEC),
        status=cast(kopf.Status, status or {}),
        name="scaler",
        namespace="prod",
        uid="uid-1",
        patch=patch,
        memo=memo,
        logger=logging.getLogger("test"),
    )
    return patch


async def test_scales_up_one_step_when_backlog_grows_and_every_pool_is_full() -> None:
    cluster = Recorder()
    patch = await tick(
        cluster,
        Backlog([300, 200]),
        Pools({"10.0.0.1": full(5), "10.0.0.2": full(9)}),
        status={"backlog": 400},
    )
    assert ("scale", "Deployment", "adp-consumer", 3) in cluster.calls
    assert ("event", "ConsumerAutoscaler", "scaler", "ScaledUp") in cluster.calls
    assert not [c for c in cluster.calls if c[0] == "annotate"]
    status = patch.status
    assert (status["replicas"], status["desiredReplicas"], status["backlog"]) == (2, 3, 500)
    assert status["backlogPerShard"] == [300, 200]
    assert status["saturated"] is True
    assert status["lastDecision"]["action"] == "up"


async def test_holds_while_a_pool_can_still_grow_in_its_pod() -> None:
    cluster = Recorder()
    patch = await tick(
        cluster, Backlog([300, 200]), Pools({"10.0.0.1": full(0), "10.0.0.2": room()})
    )
    assert not [c for c in cluster.calls if c[0] in ("scale", "event", "annotate")]
    assert patch.status["lastDecision"]["action"] == "hold"
    assert "room to grow" in patch.status["lastDecision"]["reason"]


async def test_scale_down_marks_the_least_busy_pod_first_then_scales() -> None:
    cluster = Recorder()
    long_ago = time.time() - 3600
    await tick(
        cluster,
        Backlog([0, 1]),
        Pools({"10.0.0.1": full(50), "10.0.0.2": full(3)}),
        status={"lowSince": long_ago, "lastScaleTime": long_ago},
    )
    kinds = [c[0] for c in cluster.calls if c[0] != "secret"]
    assert kinds == ["annotate", "scale", "event"]
    assert cluster.calls[1] == ("annotate", "c-b", {DELETION_COST: "-1000"})
    assert ("scale", "Deployment", "adp-consumer", 1) in cluster.calls


async def test_no_scale_down_before_the_cooldown() -> None:
    cluster = Recorder()
    patch = await tick(cluster, Backlog([0, 0]), Pools({"10.0.0.1": full(0), "10.0.0.2": full(0)}))
    assert not [c for c in cluster.calls if c[0] in ("scale", "annotate")]
    assert patch.status["lowSince"] is not None  # the cool-down starts now


@pytest.mark.parametrize(
    ("backlog", "pools"),
    [
        (Backlog(ObserveError("broker: connection refused")), Pools({})),
        (Backlog([500, 0]), Pools(ObserveError("http://10.0.0.1:9100/pools: timeout"))),
    ],
)
async def test_unreachable_broker_or_pod_is_a_temporary_error_changing_nothing(
    backlog: Backlog, pools: Pools
) -> None:
    cluster = Recorder()
    with pytest.raises(kopf.TemporaryError) as info:
        await tick(cluster, backlog, pools)
    assert info.value.delay == 7
    assert not [c for c in cluster.calls if c[0] in ("scale", "annotate", "event")]


async def test_an_invalid_spec_is_a_permanent_error() -> None:
    spec = {**SPEC, "minReplicas": 5, "maxReplicas": 2}
    with pytest.raises(kopf.PermanentError, match="minReplicas must not exceed maxReplicas"):
        await tick(Recorder(), Backlog([0, 0]), Pools({}), spec=spec)


async def test_a_statefulset_scales_down_without_marking_a_pod() -> None:
    """StatefulSets remove their highest ordinal whatever the annotation says."""
    cluster = Recorder()
    long_ago = time.time() - 3600
    spec = {**SPEC, "workload": {"kind": "StatefulSet", "name": "adp-consumer"}}
    await tick(
        cluster,
        Backlog([0, 0]),
        Pools({"10.0.0.1": full(50), "10.0.0.2": full(3)}),
        status={"lowSince": long_ago, "lastScaleTime": long_ago},
        spec=spec,
    )
    assert ("scale", "StatefulSet", "adp-consumer", 1) in cluster.calls
    assert not [c for c in cluster.calls if c[0] == "annotate"]


async def test_startup_serves_only_its_namespace_and_retries_the_api_without_end(
    tmp_path: Path,
) -> None:
    (tmp_path / "token").write_text("t")
    config = OperatorSettings(
        service_account_dir=tmp_path, kubernetes_service_host="127.0.0.1", retry_delay_seconds=8
    )
    memo = kopf.Memo(config=config)
    settings = kopf.OperatorSettings()
    await startup(memo=memo, settings=settings)
    try:
        # No cluster-wide listing of namespaces and CRDs: the Role is namespaced.
        assert settings.scanning.disabled is True
        backoffs = settings.networking.error_backoffs
        assert isinstance(backoffs, Iterable)
        assert not isinstance(backoffs, Sized)  # kopf counts no last attempt
        assert list(itertools.islice(backoffs, 6)) == [1, 2, 4, 8, 8, 8]
    finally:
        await cleanup(memo=memo)


async def test_startup_without_credentials_is_a_permanent_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    memo = kopf.Memo(config=OperatorSettings(service_account_dir=tmp_path))
    with pytest.raises(kopf.PermanentError, match="no Kubernetes credentials"):
        await startup(memo=memo, settings=kopf.OperatorSettings())
