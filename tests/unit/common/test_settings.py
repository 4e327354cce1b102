from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.api.settings import ApiSettings
from services.common.settings import ServiceSettings
from services.consumer.settings import ConsumerSettings


def test_defaults_are_the_design_table(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RABBITMQ_URL", "SHARDS_COUNT", "PORT", "MAX_BODY_BYTES"):
        monkeypatch.delenv(name, raising=False)
    settings = ApiSettings()
    assert settings.rabbitmq_url == "amqp://guest:guest@localhost:5672/"
    assert settings.shards_count == 5
    assert settings.port == 8080
    assert settings.max_body_bytes == 1_048_576
    assert settings.publish_timeout_seconds == 5
    assert settings.queue_prefix == "task_queue_"


def test_consumer_defaults_are_the_design_table(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATA_OUTPUT_DIR", "WORKERS_MIN", "WORKERS_MAX", "BATCH_SIZE", "METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = ConsumerSettings()
    assert str(settings.data_output_dir) == "data_dump"
    assert (settings.workers_min, settings.workers_max) == (3, 4)
    assert settings.batch_size == 5
    assert settings.batch_max_wait_seconds == 1.0
    assert settings.worker_timeout_seconds == 30
    assert settings.metrics_port == 9100
    assert settings.shutdown_timeout_seconds < 30  # below Kubernetes' default grace period


@pytest.mark.parametrize(
    "values",
    [{"workers_min": 5, "workers_max": 4}, {"scale_up_backlog": 10, "scale_down_backlog": 10}],
)
def test_consumer_bounds_must_be_consistent(values: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        ConsumerSettings(**values)  # type: ignore[arg-type]


def test_environment_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDS_COUNT", "7")
    monkeypatch.setenv("PORT", "9000")
    monkeypatch.setenv("log_level", "debug")
    settings = ApiSettings(port=9001)
    assert (settings.shards_count, settings.port, settings.log_level) == (7, 9001, "DEBUG")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SHARDS_COUNT", "0"),
        ("SHARDS_COUNT", "five"),
        ("RABBITMQ_URL", "http://localhost/"),
        ("RABBITMQ_URL", "amqp://"),
        ("QUEUE_PREFIX", "has space"),
        ("QUEUE_MAX_LENGTH", "-1"),
        ("LOG_LEVEL", "LOUD"),
    ],
)
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        ServiceSettings()


def test_password_never_in_the_shown_url() -> None:
    settings = ServiceSettings(rabbitmq_url="amqp://user:s3cret@broker:5672/vh")
    assert "s3cret" not in settings.rabbitmq_url_redacted
    assert settings.rabbitmq_url_redacted == "amqp://user:***@broker:5672/vh"


def test_every_setting_is_described() -> None:
    for name, field in ApiSettings.model_fields.items():
        assert field.description, name
