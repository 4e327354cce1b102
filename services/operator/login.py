"""How the operator logs in to Kubernetes: with the pod's service account inside a cluster,
with KUBECONFIG outside one (what kopf's default registry does; ours is explicit, so it
registers this). kopf's watches and our own REST client (`cluster.py`) use the same
credentials, found by `find`.

Projected service-account tokens rotate (about hourly, and clusters may turn the extended
validity off): the token stays a file, read again by `Credentials.headers()` on every
request of our client, and by `login` each time kopf logs in again (it does after a 401).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import kopf

from services.operator.settings import OperatorSettings

logger = logging.getLogger(__name__)


class NoCredentials(Exception):
    """Neither a service account (inside a cluster) nor a kubeconfig was found."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A server and how to authenticate to it; `token_file`, when set, is read per use."""

    info: kopf.ConnectionInfo
    source: str  # for the log: where the credentials came from
    token_file: Path | None = None

    @property
    def server(self) -> str:
        return self.info.server

    def headers(self) -> dict[str, str]:
        """The Authorization header, with the token as the file holds it now."""
        if self.token_file is None:
            return self.info.as_http_headers()
        token = self.token_file.read_text().strip()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def ssl_context(self) -> ssl.SSLContext:
        return self.info.as_ssl_context()

    def connection_info(self) -> kopf.ConnectionInfo:
        """For kopf: the info with the token as the file holds it now."""
        if self.token_file is None:
            return self.info
        return replace(self.info, token=self.token_file.read_text().strip() or None)


def service_account(config: OperatorSettings) -> Credentials | None:
    """Inside a cluster: KUBERNETES_SERVICE_HOST/PORT and the token (and CA) of the pod's
    service account in SERVICE_ACCOUNT_DIR; None if either is missing."""
    directory = config.service_account_dir
    token = directory / "token"
    if not config.kubernetes_service_host or not token.is_file():
        return None
    host = config.kubernetes_service_host
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    ca = directory / "ca.crt"
    namespace = directory / "namespace"
    info = kopf.ConnectionInfo(
        server=f"https://{host}:{config.kubernetes_service_port}",
        ca_path=str(ca) if ca.is_file() else None,
        token=token.read_text().strip() or None,
        default_namespace=(namespace.read_text().strip() or None) if namespace.is_file() else None,
    )
    return Credentials(info, f"the service account in {directory}", token)


def kubeconfig(settings: kopf.OperatorSettings) -> Credentials | None:
    """Outside a cluster: the current context of KUBECONFIG (or ~/.kube/config), parsed by
    kopf's own minimal reader."""
    info = kopf.login_with_kubeconfig(settings=settings)
    return None if info is None else Credentials(info, "KUBECONFIG")


def find(config: OperatorSettings, settings: kopf.OperatorSettings) -> Credentials:
    found = service_account(config) or kubeconfig(settings)
    if found is None:
        raise NoCredentials(
            f"no Kubernetes credentials: no service-account token in "
            f"{config.service_account_dir} with KUBERNETES_SERVICE_HOST set (inside a "
            "cluster), and no KUBECONFIG or ~/.kube/config (outside one)"
        )
    return found


async def login(
    memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any
) -> kopf.ConnectionInfo | None:
    """kopf's login handler; None (no credentials) makes kopf stop with a LoginError."""
    try:
        found = find(memo.config, settings)
    except NoCredentials as exc:
        logger.error("%s", exc)
        return None
    logger.info("logged in to %s with %s", found.server, found.source)
    return found.connection_info()
