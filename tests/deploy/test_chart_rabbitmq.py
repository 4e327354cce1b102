"""The chart's RabbitMQ, rendered with the real helm: one node by default, a cluster with
`rabbitmq.replicaCount=3` (ci/rabbitmq-cluster-values.yaml), and in both the broker's own
configuration mounted as a conf.d file (an absolute memory alarm derived from the memory
limit). Whether the nodes really form a cluster and drain is not checked here (no
Kubernetes): what is checked is that the objects say what RabbitMQ's documentation asks."""

from __future__ import annotations

import base64
import re
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.test_chart import (
    CHART,
    Manifest,
    _config,
    _objects,
    _one,
    _render,
    _scenario,
    _template,
)

CLUSTER = ("-f", str(CHART / "ci" / "rabbitmq-cluster-values.yaml"))


def _rabbitmq(manifests: tuple[Manifest, ...]) -> tuple[Manifest, Manifest]:
    statefulset = _one(manifests, "StatefulSet", "rabbitmq")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return statefulset, container


def _broker_config(manifests: tuple[Manifest, ...]) -> dict[str, str]:
    (config,) = [
        item
        for item in _objects(manifests, "ConfigMap")
        if item["metadata"]["name"].endswith("-rabbitmq-config")
    ]
    data: dict[str, str] = config["data"]
    return data


def _conf(text: str) -> dict[str, str]:
    """rabbitmq.conf (sysctl format) as key -> value."""
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and "#" not in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _url(manifests: tuple[Manifest, ...]) -> str:
    (secret,) = _objects(manifests, "Secret")
    return base64.b64decode(secret["data"]["rabbitmq-url"]).decode()


def _env(container: Manifest) -> dict[str, Manifest]:
    return {item["name"]: item for item in container["env"]}


# --- the memory alarm (both topologies) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "watermark", "expected_limit"),
    [
        ("1Gi", None, 1073741824),
        ("1536Mi", None, 1610612736),
        ("2G", "0.5", 2000000000),
        ("4294967296", None, 4294967296),
    ],
)
def test_memory_alarm_is_absolute_from_the_memory_limit(
    limit: str, watermark: str | None, expected_limit: int
) -> None:
    args = ["--set-string", f"rabbitmq.resources.limits.memory={limit}"]
    if watermark:
        args += ["--set-json", f"rabbitmq.memoryHighWatermark={watermark}"]
    manifests = _render(*args)
    conf = _conf(_broker_config(manifests)["adp.conf"])
    fraction = float(watermark or 0.4)
    assert int(conf["total_memory_available_override_value"]) == expected_limit
    assert int(conf["vm_memory_high_watermark.absolute"]) == int(expected_limit * fraction)
    # No relative threshold that RabbitMQ would apply to memory it may misjudge.
    assert "vm_memory_high_watermark.relative" not in conf


@pytest.mark.parametrize("args", [(), CLUSTER], ids=["one-node", "cluster"])
def test_the_config_is_mounted_into_conf_d_and_rolls_the_pods(args: tuple[str, ...]) -> None:
    manifests = _render(*args)
    statefulset, container = _rabbitmq(manifests)
    pod = statefulset["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    config_name = next(
        item["metadata"]["name"]
        for item in _objects(manifests, "ConfigMap")
        if item["metadata"]["name"].endswith("-rabbitmq-config")
    )
    assert volume["configMap"]["name"] == config_name
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # Beside the image's conf.d/10-defaults.conf, read after it.
    assert mounts["/etc/rabbitmq/conf.d/20-adp.conf"]["subPath"] == "adp.conf"
    assert mounts["/etc/rabbitmq/enabled_plugins"]["subPath"] == "enabled_plugins"
    plugins = _broker_config(manifests)["enabled_plugins"].strip()
    assert re.fullmatch(r"\[[a-z0-9_,]+\]\.", plugins), plugins
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= set(plugins[1:-2].split(","))
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])


