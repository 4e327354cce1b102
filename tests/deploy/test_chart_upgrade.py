"""What the chart refuses at upgrade time, where `lookup` sees the live objects.

No Kubernetes runs here, and `helm template` alone answers every `lookup` with nothing. So
the real helm renders with `--dry-run=server` against a stand-in API server: a small HTTP
server answering the discovery documents helm asks for and the live objects each test puts
there (404 for anything else). It stands in for Kubernetes only at the seam helm itself
uses (the REST API through a kubeconfig); everything on the chart's side is real.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.test_chart import CHART, _helm
from tests.support.net import free_port

NAMESPACE = "adp"
FULLNAME = "adp-async-data-processor"
KINDS = {
    "": {"secrets": "Secret", "services": "Service", "configmaps": "ConfigMap", "pods": "Pod"}
    | {"serviceaccounts": "ServiceAccount"},
    "apps": {"statefulsets": "StatefulSet", "deployments": "Deployment"},
    "batch": {"jobs": "Job"},
    "policy": {"poddisruptionbudgets": "PodDisruptionBudget"},
    "rbac.authorization.k8s.io": {"roles": "Role", "rolebindings": "RoleBinding"},
    "networking.k8s.io": {"ingresses": "Ingress"},
}


def _resources(group: str) -> dict[str, Any]:
    version = f"{group}/v1" if group else "v1"
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": version,
        "resources": [
            {"name": plural, "singularName": kind.lower(), "namespaced": True, "kind": kind}
            | {"verbs": ["get", "list"]}
            for plural, kind in KINDS[group].items()
        ],
    }


def _discovery(path: str) -> dict[str, Any] | None:
    if path == "/version":
        return {"major": "1", "minor": "30", "gitVersion": "v1.30.0"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"]}
    if path == "/apis":
        groups = [group for group in KINDS if group]
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": group,
                    "versions": [{"groupVersion": f"{group}/v1", "version": "v1"}],
                    "preferredVersion": {"groupVersion": f"{group}/v1", "version": "v1"},
                }
                for group in groups
            ],
        }
    if path == "/api/v1":
        return _resources("")
    parts = path.split("/")
    if len(parts) == 4 and parts[1] == "apis" and parts[2] in KINDS and parts[3] == "v1":
        return _resources(parts[2])
    return None


class ApiServer:
    """Discovery, plus the live objects in `live` (API path -> object)."""

    def __init__(self) -> None:
        self.live: dict[str, dict[str, Any]] = {}
        live = self.live

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                body = _discovery(path) or live.get(path)
                code = 200 if body else 404
                if body is None:
                    body = {"kind": "Status", "apiVersion": "v1", "code": 404}
                    body |= {"status": "Failure", "reason": "NotFound"}
                payload = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def put(self, path: str, kind: str, name: str, spec: dict[str, Any], **extra: Any) -> None:
        """A live object of this release (Helm's ownership marks, so it may adopt it)."""
        self.live[path] = {
            "kind": kind,
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {
                    "meta.helm.sh/release-name": "adp",
                    "meta.helm.sh/release-namespace": NAMESPACE,
                },
            },
            "spec": spec,
            **extra,
        }


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[tuple[ApiServer, Path]]:
    server = ApiServer()
    server.thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.port}"}}
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    try:
        yield server, kubeconfig
    finally:
        server.server.shutdown()
        server.server.server_close()


