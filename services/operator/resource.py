"""The custom resource: `ConsumerAutoscaler` in `autoscaling.async-data-processor.dev/v1alpha1`.

Its spec is validated once per reconciliation into `AutoscalerSpec`; an invalid spec is a
permanent error (fixing the resource is the only cure), the CRD's OpenAPI schema catches
most of it at admission already.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

GROUP = "autoscaling.async-data-processor.dev"
VERSION = "v1alpha1"
PLURAL = "consumerautoscalers"
KIND = "ConsumerAutoscaler"


class _Camel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Workload(_Camel):
    kind: Literal["Deployment", "StatefulSet"] = "Deployment"
    name: str = Field(min_length=1)


class BrokerRef(_Camel):
    secret_name: str = Field(alias="secretName", min_length=1)
    secret_key: str = Field("RABBITMQ_URL", alias="secretKey", min_length=1)
    queue_prefix: str = Field("task_queue_", alias="queuePrefix", min_length=1)
    shards_count: int = Field(5, alias="shardsCount", ge=1, le=1000)


class AutoscalerSpec(_Camel):
    workload: Workload
    min_replicas: int = Field(1, alias="minReplicas", ge=1)
    max_replicas: int = Field(4, alias="maxReplicas", ge=1)
    target_backlog_per_replica: int = Field(1000, alias="targetBacklogPerReplica", ge=1)
    scale_down_backlog_per_replica: int | None = Field(
        None, alias="scaleDownBacklogPerReplica", ge=0
    )
    scale_down_cooldown_seconds: float = Field(300, alias="scaleDownCooldownSeconds", ge=0)
    metrics_port: int = Field(9100, alias="metricsPort", ge=1, le=65535)
    broker: BrokerRef

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalerSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self

    @property
    def scale_down_threshold(self) -> int:
        """Default: a tenth of the target."""
        if self.scale_down_backlog_per_replica is not None:
            return self.scale_down_backlog_per_replica
        return self.target_backlog_per_replica // 10


class InvalidSpec(ValueError):
    pass


def parse_spec(spec: dict[str, Any]) -> AutoscalerSpec:
    try:
        return AutoscalerSpec.model_validate(dict(spec))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidSpec(problems) from None
