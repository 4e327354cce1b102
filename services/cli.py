"""The `async-data-processor` command: `server` (the API), `message-consumer` (the
consumer), `dev` (both in one process, for a laptop).

Settings come from the environment (see README); a flag, where offered, overrides its
variable. Invalid settings end the process with status 2 and one line per problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from services.api.settings import ApiSettings
from services.common.logs import configure_logging
from services.consumer.settings import ConsumerSettings
from services.operator.settings import OperatorSettings

# Flags are derived from the settings classes: each field is a flag named after it, its help
# the field's description, variable, bounds and default, so the two cannot drift. Secrets
# get no flag: a command line is visible to every user of the host (`ps`, /proc).
_FLAG_TYPES: dict[object, Callable[[str], Any]] = {int: int, float: float, Path: Path}


def _environment_name(model: type[BaseSettings], name: str) -> str:
    return f"{model.model_config.get('env_prefix', '')}{name}".upper()


def _is_secret(field: FieldInfo) -> bool:
    return SecretStr in (field.annotation, *get_args(field.annotation))


def _bounds(field: FieldInfo) -> str:
    words = []
    for item in field.metadata:
        for attribute, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attribute, None)
            if value is not None:
                words.append(f"{sign} {value}")
    return ", ".join(words)


def _help(model: type[BaseSettings], name: str, field: FieldInfo) -> str:
    details = [_environment_name(model, name)]
    choices = [arg for arg in get_args(field.annotation) if isinstance(arg, str)]
    if get_origin(field.annotation) is Literal and choices:
        details.append("one of " + ", ".join(choices))
    if bounds := _bounds(field):
        details.append(bounds)
    if field.default not in (None, ""):
        details.append(f"default {field.default}")
    description = (field.description or "").replace("%", "%%")  # argparse formats help
    return f"{description} ({'; '.join(details)})"


def flag_fields(model: type[BaseSettings]) -> dict[str, FieldInfo]:
    """The fields of a settings class that get a flag (every one but the secrets)."""
    return {name: f for name, f in model.model_fields.items() if not _is_secret(f)}


def _add_flags(parser: argparse.ArgumentParser, *models: type[BaseSettings]) -> None:
    seen: set[str] = set()
    for model in models:
        for name, field in flag_fields(model).items():
            if name in seen:  # a shared field, in both services' classes
                continue
            seen.add(name)
            parser.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                type=_FLAG_TYPES.get(field.annotation, str),  # the rest pydantic parses
                default=None,
                help=_help(model, name, field),
            )


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
    _add_flags(server, ApiSettings)
    consumer = commands.add_parser(
        "message-consumer",
        help="run the pools of workers that consume messages and write them to files",
        description="Run the consumer. Every option also reads its environment variable.",
    )
    _add_flags(consumer, ConsumerSettings)
    dev = commands.add_parser(
        "dev",
        help="run the API and the consumer in one process (for a laptop)",
        description="Run the API and the consumer in one process. Every option also reads "
        "its environment variable.",
    )
    _add_flags(dev, ApiSettings, ConsumerSettings)
    operator = commands.add_parser(
        "operator",
        help="run the kopf operator that scales consumer replicas (inside Kubernetes)",
        description="Run the operator. Every option also reads its environment variable. It "
        "logs in with the pod's service account (SERVICE_ACCOUNT_DIR, KUBERNETES_SERVICE_HOST/"
        "PORT) or, outside a cluster, KUBECONFIG.",
    )
    _add_flags(operator, OperatorSettings)
    return parser


def _settings(model: type[BaseSettings], args: argparse.Namespace) -> Any:
    """The settings from the environment, with the flags given on the command line."""
    overrides = {
        key: value
        for key, value in vars(args).items()
        if key in model.model_fields and value is not None
    }
    return model(**overrides)


def _report(exc: ValidationError) -> int:
    for error in exc.errors(include_url=False):
        name = ".".join(str(part) for part in error["loc"]).upper() or "settings"
        print(f"async-data-processor: invalid setting {name}: {error['msg']}", file=sys.stderr)
    return 2


def _operator(args: argparse.Namespace) -> int:
    # Imported here: kopf (the `operator` extra, in the consumer image) is only needed here.
    try:
        from services.operator.handlers import run as run_operator
    except ImportError as exc:
        print(
            f"async-data-processor: the operator needs the `operator` extra ({exc}); "
            "the consumer image has it",
            file=sys.stderr,
        )
        return 2
    try:
        settings = _settings(OperatorSettings, args)
    except ValidationError as exc:
        return _report(exc)
    configure_logging(settings.log_level)
    run_operator(settings)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "operator":
        return _operator(args)
    try:
        api: ApiSettings | None = None
        consumer: ConsumerSettings | None = None
        if args.command in ("server", "dev"):
            api = _settings(ApiSettings, args)
        if args.command in ("message-consumer", "dev"):
            consumer = _settings(ConsumerSettings, args)
    except ValidationError as exc:
        return _report(exc)
    if api is not None and consumer is not None:
        from services.devserver import run as run_dev

        configure_logging(api.log_level)
        run_dev(api, consumer)
    elif api is not None:
        from services.api.server import run as run_server

        configure_logging(api.log_level)
        run_server(api)
    elif consumer is not None:
        from services.consumer.runner import run as run_consumer

        configure_logging(consumer.log_level)
        run_consumer(consumer)
    return 0
