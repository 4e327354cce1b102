from __future__ import annotations

import subprocess
import sys

import pytest

from services.cli import build_parser, main


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
