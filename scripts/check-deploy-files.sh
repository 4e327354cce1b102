#!/usr/bin/env bash
# Lint and validate the deployment files with the real tools; no Docker engine needed.
#   Dockerfile.api, Dockerfile.consumer  hadolint (warnings fail)
#   docker-compose.yml                   the compose-spec JSON schema, and docker-compose's
#                                        own parser (`config -q`, also with `--profile ha`)
#   deploy/prometheus/prometheus.yml     promtool check config (with the rule files it loads)
# Prints one line per check; exits 1 if any failed. Run from anywhere: it works in the
# repository root. Installs docker-compose and promtool (Debian packages) when missing.
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
repo=$PWD
bin=$repo/.venv/bin

# --- tools -----------------------------------------------------------------------------------
for tool in hadolint check-jsonschema; do
  if [[ ! -x $bin/$tool ]]; then
    echo "check-deploy-files: $bin/$tool missing; run \`make install\`" >&2
    exit 1
  fi
done
need docker-compose=docker-compose promtool=prometheus

# --- scratch space, removed on exit ----------------------------------------------------------
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# --- Dockerfiles -----------------------------------------------------------------------------
for dockerfile in Dockerfile.api Dockerfile.consumer; do
  check "hadolint $dockerfile" "$bin/hadolint" --no-color --failure-threshold warning "$dockerfile"
done

# --- compose ---------------------------------------------------------------------------------
check "compose-spec schema docker-compose.yml" \
  "$bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
# docker-compose 1.29 interpolates ${VAR} from the environment and from ./.env: give it an
# empty env file of its own so a developer's .env cannot change the verdict.
: >"$scratch/empty.env"
check "docker-compose config docker-compose.yml" \
  docker-compose --env-file "$scratch/empty.env" -f docker-compose.yml config -q
# The three-node profile (`docker compose --profile ha up`), merged as Compose merges it.
check "docker-compose --profile ha config docker-compose.yml" \
  docker-compose --env-file "$scratch/empty.env" -f docker-compose.yml --profile ha config -q

# --- Prometheus ------------------------------------------------------------------------------
# The config names its rule files by their paths in the container (/etc/prometheus/...,
# mounted from deploy/prometheus/ by docker-compose.yml), and promtool loads them: check a
# copy with those paths mapped back to the repository, so the real alerts.yml is checked too.
sed "s#/etc/prometheus/#$repo/deploy/prometheus/#g" deploy/prometheus/prometheus.yml \
  >"$scratch/prometheus.yml"
check "promtool check config deploy/prometheus/prometheus.yml" \
  promtool check config "$scratch/prometheus.yml"

finish check-deploy-files
