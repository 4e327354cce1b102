"""`async-data-processor operator` as a real process, started as a pod starts it (a
service-account token and CA in a directory, KUBERNETES_SERVICE_HOST/PORT set) or as a
developer does (KUBECONFIG), against an API server that does not answer: it must log in,
keep retrying and stay up (no "Ran out of valid credentials" exit, no crash loop).

The service-account directory is made up under tmp_path (SERVICE_ACCOUNT_DIR, whose default
is the standard /var/run/secrets/kubernetes.io/serviceaccount); the CA is certifi's bundle,
a valid PEM file. Nothing listens on the API server's port.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import certifi
import httpx
import pytest
import yaml

from tests.support.net import free_port
from tests.support.polling import eventually
from tests.support.process import ServiceProcess

pytestmark = [pytest.mark.e2e]

# kopf gives up a request after 9 attempts by default (then the operator ends); with
# RETRY_DELAY_SECONDS=1 attempt 12 comes about 11 s after the first.
PAST_KOPFS_LAST_ATTEMPT = "Request attempt #12"


def _service_account(tmp_path: Path) -> Path:
    directory = tmp_path / "serviceaccount"
    directory.mkdir()
    (directory / "token").write_text("made-up-token\n")
    (directory / "namespace").write_text("adp\n")
    shutil.copy(certifi.where(), directory / "ca.crt")
    return directory


def _kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "made-up-token"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "adp"}}],
        "current-context": "x",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _base_env(tmp_path: Path, health_port: int) -> dict[str, str]:
    home = tmp_path / "home"  # no ~/.kube/config of the machine's user leaks in
    home.mkdir()
    return {
        "HOME": str(home),
        "WATCH_NAMESPACE": "adp",
        "HEALTH_PORT": str(health_port),
        "RETRY_DELAY_SECONDS": "1",
        "LOG_LEVEL": "DEBUG",
    }


@pytest.mark.parametrize("where", ["in-cluster", "kubeconfig"])
async def test_operator_logs_in_and_stays_up_while_the_api_server_is_unreachable(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api_port = free_port()  # nothing listens there
    health_port = free_port()
    env = _base_env(tmp_path, health_port)
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    if where == "in-cluster":
        env["SERVICE_ACCOUNT_DIR"] = str(_service_account(tmp_path))
        env["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"
        env["KUBERNETES_SERVICE_PORT"] = str(api_port)
        server = f"https://127.0.0.1:{api_port}"
    else:
        env["SERVICE_ACCOUNT_DIR"] = str(tmp_path / "no-such-dir")
        server = f"http://127.0.0.1:{api_port}"
        env["KUBECONFIG"] = str(_kubeconfig(tmp_path, server))

    with ServiceProcess("operator", env, tmp_path / "operator.log") as proc:
        assert proc.proc is not None

        def exited() -> bool:
            return proc.proc is not None and proc.proc.poll() is not None

        async def logged_in_and_retrying() -> bool:
            # An exit ends the wait at once (asserted below), as does the goal.
            return exited() or (
                f"logged in to {server}" in proc.log and proc.log.count(f":{api_port}") >= 2
            )

        await eventually(logged_in_and_retrying, timeout=30, what="login, then retries")
        assert not exited(), f"the operator exited ({proc.proc.returncode}):\n{proc.log}"

        # Still up past kopf's default retry budget, still trying, its liveness answering.
        async def retried_past_the_default_budget() -> bool:
            return exited() or PAST_KOPFS_LAST_ATTEMPT in proc.log

        await eventually(retried_past_the_default_budget, timeout=40, what="retries past #9")
        assert not exited(), f"the operator exited ({proc.proc.returncode}):\n{proc.log}"
        assert "LoginError" not in proc.log
        assert "Ran out of valid credentials" not in proc.log
        async with httpx.AsyncClient(timeout=5) as client:
            health = await client.get(f"http://127.0.0.1:{health_port}/healthz")
        assert health.status_code == 200, health.text

        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.log
