"""docker-compose.yml, the Dockerfiles and the Prometheus and Grafana provisioning agree with
the code: setting names and values, ports, commands, the output volume, scrape targets.

The last test runs the real linters and validators (scripts/check-deploy-files.sh): hadolint,
the compose-spec schema, docker-compose's parser and promtool. No Docker engine is needed.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# PyYAML ships no type hints; `unused-ignore` keeps this line valid once types-PyYAML is in.
import yaml

from services.api.settings import ApiSettings
from services.cli import build_parser
from services.common.settings import ServiceSettings
from services.consumer.settings import ConsumerSettings

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "check-deploy-files.sh"


@dataclass(frozen=True)
class Image:
    """One of the project's images and the compose service that runs it."""

    service: str
    dockerfile: str
    settings: type[ServiceSettings]
    command: str
    port_field: str


API = Image("api", "Dockerfile.api", ApiSettings, "server", "port")
CONSUMER = Image(
    "consumer", "Dockerfile.consumer", ConsumerSettings, "message-consumer", "metrics_port"
)
IMAGES = [pytest.param(API, id="api"), pytest.param(CONSUMER, id="consumer")]
# `docker compose --profile ha up`: a three-node cluster and the services on quorum queues.
API_HA = Image("api-ha", "Dockerfile.api", ApiSettings, "server", "port")
CONSUMER_HA = Image(
    "consumer-ha", "Dockerfile.consumer", ConsumerSettings, "message-consumer", "metrics_port"
)
HA_IMAGES = [pytest.param(API_HA, id="api-ha"), pytest.param(CONSUMER_HA, id="consumer-ha")]
NODES = ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"]
DEFAULT_STACK = {"rabbitmq", "api", "consumer", "prometheus", "grafana"}
HA_PROFILE = {*NODES, "api-ha", "consumer-ha"}
S3_PROFILE = {"seaweedfs", "seaweedfs-bucket", "consumer-s3"}
HA_CONF = ROOT / "deploy" / "rabbitmq" / "ha.conf"


# --- reading the files -----------------------------------------------------------------------


def _yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


@functools.cache
def _compose() -> dict[str, Any]:
    return _yaml(ROOT / "docker-compose.yml")


def _service(name: str) -> dict[str, Any]:
    services = _compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    service = services[name]
    assert isinstance(service, dict)
    return service


def _environment(service: str) -> dict[str, str]:
    """The service's environment as the process sees it: strings (list or mapping form)."""
    raw = _service(service).get("environment", {})
    if isinstance(raw, list):
        return dict(item.split("=", 1) for item in raw)
    return {key: _env_value(value) for key, value in raw.items()}


def _env_value(value: object) -> str:
    # Compose passes a YAML boolean as `true`/`false` and null as an empty value.
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def _ports(service: str) -> list[tuple[int, int]]:
    """(published, container) pairs of the short syntax `[ip:]published:container[/proto]`."""
    pairs = []
    for spec in _service(service).get("ports", []):
        parts = str(spec).split("/")[0].split(":")
        assert len(parts) >= 2, f"{service}: port {spec!r} is not published on a fixed port"
        pairs.append((int(parts[-2]), int(parts[-1])))
    return pairs


def _volumes(service: str) -> dict[str, str]:
    """Container path -> host source of the short syntax `source:target[:mode]`."""
    mounts = {}
    for spec in _service(service).get("volumes", []):
        source, target = str(spec).split(":")[:2]
        mounts[target] = source
    return mounts


