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
from typing import Any

from pydantic import BaseModel, ValidationError

from services.api.settings import ApiSettings
from services.common.logs import configure_logging
from services.consumer.settings import ConsumerSettings

Flag = tuple[str, str, Callable[[str], Any], str]

# (flag, settings field, type, help)
_COMMON_FLAGS: list[Flag] = [
    ("--rabbitmq-url", "rabbitmq_url", str, "broker URL (RABBITMQ_URL)"),
    ("--shards-count", "shards_count", int, "number of shards (SHARDS_COUNT)"),
    ("--queue-prefix", "queue_prefix", str, "queue name prefix (QUEUE_PREFIX)"),
    ("--log-level", "log_level", str, "DEBUG, INFO, WARNING or ERROR (LOG_LEVEL)"),
]
_SERVER_FLAGS: list[Flag] = [
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
_CONSUMER_FLAGS: list[Flag] = [
    ("--data-output-dir", "data_output_dir", Path, "batch file directory (DATA_OUTPUT_DIR)"),
    ("--metrics-port", "metrics_port", int, "port of /metrics and /workers (METRICS_PORT)"),
    ("--workers-min", "workers_min", int, "workers per shard at rest (WORKERS_MIN)"),
    ("--workers-max", "workers_max", int, "most workers per shard (WORKERS_MAX)"),
    ("--batch-size", "batch_size", int, "entries per batch file (BATCH_SIZE)"),
    (
        "--batch-max-wait-seconds",
        "batch_max_wait_seconds",
        float,
        "partial batch written after (BATCH_MAX_WAIT_SECONDS)",
    ),
    (
        "--worker-timeout-seconds",
        "worker_timeout_seconds",
        float,
        "longest time on one batch (WORKER_TIMEOUT_SECONDS)",
    ),
]
_CONSUMER_ONLY = {dest for _, dest, _, _ in _CONSUMER_FLAGS}
_SERVER_ONLY = {dest for _, dest, _, _ in _SERVER_FLAGS}


def _add_flags(parser: argparse.ArgumentParser, flags: list[Flag]) -> None:
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
    consumer = commands.add_parser(
        "message-consumer",
        help="run the pools of workers that consume messages and write them to files",
        description="Run the consumer. Every option also reads its environment variable.",
    )
    _add_flags(consumer, _CONSUMER_FLAGS + _COMMON_FLAGS)
    dev = commands.add_parser(
        "dev",
        help="run the API and the consumer in one process (for a laptop)",
        description="Run the API and the consumer in one process. Every option also reads "
        "its environment variable.",
    )
    _add_flags(dev, _SERVER_FLAGS + _CONSUMER_FLAGS + _COMMON_FLAGS)
    operator = commands.add_parser(
        "operator",
        help="run the kopf operator that scales consumer replicas (inside Kubernetes)",
        description="Run the operator. Settings: WATCH_NAMESPACE, RECONCILE_INTERVAL_SECONDS, "
        "RETRY_DELAY_SECONDS, HTTP_TIMEOUT_SECONDS, HEALTH_PORT, LOG_LEVEL; it logs in with "
        "the pod's service account (SERVICE_ACCOUNT_DIR, KUBERNETES_SERVICE_HOST/PORT) or, "
        "outside a cluster, KUBECONFIG.",
    )
    operator.add_argument(
        "--watch-namespace",
        dest="watch_namespace",
        default=None,
        help="namespace to watch (WATCH_NAMESPACE; default: all)",
    )
    operator.add_argument("--log-level", dest="log_level", default=None, help="(LOG_LEVEL)")
    return parser


def _settings(model: type[BaseModel], args: argparse.Namespace, skip: set[str]) -> Any:
    overrides = {
        key: value
        for key, value in vars(args).items()
        if key != "command" and key not in skip and value is not None
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
    from services.operator.settings import OperatorSettings

    try:
        settings = _settings(OperatorSettings, args, set())
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
            api = _settings(ApiSettings, args, _CONSUMER_ONLY)
        if args.command in ("message-consumer", "dev"):
            consumer = _settings(ConsumerSettings, args, _SERVER_ONLY)
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
