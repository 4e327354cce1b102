from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
from pydantic_settings import BaseSettings

from services.api.settings import ApiSettings
from services.cli import _settings, build_parser, main
from services.consumer.settings import ConsumerSettings
from services.operator.settings import OperatorSettings
from tests.support.process import console_script


def test_server_help_lists_its_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services", "server", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--port", "--rabbitmq-url", "--shards-count", "--max-body-bytes"):
        assert flag in out


def test_flags_parse_to_setting_names() -> None:
    args = build_parser().parse_args(["server", "--port", "9000", "--shards-count", "3"])
    assert (args.port, args.shards_count, args.rabbitmq_url) == (9000, 3, None)


def test_invalid_setting_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SHARDS_COUNT", "0")
    assert main(["server"]) == 2
    assert "invalid setting SHARDS_COUNT" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["nope"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("command", "models"),
    [
        ("server", [ApiSettings]),
        ("message-consumer", [ConsumerSettings]),
        ("dev", [ApiSettings, ConsumerSettings]),
        ("operator", [OperatorSettings]),
    ],
)
def test_every_setting_has_its_flag_with_its_description(
    command: str, models: list[type[BaseSettings]]
) -> None:
    """Derived, not listed: a new field gets its flag and help without touching the CLI."""
    subcommands = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    actions = {a.dest: a for a in subcommands.choices[command]._actions}
    for model in models:
        for name, field in model.model_fields.items():
            if name == "api_tokens":  # a secret: no flag (a command line is public)
                assert name not in actions
                continue
            action = actions[name]
            assert action.option_strings == ["--" + name.replace("_", "-")]
            assert action.help is not None
            assert name.upper() in action.help
            assert (field.description or "").replace("%", "%%") in action.help


def test_a_flag_overrides_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERS_MAX", "6")
    monkeypatch.setenv("QUEUE_TYPE", "classic")
    args = build_parser().parse_args(
        ["message-consumer", "--workers-max", "7", "--queue-type", "quorum"]
    )
    settings = _settings(ConsumerSettings, args)
    assert (settings.workers_max, settings.queue_type) == (7, "quorum")


def test_a_bad_flag_value_exits_2_naming_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["message-consumer", "--queue-type", "mirrored"]) == 2
    assert "invalid setting QUEUE_TYPE" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["server", "message-consumer", "dev"])
@pytest.mark.parametrize(
    "nodes",
    [
        "amqp://u:s3cret@a:5672/one,amqp://u:s3cret@b:5672/two",
        "amqp://u:s3cret@a:5672/,",
        "amqp://u:s3cret@a:5672/,amqp://u:s3cret@:5672/",
        "amqp://u:s3cret@a:5672/,amqps://u:s3cret@b:70000/",
        "amqp://u:s3cret@a:5672/vh,http://u:s3cret@b:5672/vh",
    ],
)
def test_a_malformed_node_in_the_list_ends_the_real_process_with_2(
    command: str, nodes: str
) -> None:
    """The console script itself, as a deployment starts it: status 2, one line naming
    RABBITMQ_URL and the element, never the password."""
    env = {**os.environ, "RABBITMQ_URL": nodes}
    done = subprocess.run(
        [console_script(), command], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert "invalid setting RABBITMQ_URL" in done.stderr
    assert "element 2 of 2" in done.stderr or "different virtual hosts" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout
