# Two commands on a fresh machine: `make run` (the service) and `make test` (the suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test lint unit install broker tools bench bench-cluster cluster-up cluster-down soak \
	audit audit-deps check-deploy clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

broker:
	scripts/ensure-rabbitmq.sh

## tools: the command-line tools the tests run (gzip, zstd, promtool: Debian packages, installed if missing)
tools:
	scripts/ensure-tools.sh

## run: install, make sure RabbitMQ answers, run API (PORT 8080) and consumer (METRICS_PORT 9100)
run: install broker
	$(BIN)/async-data-processor dev

## test: install, make sure RabbitMQ answers and the tools are there, lint and type-check,
## audit the runtime dependencies (PyPI's vulnerability data), run every test
test: install broker tools lint audit-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## audit-deps: known vulnerabilities of the runtime dependencies, from PyPI (scripts/audit_deps.py)
audit-deps: install
	$(BIN)/python scripts/audit_deps.py --extra operator --extra s3

lint: install
	$(BIN)/ruff check services tests bench scripts
	$(BIN)/ruff format --check services tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

## check-deploy: lint and validate Dockerfiles, compose, Prometheus, alerts, dashboard, chart
## (also run by `make test`, through tests/deploy)
check-deploy: install
	scripts/check-deploy-files.sh
	scripts/check-observability.sh
	scripts/check-chart.sh
	scripts/check-shell.sh

## unit: the tests that need no broker
unit: install tools
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

## bench: the API load, consumer drain, freshness and output layout benchmarks (not part of
## `make test`); needs wrk
bench: install broker
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench.api_load --repeat 3 $(BENCH_ARGS)
	$(BIN)/python -m bench.consumer_drain
	$(BIN)/python -m bench.freshness
	$(BIN)/python -m bench.layout_drain
	$(BIN)/python -m bench.object_drain

## bench-cluster: quorum queues on the local three-node cluster vs classic on one node, one run
bench-cluster: install
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench.cluster_throughput $(BENCH_ARGS)

## cluster-up / cluster-down: the local three-node RabbitMQ cluster (scripts/rabbitmq-cluster.sh)
cluster-up:
	scripts/rabbitmq-cluster.sh up
cluster-down:
	scripts/rabbitmq-cluster.sh down

## soak: the fault suite, ADP_FAULT_SCALE (default 10) times longer, then its figures table
soak: install broker
	ADP_FAULT_SCALE=$${ADP_FAULT_SCALE:-10} $(BIN)/python -m pytest tests/e2e/test_faults.py \
		-o timeout=3600 $(PYTEST_ARGS)
	$(BIN)/python -m bench.fault_report

## audit: known vulnerabilities in the installed dependencies (pip-audit; needs PyPI's JSON
## API or OSV reachable, which the CI machines are not: see README, Security)
audit: install
	$(BIN)/python -m pip install --quiet pip-audit
	$(BIN)/pip-audit --skip-editable --strict

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
