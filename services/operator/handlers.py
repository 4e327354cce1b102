"""kopf handlers: thin and typed; the work is in `reconcile`. Registered on an explicit
registry built from the settings (no import-time globals), so tests can call the timer
handler directly with kopf's arguments and a `memo` holding a recorder."""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import kopf

from services.operator.cluster import KubernetesCluster, ObjectRef
from services.operator.observe import HttpPools, RabbitBacklog
from services.operator.reconcile import Readers, Unavailable, reconcile
from services.operator.resource import GROUP, KIND, PLURAL, VERSION, InvalidSpec, parse_spec
from services.operator.settings import OperatorSettings


async def startup(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
    """Open the clients once; they live in kopf's memo for every handler."""
    config: OperatorSettings = memo.config
    settings.posting.level = logging.WARNING  # our own Events say what was decided
    try:
        memo.cluster = KubernetesCluster.in_cluster(config.http_timeout_seconds)
    except OSError as exc:
        raise kopf.PermanentError(
            f"not inside Kubernetes (no service-account token: {exc}); the operator runs in "
            "a pod with the chart's ServiceAccount"
        ) from exc
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=config.http_timeout_seconds)
    )
    memo.session = session
    memo.readers = Readers(RabbitBacklog(config.http_timeout_seconds), HttpPools(session))


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo.cluster.close()
    await memo.session.close()


async def on_timer(
    spec: kopf.Spec,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    config: OperatorSettings = memo.config
    if namespace is None:  # the CRD is namespaced: kopf always passes one
        raise kopf.PermanentError("a ConsumerAutoscaler must be namespaced")
    try:
        parsed = parse_spec(dict(spec))
    except InvalidSpec as exc:
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc
    about = ObjectRef(KIND, name, uid, f"{GROUP}/{VERSION}")
    try:
        new_status = await reconcile(
            parsed, dict(status), namespace, about, memo.cluster, memo.readers, time.time()
        )
    except Unavailable as exc:
        logger.warning("cannot reconcile now: %s", exc)
        raise kopf.TemporaryError(str(exc), delay=config.retry_delay_seconds) from exc
    patch.status.update(new_status)


def register(config: OperatorSettings) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    kopf.on.startup(registry=registry)(startup)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        interval=config.reconcile_interval_seconds,
        registry=registry,
    )(on_timer)
    return registry


def run(config: OperatorSettings) -> None:
    memo = kopf.Memo(config=config)
    namespaces = [config.watch_namespace] if config.watch_namespace else []
    kopf.run(
        registry=register(config),
        memo=memo,
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
    )
