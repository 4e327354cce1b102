"""The operator's own settings (environment variables)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.settings import LogLevel


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    watch_namespace: str = Field(
        "", description="Namespace whose ConsumerAutoscalers are reconciled ('' = all)."
    )
    reconcile_interval_seconds: float = Field(
        15.0, ge=1, le=3600, description="Seconds between reconciliations of each resource."
    )
    retry_delay_seconds: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="Pause, in seconds, after the broker or a pod "
        "could not be reached, before the next try.",
    )
    http_timeout_seconds: float = Field(
        5.0, gt=0, le=60, description="Timeout of each call to Kubernetes, a pod or the broker."
    )
    health_port: int = Field(
        8081, ge=1, le=65535, description="Port of the liveness endpoint /healthz."
    )
    log_level: LogLevel = Field("INFO", description="Log level of the process.")
    # How it logs in to Kubernetes (services/operator/login.py). Kubernetes sets the two
    # KUBERNETES_SERVICE_* variables in every pod; outside a cluster, KUBECONFIG is used.
    service_account_dir: Path = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount"),
        description="Directory of the pod's service-account token, ca.crt and namespace "
        "(re-read: projected tokens rotate).",
    )
    kubernetes_service_host: str = Field(
        "",
        max_length=253,
        description="Host of the Kubernetes API inside a cluster (set by Kubernetes in every "
        "pod); empty: outside a cluster, log in with KUBECONFIG.",
    )
    kubernetes_service_port: int = Field(
        443,
        ge=1,
        le=65535,
        description="Port of the Kubernetes API inside a cluster (set by Kubernetes).",
    )