def _upgrade(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The chart rendered as `helm upgrade` renders it: lookups answered by the server."""
    return subprocess.run(
        [
            *(_helm(), "template", "adp", str(CHART), "--namespace", NAMESPACE),
            *("--dry-run=server", "--disable-openapi-validation"),
            *("--kubeconfig", str(kubeconfig), *args),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _statefulset(server: ApiServer, component: str, replicas: int = 1, **claim: Any) -> None:
    name = f"{FULLNAME}-{component}"
    spec: dict[str, Any] = {"replicas": replicas}
    if claim:
        template_spec = {
            "accessModes": claim.get("accessModes", ["ReadWriteOnce"]),
            "resources": {"requests": {"storage": claim["size"]}},
        }
        if "storageClass" in claim:
            template_spec["storageClassName"] = claim["storageClass"]
        spec["volumeClaimTemplates"] = [{"metadata": {"name": "data"}, "spec": template_spec}]
    path = f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/{name}"
    server.put(path, "StatefulSet", name, spec, apiVersion="apps/v1")


def _installed(server: ApiServer) -> None:
    """A release installed with the defaults: 10Gi claims per consumer, 8Gi per broker node."""
    _statefulset(server, "consumer", size="10Gi")
    _statefulset(server, "rabbitmq", size="8Gi")


def test_an_upgrade_with_the_same_claims_renders(api_server: tuple[ApiServer, Path]) -> None:
    server, kubeconfig = api_server
    _installed(server)
    result = _upgrade(kubeconfig)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--set", "consumer.persistence.size=20Gi"),
            "consumer.persistence.size is 20Gi, the live claims have 10Gi",
        ),
        (
            ("--set", "consumer.persistence.storageClass=fast"),
            "consumer.persistence.storageClass is fast",
        ),
        (
            ("--set", "consumer.persistence.accessModes={ReadWriteMany}"),
            "consumer.persistence.accessModes",
        ),
        (("--set", "consumer.persistence.existingClaim=shared"), "consumer.persistence: switching"),
        (("--set", "consumer.persistence.enabled=false"), "consumer.persistence: switching"),
        (("--set", "rabbitmq.persistence.size=16Gi"), "rabbitmq.persistence.size is 16Gi"),
    ],
    ids=["size", "class", "access-modes", "existing-claim", "emptydir", "rabbitmq-size"],
)
def test_an_upgrade_changing_the_claims_is_refused_with_a_clear_message(
    api_server: tuple[ApiServer, Path], args: tuple[str, ...], message: str
) -> None:
    server, kubeconfig = api_server
    _installed(server)
    result = _upgrade(kubeconfig, *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "claims cannot change after install" in result.stderr


def test_a_one_node_broker_cannot_become_a_cluster_in_place(
    api_server: tuple[ApiServer, Path],
) -> None:
    server, kubeconfig = api_server
    _installed(server)
    result = _upgrade(kubeconfig, "-f", str(CHART / "ci" / "rabbitmq-cluster-values.yaml"))
    assert result.returncode != 0
    assert "rabbitmq.replicaCount cannot go between 1 and several nodes" in result.stderr
    # A cluster installed as one stays one, and may grow: 3 -> 5.
    _statefulset(server, "rabbitmq", replicas=3, size="8Gi")
    grown = _upgrade(
        kubeconfig,
        "-f",
        str(CHART / "ci" / "rabbitmq-cluster-values.yaml"),
        "--set",
        "rabbitmq.replicaCount=5",
    )
    assert grown.returncode == 0, grown.stderr


def test_an_upgrade_keeps_the_generated_password_and_cookie(
    api_server: tuple[ApiServer, Path],
) -> None:
    server, kubeconfig = api_server
    _installed(server)
    name = f"{FULLNAME}-rabbitmq"
    data = {"password": "kept-password", "erlang-cookie": "kept-cookie"}
    server.put(
        f"/api/v1/namespaces/{NAMESPACE}/secrets/{name}",
        "Secret",
        name,
        {},
        apiVersion="v1",
        data={key: base64.b64encode(value.encode()).decode() for key, value in data.items()},
    )
    result = _upgrade(kubeconfig)
    assert result.returncode == 0, result.stderr
    (secret,) = [
        doc
        for doc in yaml.safe_load_all(result.stdout)
        if doc and doc["kind"] == "Secret" and doc["metadata"]["name"] == name
    ]
    decoded = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert decoded["password"] == "kept-password"
    assert decoded["erlang-cookie"] == "kept-cookie"
    assert ":kept-password@" in decoded["rabbitmq-url"]
