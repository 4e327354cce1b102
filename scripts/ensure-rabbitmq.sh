#!/usr/bin/env bash
# Make sure the local RabbitMQ answers; start it if it does not. Used by `make test`/`make run`.
# Under CI=true a broker that still does not answer is a failure (exit 1), never a skip.
set -euo pipefail

wait_seconds=${RABBITMQ_WAIT_SECONDS:-60}

ping() { rabbitmq-diagnostics -q ping >/dev/null 2>&1; }

if ! command -v rabbitmq-diagnostics >/dev/null 2>&1; then
  echo "ensure-rabbitmq: rabbitmq-diagnostics not found; install RabbitMQ (Debian: apt-get install rabbitmq-server)" >&2
  exit 1
fi
if ping; then
  exit 0
fi
echo "ensure-rabbitmq: broker not answering; starting it (rabbitmq-server -detached)" >&2
rabbitmq-server -detached >/dev/null 2>&1 || true
deadline=$((SECONDS + wait_seconds))
until ping; do
  if ((SECONDS >= deadline)); then
    echo "ensure-rabbitmq: RabbitMQ still not answering after ${wait_seconds}s" >&2
    exit 1
  fi
  sleep 1
done
# The ping answers before the AMQP listener is up: wait for the app too.
rabbitmqctl -q await_startup >/dev/null 2>&1 || true
echo "ensure-rabbitmq: broker is up" >&2
