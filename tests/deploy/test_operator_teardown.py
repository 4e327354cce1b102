"""The chart's pre-delete hook (templates/operator-teardown.yaml) run for real: its script,
taken from the rendered Job, runs with python against a stand-in API server over HTTPS
(a self-signed certificate made with openssl, given as the service account's ca.crt),
with the token and CA in a made-up service-account directory (SERVICE_ACCOUNT_DIR).

It must delete the release's ConsumerAutoscaler and wait until it is gone (the operator
removing kopf's finalizer); when the operator does not, remove the finalizer itself after
its timeout; and finish at once when the resource is already gone. No Kubernetes runs here:
the stand-in answers the few calls the script makes, as the API server does.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.test_chart import CHART, _one, _render
from tests.support.net import free_port


@dataclass
class Resource:
    """The ConsumerAutoscaler as the API server holds it."""

    exists: bool = True
    deleting: bool = False
    finalizers: list[str] = field(default_factory=lambda: ["kopf.zalando.org/KopfFinalizerMarker"])
    released_after: float | None = None  # seconds after the DELETE the operator lets it go
    deleted_at: float | None = None
    calls: list[tuple[str, str, str, Any]] = field(default_factory=list)

    def gone(self) -> bool:
        waited = 0.0 if self.deleted_at is None else time.monotonic() - self.deleted_at
        if self.deleting and self.released_after is not None and waited >= self.released_after:
            self.finalizers = []
        if self.deleting and not self.finalizers:
            self.exists = False
        return not self.exists


def _server(resource: Resource, target: str, certs: Path) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            auth = self.headers.get("Authorization", "")
            resource.calls.append((method, self.path, auth, body))
            if self.path != target or resource.gone():
                code = 404
            elif method == "DELETE":
                resource.deleting, resource.deleted_at, code = True, time.monotonic(), 200
            elif method == "PATCH":
                assert body == {"metadata": {"finalizers": None}}
                resource.finalizers, code = [], 200
            else:
                code = 200
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def do_GET(self) -> None:
            self._answer("GET")

        def do_DELETE(self) -> None:
            self._answer("DELETE")

        def do_PATCH(self) -> None:
            self._answer("PATCH")

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "ca.crt", certs / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


@pytest.fixture
def service_account(tmp_path: Path) -> Path:
    directory = tmp_path / "serviceaccount"
    directory.mkdir()
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(directory / "key.pem"), "-out", str(directory / "ca.crt")),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (directory / "token").write_text("hook-token\n")
    return directory


@pytest.fixture
def hook() -> tuple[str, dict[str, str]]:
    """The Job's script and environment, as the chart renders them."""
    manifests = _render("-f", str(CHART / "ci" / "operator-values.yaml"))
    job = _one(manifests, "Job", "operator-teardown")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["python", "-c"]
    env = {item["name"]: item["value"] for item in container["env"]}
    return container["command"][2], env


@pytest.fixture
def run_hook(hook: tuple[str, dict[str, str]], service_account: Path) -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def run(resource: Resource, timeout_seconds: int) -> subprocess.CompletedProcess[str]:
        script, env = hook
        server = _server(resource, env["TARGET"], service_account)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return subprocess.run(
            [sys.executable, "-c", script],
            env={
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(server.server_address[1]),
                "SERVICE_ACCOUNT_DIR": str(service_account),
                "TARGET": env["TARGET"],
                "TIMEOUT_SECONDS": str(timeout_seconds),
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    yield run
    for server in servers:
        server.shutdown()
        server.server_close()


def _methods(resource: Resource) -> list[str]:
    return [method for method, _, _, _ in resource.calls]


def test_the_hook_deletes_the_resource_and_waits_for_the_operator(run_hook: Any) -> None:
    resource = Resource(released_after=3)
    result = run_hook(resource, timeout_seconds=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert resource.gone()
    methods = _methods(resource)
    assert methods[0] == "DELETE"
    assert "PATCH" not in methods  # the operator released it: the hook did not force it
    assert methods.count("GET") >= 1
    assert {auth for _, _, auth, _ in resource.calls} == {"Bearer hook-token"}


def test_the_hook_removes_the_finalizer_when_no_operator_does(run_hook: Any) -> None:
    resource = Resource(released_after=None)  # the operator is not running
    started = time.monotonic()
    result = run_hook(resource, timeout_seconds=3)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 20
    assert resource.gone()
    assert "PATCH" in _methods(resource)
    assert "removing its finalizer" in result.stdout


def test_the_hook_is_done_at_once_when_the_resource_is_gone(run_hook: Any) -> None:
    resource = Resource(exists=False)
    result = run_hook(resource, timeout_seconds=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _methods(resource) == ["DELETE"]