@functools.cache
def _stages(name: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    """Each stage's instructions, as (INSTRUCTION, arguments), continuations joined and
    comment lines dropped (Docker drops them even inside a continuation)."""
    stages: list[list[tuple[str, str]]] = []
    pending = ""
    for line in (ROOT / name).read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        assert stages, f"{name}: {keyword} before the first FROM"
        stages[-1].append((keyword.upper(), arguments.strip()))
    return tuple(tuple(stage) for stage in stages)


def _dockerfile(name: str) -> tuple[tuple[str, str], ...]:
    """The final stage: what the image is."""
    return _stages(name)[-1]


def _all(name: str, keyword: str) -> list[str]:
    return [arguments for key, arguments in _dockerfile(name) if key == keyword]


def _one(name: str, keyword: str) -> str:
    found = _all(name, keyword)
    assert len(found) == 1, f"{name}: expected one {keyword} in the final stage, found {found}"
    return found[0]


def _exec_form(name: str, keyword: str) -> list[str]:
    value = json.loads(_one(name, keyword))
    assert isinstance(value, list), f"{name}: {keyword} must use the exec (JSON) form"
    assert all(isinstance(item, str) for item in value)
    return value


def _image_env(name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in _all(name, "ENV"):
        for item in shlex.split(arguments):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def _app_env(name: str) -> dict[str, str]:
    """The image's ENV that configures the application (not Python's or pip's own)."""
    return {
        key: value
        for key, value in _image_env(name).items()
        if not key.startswith(("PYTHON", "PIP_"))
    }


def _settings(image: Image, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The image's settings as the container builds them: its ENV, then compose's on top.
    The test process's own environment is cleared of every setting first."""
    for field in image.settings.model_fields:
        monkeypatch.delenv(field.upper(), raising=False)
    for key, value in {**_app_env(image.dockerfile), **_environment(image.service)}.items():
        monkeypatch.setenv(key, value)
    return image.settings()


def _seconds(duration: str) -> float:
    """A compose duration such as `30s`, `1m30s`, `500ms`."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert "".join(number + unit for number, unit in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


# --- compose against the code ----------------------------------------------------------------


def test_compose_file_follows_the_compose_spec_without_version_key() -> None:
    assert "version" not in _compose()
    services = _compose()["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == DEFAULT_STACK
    assert set(services) == DEFAULT_STACK | HA_PROFILE | S3_PROFILE
    # The optional object-storage profile: SeaweedFS, its bucket, a consumer writing there.
    assert all(services[name]["profiles"] == ["s3"] for name in S3_PROFILE)


@pytest.mark.parametrize("image", IMAGES)
def test_environment_names_are_settings_fields(image: Image) -> None:
    fields = {name.upper() for name in image.settings.model_fields}
    for origin, names in (
        ("docker-compose.yml", _environment(image.service)),
        (image.dockerfile, _app_env(image.dockerfile)),
    ):
        assert names, f"{origin}: no environment for {image.service}"
        # Settings ignore unknown variables, so a misspelt name would be silently dropped.
        unknown = sorted(set(names) - fields)
        assert not unknown, f"{origin}: {unknown} are not settings of {image.settings.__name__}"
        lower_case = [name for name in names if name != name.upper()]
        assert not lower_case, f"{origin}: write {lower_case} in upper case"


@pytest.mark.parametrize("image", IMAGES)
def test_environment_values_validate(image: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(image, monkeypatch)
    for name, value in _environment(image.service).items():
        # Every value compose sets is what the service runs with (not a default).
        assert str(getattr(settings, name.lower())) == value, name


def test_api_and_consumer_agree_on_the_broker_and_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    api, consumer = _settings(API, monkeypatch), _settings(CONSUMER, monkeypatch)
    assert (api.rabbitmq_url, api.shards_count, api.queue_prefix) == (
        consumer.rabbitmq_url,
        consumer.shards_count,
        consumer.queue_prefix,
    )
    match = re.match(r"amqps?://[^@/]*@?([^:/]+):(\d+)/", api.rabbitmq_url)
    assert match, api.rabbitmq_url
    host, port = match.group(1), int(match.group(2))
    assert host == "rabbitmq"
    assert port in {container for _, container in _ports("rabbitmq")}


@pytest.mark.parametrize("image", IMAGES)
def test_published_port_is_the_listen_port_and_the_exposed_one(
    image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = getattr(_settings(image, monkeypatch), image.port_field)
    variable = image.port_field.upper()
    assert _ports(image.service) == [(port, port)]
    assert _all(image.dockerfile, "EXPOSE") == [str(port)]
    assert _image_env(image.dockerfile)[variable] == str(port)
    # The HEALTHCHECK asks the port the process listens on, read from the same variable.
    assert variable in _one(image.dockerfile, "HEALTHCHECK")
    assert "/healthz" in _one(image.dockerfile, "HEALTHCHECK")


@pytest.mark.parametrize("image", IMAGES)
def test_image_runs_its_cli_command(image: Image) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert _exec_form(image.dockerfile, "ENTRYPOINT") == ["async-data-processor"]
    assert "async-data-processor" in scripts
    command = _exec_form(image.dockerfile, "CMD")
    assert build_parser().parse_args(command).command == image.command
    # Compose runs the image's own command.
    assert not {"command", "entrypoint"} & set(_service(image.service))


@pytest.mark.parametrize("image", IMAGES)
def test_build_context_holds_what_the_dockerfile_copies(image: Image) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # An allow-list: everything is excluded, then only the project's sources come back.
    assert patterns[0] == "*"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied = [
        source.rstrip("/")
        for stage in _stages(image.dockerfile)
        for keyword, arguments in stage
        if keyword == "COPY" and not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    ]
    assert copied
    assert set(copied) <= allowed
    assert all((ROOT / source).exists() for source in copied)


@pytest.mark.parametrize("image", IMAGES)
def test_image_is_built_by_compose_from_the_pinned_base(image: Image) -> None:
    assert _service(image.service)["build"] == {"context": ".", "dockerfile": image.dockerfile}
    # Both stages on the same pinned tag (the build's wheels must fit the runtime's Python).
    bases = [stage[0][1].split()[0] for stage in _stages(image.dockerfile)]
    assert bases == ["python:3.11-slim-bookworm"] * 2
    assert _one(image.dockerfile, "USER") == "10001:10001"
    assert _one(image.dockerfile, "STOPSIGNAL") == "SIGTERM"


def test_consumer_writes_into_its_mounted_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    output = _settings(CONSUMER, monkeypatch).data_output_dir
    assert output == Path("/data")
    assert _volumes("consumer") == {str(output): "./data"}
    assert json.loads(_one(CONSUMER.dockerfile, "VOLUME")) == [str(output)]
    assert _image_env(CONSUMER.dockerfile)["DATA_OUTPUT_DIR"] == str(output)


@pytest.mark.parametrize("image", IMAGES)
def test_service_waits_for_a_healthy_broker_on_a_read_only_root(image: Image) -> None:
    service = _service(image.service)
    assert service["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
    assert _service("rabbitmq")["healthcheck"]["test"] == [
        "CMD",
        "rabbitmq-diagnostics",
        "-q",
        "ping",
    ]
    assert service["read_only"] is True
    assert service["tmpfs"] == ["/tmp"]
    assert service["restart"] == "unless-stopped"


def test_consumer_grace_period_covers_its_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    drain = _settings(CONSUMER, monkeypatch).shutdown_timeout_seconds
    assert _seconds(_service("consumer")["stop_grace_period"]) > drain


# --- the `ha` profile ------------------------------------------------------------------------


def _conf(path: Path) -> dict[str, str]:
    """rabbitmq.conf (sysctl format) as key -> value."""
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in (line.split("=", 1) for line in lines)}


def _urls(image: Image) -> list[str]:
    return _environment(image.service)["RABBITMQ_URL"].split(",")


def test_the_ha_profile_is_optional() -> None:
    for name in HA_PROFILE:
        assert _service(name)["profiles"] == ["ha"], name
    for name in DEFAULT_STACK:
        assert "profiles" not in _service(name), f"{name} would not start without a profile"


@pytest.mark.parametrize("image", HA_IMAGES)
def test_ha_services_run_on_quorum_queues_with_settings_that_validate(
    image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _environment(image.service)
    fields = {name.upper() for name in image.settings.model_fields}
    assert set(env) <= fields, sorted(set(env) - fields)
    assert env["QUEUE_TYPE"] == "quorum"
    # Each node's URL is a valid RABBITMQ_URL; the list is the services' cluster contract.
    for url in _urls(image):
        for key, value in {**_app_env(image.dockerfile), **env, "RABBITMQ_URL": url}.items():
            monkeypatch.setenv(key, value)
        settings = image.settings()
        for name, value in env.items():
            if name != "RABBITMQ_URL":
                assert str(getattr(settings, name.lower())) == value, name
    # The same image and command as the one-node stack's service.
    twin = _service(image.service.removesuffix("-ha"))
    assert _service(image.service)["build"] == twin["build"]
    assert not {"command", "entrypoint"} & set(_service(image.service))
    assert _service(image.service)["read_only"] is True
    assert _service(image.service)["tmpfs"] == ["/tmp"]


def test_ha_services_agree_and_reach_every_node() -> None:
    api, consumer = _environment("api-ha"), _environment("consumer-ha")
    for key in ("RABBITMQ_URL", "QUEUE_TYPE", "SHARDS_COUNT"):
        assert api[key] == consumer[key], key
    hosts = [re.match(r"amqp://[^@/]*@([^:/]+):(\d+)/$", url) for url in _urls(API_HA)]
    assert all(hosts), _urls(API_HA)
    assert [match.group(1) for match in hosts if match] == NODES
    assert {int(match.group(2)) for match in hosts if match} == {5672}
    for service in ("api-ha", "consumer-ha"):
        assert _service(service)["depends_on"] == {
            node: {"condition": "service_healthy"} for node in NODES
        }


def test_ha_nodes_form_one_cluster() -> None:
    conf = _conf(HA_CONF)
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = [conf[f"cluster_formation.classic_config.nodes.{i}"] for i in (1, 2, 3)]
    # RabbitMQ names a node rabbit@<host name>: the listed names are the containers'.
    assert listed == [f"rabbit@{_service(node)['hostname']}" for node in NODES]
    assert conf["cluster_partition_handling"] == "pause_minority"
    cookies = set()
    for node in NODES:
        service = _service(node)
        assert service["image"] == _service("rabbitmq")["image"]
        assert _volumes(node)["/etc/rabbitmq/conf.d/20-ha.conf"] == "./deploy/rabbitmq/ha.conf"
        assert _volumes(node)["/var/lib/rabbitmq"] == f"{node}-data"
        assert f"{node}-data" in _compose()["volumes"]
        cookies.add(_environment(node)["ADP_ERLANG_COOKIE"])
        script = service["command"][-1]
        assert "umask 077" in script  # Erlang refuses a cookie others can read
        assert '"$$ADP_ERLANG_COOKIE" > /var/lib/rabbitmq/.erlang.cookie' in script
        assert script.rstrip().endswith("exec docker-entrypoint.sh rabbitmq-server")
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        assert "check_running" in test[1]
    assert len(cookies) == 1
    # The first node forms the cluster; the others start once it serves, and join it.
    assert "depends_on" not in _service("rabbitmq-1")
    for node in NODES[1:]:
        assert _service(node)["depends_on"] == {"rabbitmq-1": {"condition": "service_healthy"}}


def test_ha_memory_alarm_is_absolute_from_the_container_limit() -> None:
    conf = _conf(HA_CONF)
    for node in NODES:
        assert _service(node)["mem_limit"] == "1g"
    limit = 1024**3
    assert int(conf["total_memory_available_override_value"]) == limit
    assert int(conf["vm_memory_high_watermark.absolute"]) == int(limit * 0.4)


def test_no_two_services_publish_the_same_port() -> None:
    published = [port for name in _compose()["services"] for port, _ in _ports(name)]
    assert len(published) == len(set(published)), sorted(published)


def test_ha_consumer_writes_into_its_own_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _volumes("consumer-ha") == {"/data": "./data-ha"}
    assert _environment("consumer-ha")["DATA_OUTPUT_DIR"] == "/data"
    drain = _settings(CONSUMER, monkeypatch).shutdown_timeout_seconds
    assert _seconds(_service("consumer-ha")["stop_grace_period"]) > drain


# --- Prometheus and Grafana against compose --------------------------------------------------


def test_prometheus_scrapes_each_service_on_its_port(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    targets = {
        job["job_name"]: [target for group in job["static_configs"] for target in group["targets"]]
        for job in config["scrape_configs"]
    }
    # Job names are the service names: the alert rules and the dashboard select on them.
    assert targets == {
        "api": [f"api:{_settings(API, monkeypatch).port}"],
        "consumer": [f"consumer:{_settings(CONSUMER, monkeypatch).metrics_port}"],
    }


def test_prometheus_reads_the_mounted_config_and_rules() -> None:
    config = _yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    mounts = _volumes("prometheus")
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert config["rule_files"], "no rule files"
    for rule_file in config["rule_files"]:
        # Mounted read-only (`:ro`), from a file that exists (else Docker mounts a directory).
        assert rule_file in mounts, f"{rule_file} is not mounted into prometheus"
        assert (ROOT / mounts[rule_file]).is_file(), mounts[rule_file]


def test_grafana_provisioning_points_at_the_stack() -> None:
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    mounts = _volumes("grafana")
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    (datasource,) = _yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    prometheus_port = {container for _, container in _ports("prometheus")}
    assert datasource["url"] in {f"http://prometheus:{port}" for port in prometheus_port}
    assert (datasource["name"], datasource["uid"], datasource["isDefault"]) == (
        "Prometheus",
        "prometheus",
        True,
    )
    (provider,) = _yaml(provisioning / "dashboards" / "dashboards.yml")["providers"]
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    env = _environment("grafana")
    assert (env["GF_AUTH_ANONYMOUS_ENABLED"], env["GF_AUTH_ANONYMOUS_ORG_ROLE"]) == (
        "true",
        "Viewer",
    )
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(provider["options"]["path"])
    assert (ROOT / "deploy" / "grafana" / "dashboards" / home.name).is_file()


# --- the real tools --------------------------------------------------------------------------


@pytest.mark.timeout(600)  # room for apt-get to install docker-compose and promtool
def test_deploy_files_pass_the_real_linters_and_validators() -> None:
    # A missing tool is installed by the script or fails it: this test never skips.
    subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, check=True, timeout=540)
