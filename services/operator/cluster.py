"""The small seam between the operator and Kubernetes, and its in-cluster implementation.

Tests hand the reconciler a recorder instead (no API server runs where this is built);
the real one speaks the Kubernetes REST API with the credentials `login.find` found (the
pod's service-account token, read again for every request since it rotates), asking only
for what the chart's RBAC grants: the workload's scale subresource, pods (list, patch),
one Secret, events.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from services.operator.login import Credentials

_WORKLOADS = {"Deployment": "deployments", "StatefulSet": "statefulsets"}


class ClusterError(Exception):
    """Kubernetes could not be asked or said no; worth retrying later."""


@dataclass(frozen=True, slots=True)
class Scale:
    replicas: int
    selector: str  # the workload's pod label selector, as a query string


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    ip: str | None
    ready: bool


@dataclass(frozen=True, slots=True)
class ObjectRef:
    kind: str
    name: str
    uid: str
    api_version: str


class Cluster(Protocol):
    async def secret_value(self, namespace: str, name: str, key: str) -> str: ...

    async def scale(self, namespace: str, kind: str, name: str) -> Scale: ...

    async def set_replicas(self, namespace: str, kind: str, name: str, replicas: int) -> None: ...

    async def pods(self, namespace: str, selector: str) -> list[Pod]: ...

    async def annotate_pod(
        self, namespace: str, name: str, annotations: dict[str, str]
    ) -> None: ...

    async def event(self, namespace: str, about: ObjectRef, reason: str, message: str) -> None: ...


class KubernetesCluster:
    """REST client of the Kubernetes API, authenticated per request with `credentials`
    (a service-account token file is read again each time: it rotates)."""

    def __init__(self, session: aiohttp.ClientSession, credentials: Credentials) -> None:
        self._session = session
        self._credentials = credentials

    @classmethod
    def connect(cls, credentials: Credentials, timeout: float = 10.0) -> KubernetesCluster:
        connector = (
            aiohttp.TCPConnector(ssl=credentials.ssl_context())
            if credentials.server.startswith("https:")
            else aiohttp.TCPConnector()
        )
        session = aiohttp.ClientSession(
            base_url=credentials.server,
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeout),
        )
        return cls(session, credentials)

    async def close(self) -> None:
        await self._session.close()

    async def secret_value(self, namespace: str, name: str, key: str) -> str:
        secret = await self._call("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        try:
            return base64.b64decode(secret["data"][key]).decode()
        except KeyError as exc:
            raise ClusterError(f"secret {name} has no key {key}") from exc

    async def scale(self, namespace: str, kind: str, name: str) -> Scale:
        body = await self._call("GET", self._scale_path(namespace, kind, name))
        return Scale(int(body["spec"].get("replicas", 0)), body["status"].get("selector", ""))

    async def set_replicas(self, namespace: str, kind: str, name: str, replicas: int) -> None:
        await self._call(
            "PATCH", self._scale_path(namespace, kind, name), {"spec": {"replicas": replicas}}
        )

    async def pods(self, namespace: str, selector: str) -> list[Pod]:
        body = await self._call(
            "GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={quote(selector)}"
        )
        return [_pod(item) for item in body.get("items", [])]

    async def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        await self._call(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}",
            {"metadata": {"annotations": annotations}},
        )

    async def event(self, namespace: str, about: ObjectRef, reason: str, message: str) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        await self._call(
            "POST",
            f"/api/v1/namespaces/{namespace}/events",
            {
                "metadata": {"generateName": f"{about.name}-", "namespace": namespace},
                "involvedObject": {
                    "apiVersion": about.api_version,
                    "kind": about.kind,
                    "name": about.name,
                    "namespace": namespace,
                    "uid": about.uid,
                },
                "reason": reason,
                "message": message[:1000],
                "type": "Normal",
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
                "source": {"component": "async-data-processor-operator"},
            },
        )

    @staticmethod
    def _scale_path(namespace: str, kind: str, name: str) -> str:
        return f"/apis/apps/v1/namespaces/{namespace}/{_WORKLOADS[kind]}/{name}/scale"

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        try:
            headers.update(self._credentials.headers())
        except OSError as exc:
            raise ClusterError(f"cannot read the service-account token: {exc}") from exc
        try:
            async with self._session.request(method, path, json=body, headers=headers) as r:
                if r.status >= 400:
                    raise ClusterError(f"{method} {path}: {r.status} {await r.text()}")
                return await r.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClusterError(f"{method} {path}: {exc}") from exc


def _pod(item: dict[str, Any]) -> Pod:
    conditions = item.get("status", {}).get("conditions", [])
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return Pod(
        name=item["metadata"]["name"],
        ip=item.get("status", {}).get("podIP"),
        ready=ready,
    )
