"""The `async-data-processor` command: `server` (the API); more subcommands follow.

Settings come from the environment (see README); a flag, where offered, overrides its
variable. Invalid settings end the process with status 2 and one line per problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from services.api.settings import ApiSettings
from services.common.logs import configure_logging

# Flags shared by every service: (flag, settings field, type, help).
_COMMON_FLAGS: list[tuple[str, str, type, str]] = [
    ("--rabbitmq-url", "rabbitmq_url", str, "broker URL (RABBITMQ_URL)"),
    ("--shards-count", "shards_count", int, "number of shards (SHARDS_COUNT)"),
    ("--queue-prefix", "queue_prefix", str, "queue name prefix (QUEUE_PREFIX)"),
    ("--log-level", "log_level", str, "DEBUG, INFO, WARNING or ERROR (LOG_LEVEL)"),
]
_SERVER_FLAGS: list[tuple[str, str, type, str]] = [
    ("--host", "host", str, "listen address (HOST)"),
    ("--port", "port", int, "listen port (PORT)"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body (MAX_BODY_BYTES)"),
    (
        "--publish-timeout-seconds",
        "publish_timeout_seconds",
        float,
        "longest wait for confirms (PUBLISH_TIMEOUT_SECONDS)",
    ),
]


def _add_flags(parser: argparse.ArgumentParser, flags: list[tuple[str, str, type, str]]) -> None:
    for flag, dest, kind, help_text in flags:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="async-data-processor",
        description="HTTP ingestion API and background processor over RabbitMQ.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    server = commands.add_parser(
        "server",
        help="run the web server that exposes the API for creating messages",
        description="Run the ingestion API. Every option also reads its environment variable.",
    )
    _add_flags(server, _SERVER_FLAGS + _COMMON_FLAGS)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "command" and v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = ApiSettings(**_overrides(args))
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            name = ".".join(str(part) for part in error["loc"]).upper()
            print(f"async-data-processor: invalid setting {name}: {error['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    from services.api.server import run

    run(settings)
    return 0
