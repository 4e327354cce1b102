"""The operator's REST client against a real HTTP server standing in for the API server:
it authenticates with the service-account token as the file holds it at each request
(projected tokens rotate about hourly), and a missing token is a ClusterError (retried
later), not a crash."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import kopf
import pytest
from aiohttp import web

from services.operator.cluster import ClusterError, KubernetesCluster
from services.operator.login import Credentials, service_account
from services.operator.settings import OperatorSettings
from tests.support.net import free_port


@pytest.fixture
async def api_server() -> AsyncIterator[tuple[str, list[str]]]:
    """A server answering the scale subresource; it accepts only the token `current`."""
    seen: list[str] = []
    current = {"token": "first"}

    async def scale(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        seen.append(header)
        if header != f"Bearer {current['token']}":
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        return web.json_response({"spec": {"replicas": 2}, "status": {"selector": "app=consumer"}})

    async def rotate(request: web.Request) -> web.Response:
        current["token"] = await request.text()
        return web.Response()

    app = web.Application()
    app.router.add_get("/apis/apps/v1/namespaces/adp/statefulsets/c/scale", scale)
    app.router.add_post("/rotate", rotate)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


def _credentials(tmp_path: Path, server: str) -> Credentials:
    directory = tmp_path / "sa"
    directory.mkdir()
    (directory / "token").write_text("first\n")
    config = OperatorSettings(service_account_dir=directory, kubernetes_service_host="127.0.0.1")
    found = service_account(config)
    assert found is not None
    # The made-up API server speaks plain HTTP; everything else is the service account's.
    info = kopf.ConnectionInfo(server=server, token=found.info.token)
    return Credentials(info, found.source, found.token_file)


async def test_a_rotated_token_is_used_from_the_next_request(
    tmp_path: Path, api_server: tuple[str, list[str]]
) -> None:
    server, seen = api_server
    credentials = _credentials(tmp_path, server)
    assert credentials.token_file is not None
    cluster = KubernetesCluster.connect(credentials, timeout=5)
    try:
        assert (await cluster.scale("adp", "StatefulSet", "c")).replicas == 2
        # The kubelet writes a new token; the old one stops being accepted.
        credentials.token_file.write_text("second\n")
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{server}/rotate", data="second") as response,
        ):
            assert response.status == 200
        assert (await cluster.scale("adp", "StatefulSet", "c")).replicas == 2
        assert seen == ["Bearer first", "Bearer second"]
        # A token file gone (the pod's volume being torn down): an error worth retrying.
        credentials.token_file.unlink()
        with pytest.raises(ClusterError, match="service-account token"):
            await cluster.scale("adp", "StatefulSet", "c")
    finally:
        await cluster.close()


def test_service_account_needs_the_host_and_the_token(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    (tmp_path / "namespace").write_text("adp")
    outside = OperatorSettings(service_account_dir=tmp_path)
    assert service_account(outside) is None
    no_token = OperatorSettings(
        service_account_dir=tmp_path / "none", kubernetes_service_host="10.0.0.1"
    )
    assert service_account(no_token) is None
    inside = OperatorSettings(
        service_account_dir=tmp_path,
        kubernetes_service_host="fd00::1",
        kubernetes_service_port=6443,
    )
    found = service_account(inside)
    assert found is not None
    assert found.server == "https://[fd00::1]:6443"
    assert found.info.default_namespace == "adp"
    assert found.info.ca_path is None  # no ca.crt there: the system's CAs
    assert found.headers() == {"Authorization": "Bearer t"}
    assert OperatorSettings().service_account_dir == Path(
        "/var/run/secrets/kubernetes.io/serviceaccount"
    )