def test_a_memory_limit_is_required_and_must_be_a_quantity() -> None:
    missing = _template("--set", "rabbitmq.resources.limits.memory=null")
    assert missing.returncode != 0
    assert "/rabbitmq/resources/limits': missing property 'memory'" in missing.stderr
    wrong = _template("--set-string", "rabbitmq.resources.limits.memory=500m")
    assert wrong.returncode != 0


def test_the_image_is_a_release_with_community_support() -> None:
    _, container = _rabbitmq(_render())
    tag = container["image"].split(":", 1)[1]
    major, minor = (int(part) for part in tag.split("-")[0].split(".")[:2])
    # 3.13's community support has ended; the cluster's peer discovery needs 4.1's plugin.
    assert (major, minor) >= (4, 1), tag


# --- one node (the default) ----------------------------------------------------------------------


def test_one_node_keeps_its_name_its_policy_and_the_service_url() -> None:
    manifests = _render()
    statefulset, container = _rabbitmq(manifests)
    assert statefulset["spec"]["replicas"] == 1
    # Changing these on a live StatefulSet is refused (podManagementPolicy), or renames the
    # node so that it starts empty (the node name): a one-node install keeps them as before.
    assert "podManagementPolicy" not in statefulset["spec"]
    assert "RABBITMQ_NODENAME" not in _env(container)
    assert "lifecycle" not in container  # no quorum to wait for
    assert not [p for p in _objects(manifests, "PodDisruptionBudget") if "rabbitmq" in str(p)]
    url = urlsplit(_url(manifests))
    assert (url.hostname, url.port) == (f"{statefulset['metadata']['name']}.adp.svc", 5672)
    assert "cluster_formation.peer_discovery_backend" not in _conf(
        _broker_config(manifests)["adp.conf"]
    )


# --- a cluster -----------------------------------------------------------------------------------


def test_a_cluster_refuses_classic_queues_with_a_clear_message() -> None:
    result = _template("--set", "rabbitmq.replicaCount=3")
    assert result.returncode != 0
    assert "rabbitmq.replicaCount=3 needs config.queueType=quorum" in result.stderr
    even = _template("--set", "rabbitmq.replicaCount=2", "--set", "config.queueType=quorum")
    assert even.returncode != 0  # the schema: 1 or an odd number


def test_a_cluster_gives_the_services_quorum_queues_and_every_node() -> None:
    manifests = _render(*CLUSTER)
    assert _config(manifests)["QUEUE_TYPE"] == "quorum"
    statefulset, _ = _rabbitmq(manifests)
    name = statefulset["metadata"]["name"]
    headless = statefulset["spec"]["serviceName"]
    urls = _url(manifests).split(",")
    assert [urlsplit(u).hostname for u in urls] == [
        f"{name}-{ordinal}.{headless}.adp.svc.cluster.local" for ordinal in range(3)
    ]
    (secret,) = _objects(manifests, "Secret")
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert {urlsplit(u).password for u in urls} == {password}
    assert {urlsplit(u).port for u in urls} == {5672}
    # The headless Service publishes every pod's name before it is ready (peers resolve each
    # other while they boot) and carries the inter-node ports.
    (service,) = [s for s in _objects(manifests, "Service") if s["metadata"]["name"] == headless]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in service["spec"]["ports"]} >= {5672, 4369, 25672}


def test_a_cluster_forms_by_peer_discovery_with_long_stable_names() -> None:
    manifests = _render(*CLUSTER)
    statefulset, container = _rabbitmq(manifests)
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    env = _env(container)
    assert env["RABBITMQ_USE_LONGNAME"]["value"] == "true"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    headless = statefulset["spec"]["serviceName"]
    assert env["RABBITMQ_NODENAME"]["value"] == (
        f"rabbit@$(POD_NAME).{headless}.adp.svc.cluster.local"
    )
    conf = _conf(_broker_config(manifests)["adp.conf"])
    assert conf["cluster_formation.peer_discovery_backend"] == "k8s"
    assert conf["cluster_formation.target_cluster_size_hint"] == "3"
    assert conf["cluster_partition_handling"] == "pause_minority"
    assert "rabbitmq_peer_discovery_k8s" in _broker_config(manifests)["enabled_plugins"]


