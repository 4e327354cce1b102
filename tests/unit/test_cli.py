from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.cli import build_parser, main
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
