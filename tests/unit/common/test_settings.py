from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.api.settings import ApiSettings
from services.common.settings import BrokerSettings


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
        BrokerSettings()


def test_password_never_in_the_shown_url() -> None:
    settings = BrokerSettings(rabbitmq_url="amqp://user:s3cret@broker:5672/vh")
    assert "s3cret" not in settings.rabbitmq_url_redacted
    assert settings.rabbitmq_url_redacted == "amqp://user:***@broker:5672/vh"


def test_every_setting_is_described() -> None:
    for name, field in ApiSettings.model_fields.items():
        assert field.description, name
