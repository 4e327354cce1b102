"""kopf handlers: thin and typed; the work is in `reconcile`. Registered on an explicit
registry built from the settings (no import-time globals), so tests can call the timer
handler directly with kopf's arguments and a `memo` holding a recorder."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

from services.operator.cluster import KubernetesCluster, ObjectRef
from services.operator.login import NoCredentials, find, login
from services.operator.observe import HttpPools, RabbitBacklog
from services.operator.reconcile import Readers, Unavailable, reconcile
from services.operator.resource import GROUP, KIND, PLURAL, VERSION, InvalidSpec, parse_spec
from services.operator.settings import OperatorSettings


@dataclass(frozen=True, slots=True)
class EndlessBackoffs:
    """kopf's delays between retries of a failed API request: 1, 2, 4... seconds up to
    `cap`, then `cap` for as long as it takes. Not Sized, so kopf never gives up: with its
    default (8 retries over about 54 s) an API server away for longer (a control-plane
    upgrade, a cluster still starting) ends the operator, a crash loop. kopf logs every
    failed attempt, numbered."""

    cap: float

    def __iter__(self) -> Iterator[float]:
        delay = 1.0
        while True:
            yield min(delay, self.cap)
            delay *= 2


async def startup(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
    """Open the clients once; they live in kopf's memo for every handler."""
    config: OperatorSettings = memo.config
    settings.posting.level = logging.WARNING  # our own Events say what was decided
    # Only the watched namespace and our own CRD are served: no cluster-wide scanning of
    # namespaces and CRDs, which the namespaced Role does not allow (403 warnings).
    settings.scanning.disabled = True
    settings.networking.error_backoffs = EndlessBackoffs(config.retry_delay_seconds)
    try:
        credentials = find(config, settings)
    except NoCredentials as exc:
        raise kopf.PermanentError(str(exc)) from exc
    memo.cluster = KubernetesCluster.connect(credentials, config.http_timeout_seconds)
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
    # A plain registry has no login handler (the automatic ones live in kopf's default
    # registry): without this one, kopf stops with "Ran out of valid credentials".
    kopf.on.login(registry=registry)(login)
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