def test_a_cluster_shares_the_erlang_cookie_from_the_secret() -> None:
    manifests = _render(*CLUSTER)
    statefulset, _ = _rabbitmq(manifests)
    pod = statefulset["spec"]["template"]["spec"]
    (secret,) = _objects(manifests, "Secret")
    cookie = base64.b64decode(secret["data"]["erlang-cookie"]).decode()
    assert len(cookie) >= 32
    (volume,) = [v for v in pod["volumes"] if v["name"] == "erlang-cookie"]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["items"] == [{"key": "erlang-cookie", "path": "erlang-cookie"}]
    (init,) = pod["initContainers"]
    script = init["command"][-1]
    assert "/run/erlang-cookie/erlang-cookie /var/lib/rabbitmq/.erlang.cookie" in script
    assert "-m 0600" in script  # Erlang refuses a cookie others can read
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {"data": "/var/lib/rabbitmq", "erlang-cookie": "/run/erlang-cookie"}


def test_a_cluster_survives_voluntary_disruptions() -> None:
    manifests = _render(*CLUSTER)
    statefulset, container = _rabbitmq(manifests)
    pod = statefulset["spec"]["template"]["spec"]
    selector = statefulset["spec"]["selector"]["matchLabels"]
    (budget,) = [
        p
        for p in _objects(manifests, "PodDisruptionBudget")
        if p["spec"]["selector"]["matchLabels"] == selector
    ]
    assert budget["spec"]["maxUnavailable"] == 1
    # One node per host (the ci scenario asks for `hard`), spread over zones.
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == selector
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    # The preStop: wait until the quorum queues keep a majority without this node, then
    # drain it; both within the grace period, with time left for the node's own stop.
    script = container["lifecycle"]["preStop"]["exec"]["command"][-1]
    wait = re.search(r"rabbitmq-upgrade await_online_quorum_plus_one -t (\d+)", script)
    drain = re.search(r"rabbitmq-upgrade drain -t (\d+)", script)
    assert wait, script
    assert drain, script
    assert wait.start() < drain.start(), script
    grace = pod["terminationGracePeriodSeconds"]
    assert int(wait.group(1)) + int(drain.group(1)) + 15 <= grace
    # Ready means the node serves clients: the app runs (not paused) and listeners accept.
    probe = " ".join(container["readinessProbe"]["exec"]["command"])
    assert "check_running" in probe
    assert "check_port_connectivity" in probe
    soft = _render("--set", "rabbitmq.replicaCount=3", "--set", "config.queueType=quorum")
    affinity = _rabbitmq(soft)[0]["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert list(affinity) == ["preferredDuringSchedulingIgnoredDuringExecution"]


def test_a_cluster_needs_a_grace_period_for_its_prestop() -> None:
    result = _template(*CLUSTER, "--set", "rabbitmq.terminationGracePeriodSeconds=60")
    assert result.returncode != 0
    assert "rabbitmq.terminationGracePeriodSeconds (60) must be 120 or more" in result.stderr


def test_the_cluster_scenario_is_one_of_the_validated_ones() -> None:
    # check-chart.sh renders and validates (kubernetes-validate) every ci/ file.
    values = yaml.safe_load((CHART / "ci" / "rabbitmq-cluster-values.yaml").read_text())
    assert values["rabbitmq"]["replicaCount"] == 3
    assert _one(_scenario("rabbitmq-cluster"), "StatefulSet", "rabbitmq")["spec"]["replicas"] == 3
