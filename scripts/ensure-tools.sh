#!/usr/bin/env bash
# Make sure the command-line tools the tests run are installed: gzip and zstd (the output
# layout's files are checked with `gzip -t` / `zstd -t`, as a downstream user would), and
# promtool with the prometheus server (Debian's `prometheus`: the alert rules, the chart's
# PrometheusRule and the dashboard's queries are checked with them, by tests that may run
# before scripts/check-observability.sh would install it).
# Installs Debian's packages when missing (apt-get, as root). Used by `make test`/`make unit`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
need gzip=gzip zstd=zstd promtool=prometheus
