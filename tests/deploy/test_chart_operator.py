"""The operator's part of the chart, rendered with `operator.enabled=true`: the CRD (from
crds/, validated by kubernetes-validate in check-chart.sh), the ConsumerAutoscaler checked
against that CRD's schema and the operator's own spec model (kubernetes-validate skips
custom resources), least-privilege RBAC, a hardened Deployment whose env are settings."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from services.operator.resource import GROUP, KIND, VERSION, parse_spec
from services.operator.settings import OperatorSettings
from tests.deploy.test_chart import (
    CHART,
    Manifest,
    _component,
    _config,
    _objects,
    _one,
    _render,
)

OPERATOR = ("-f", str(CHART / "ci" / "operator-values.yaml"), "--include-crds")


def _autoscaler(manifests: tuple[Manifest, ...]) -> Manifest:
    (resource,) = _objects(manifests, KIND)
    return resource


def test_nothing_of_the_operator_unless_enabled() -> None:
    manifests = _render()
    assert not [m for m in manifests if _component(m) == "operator"]
    assert not _objects(manifests, KIND)


def test_the_resource_fits_the_crd_and_the_operators_model() -> None:
    manifests = _render(*OPERATOR)
    (crd,) = _objects(manifests, "CustomResourceDefinition")
    assert crd["spec"]["group"] == GROUP
    (version,) = crd["spec"]["versions"]
    assert version["name"] == VERSION
    resource = _autoscaler(manifests)
    assert resource["apiVersion"] == f"{GROUP}/{VERSION}"
    jsonschema.validate(resource, version["schema"]["openAPIV3Schema"])
    spec = parse_spec(resource["spec"])
    assert (spec.max_replicas, spec.scale_down_threshold) == (6, 50)


def test_the_resource_names_the_real_consumer_broker_and_ports() -> None:
    manifests = _render(*OPERATOR)
    spec = parse_spec(_autoscaler(manifests)["spec"])
    consumer = _one(manifests, "StatefulSet", "consumer")
    assert (spec.workload.kind, spec.workload.name) == ("StatefulSet", consumer["metadata"]["name"])
    (container,) = consumer["spec"]["template"]["spec"]["containers"]
    (url,) = [e for e in container["env"] if e["name"] == "RABBITMQ_URL"]
    ref = url["valueFrom"]["secretKeyRef"]
    assert (spec.broker.secret_name, spec.broker.secret_key) == (ref["name"], ref["key"])
    assert spec.metrics_port == container["ports"][0]["containerPort"]
    config = _config(manifests)
    assert spec.broker.queue_prefix == config["QUEUE_PREFIX"]
    assert str(spec.broker.shards_count) == config["SHARDS_COUNT"]


def test_the_crd_rejects_an_invalid_resource() -> None:
    manifests = _render(*OPERATOR)
    (crd,) = _objects(manifests, "CustomResourceDefinition")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    resource = _autoscaler(manifests)
    bad: dict[str, Any] = {**resource, "spec": {**resource["spec"], "minReplicas": 0}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_rbac_is_least_privilege_in_the_namespace() -> None:
    manifests = _render(*OPERATOR)
    assert not _objects(manifests, "ClusterRole")
    assert not _objects(manifests, "ClusterRoleBinding")
    role = _one(manifests, "Role", "operator")
    grants = {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert grants == {
        (GROUP, "consumerautoscalers"): {"get", "list", "watch", "patch"},
        (GROUP, "consumerautoscalers/status"): {"get", "patch"},
        ("apps", "deployments/scale"): {"get", "patch"},
        ("apps", "statefulsets/scale"): {"get", "patch"},
        ("", "pods"): {"list", "patch"},
        ("", "secrets"): {"get"},
        ("", "events"): {"create"},
    }
    (secrets,) = [r for r in role["rules"] if r["resources"] == ["secrets"]]
    spec = parse_spec(_autoscaler(manifests)["spec"])
    assert secrets["resourceNames"] == [spec.broker.secret_name]
    binding = _one(manifests, "RoleBinding", "operator")
    account = _one(manifests, "ServiceAccount", "operator")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == account["metadata"]["name"]


def test_operator_deployment_runs_the_command_with_real_settings() -> None:
    manifests = _render(*OPERATOR)
    deployment = _one(manifests, "Deployment", "operator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["operator"]
    fields = {name.upper() for name in OperatorSettings.model_fields}
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= fields
    values = {name: e["value"] for name, e in env.items() if "value" in e}
    settings = OperatorSettings(**{k.lower(): v for k, v in values.items()})
    assert container["livenessProbe"]["httpGet"]["port"] == "health"
    assert container["ports"][0]["containerPort"] == settings.health_port
    assert (
        pod["serviceAccountName"]
        == _one(manifests, "ServiceAccount", "operator")["metadata"]["name"]
    )
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def _hook(manifests: tuple[Manifest, ...], kind: str) -> Manifest:
    return _one(manifests, kind, "operator-teardown")


def test_uninstall_releases_the_resource_while_the_operator_still_runs() -> None:
    """kopf keeps a finalizer on the resource; Helm deletes the operator with it, so a
    pre-delete hook deletes the resource first and waits for the operator to let it go."""
    manifests = _render(*OPERATOR)
    job = _hook(manifests, "Job")
    for kind in ("ServiceAccount", "Role", "RoleBinding", "Job"):
        annotations = _hook(manifests, kind)["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-delete", kind
        assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"], kind
    # Its RBAC exists before the Job runs, and covers exactly the release's resource.
    weight = int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        assert (
            int(_hook(manifests, kind)["metadata"]["annotations"]["helm.sh/hook-weight"]) < weight
        )
    resource = _autoscaler(manifests)
    role = _hook(manifests, "Role")
    (rule,) = role["rules"]
    assert rule == {
        "apiGroups": [GROUP],
        "resources": ["consumerautoscalers"],
        "resourceNames": [resource["metadata"]["name"]],
        "verbs": ["get", "delete", "patch"],
    }
    binding = _hook(manifests, "RoleBinding")
    account = _hook(manifests, "ServiceAccount")
    pod = job["spec"]["template"]["spec"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TARGET"] == (
        f"/apis/{GROUP}/{VERSION}/namespaces/adp/consumerautoscalers/{resource['metadata']['name']}"
    )
    # It gives up waiting (and removes the finalizer itself) before the Job's deadline.
    assert int(env["TIMEOUT_SECONDS"]) < job["spec"]["activeDeadlineSeconds"]
    script = container["command"][-1]
    compile(script, "teardown", "exec")  # valid Python for the image's interpreter
    assert '"finalizers": None' in script
    # The operator's own Deployment is no hook: it still runs when the hook does.
    assert "annotations" not in _one(manifests, "Deployment", "operator")["metadata"]
