#!/usr/bin/env bash
# Lint and validate the deployment files with the real tools; no Docker engine needed.
#   Dockerfile.api, Dockerfile.consumer  hadolint (warnings fail)
#   docker-compose.yml                   the compose-spec JSON schema, and docker-compose's
#                                        own parser (`config -q`)
#   deploy/prometheus/prometheus.yml     promtool check config (with the rule files it loads)
# Prints one line per check; exits 1 if any failed. Run from anywhere: it works in the
# repository root. Installs docker-compose and promtool (Debian packages) when missing.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$PWD
bin=$repo/.venv/bin

# --- tools -----------------------------------------------------------------------------------
for tool in hadolint check-jsonschema; do
  if [[ ! -x $bin/$tool ]]; then
    echo "check-deploy-files: $bin/$tool missing; run \`make install\`" >&2
    exit 1
  fi
done
packages=()
command -v docker-compose >/dev/null 2>&1 || packages+=(docker-compose)
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
if ((${#packages[@]})); then
  echo "check-deploy-files: installing ${packages[*]} (apt-get)" >&2
  # --no-install-recommends: docker-compose would otherwise pull in the whole Docker engine.
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2; }
  apt_install || { apt-get update -qq >&2 && apt_install; }
fi
for tool in docker-compose promtool; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "check-deploy-files: $tool still not found on PATH after installing" >&2
    exit 1
  fi
done

# --- scratch space, removed on exit ----------------------------------------------------------
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

failures=0
# check NAME COMMAND...: run it, print one line; on failure also the tool's own output.
check() {
  local name=$1 output
  shift
  if output=$("$@" 2>&1); then
    printf 'ok    %s\n' "$name"
  else
    printf 'FAIL  %s\n' "$name"
    printf '%s\n' "$output" | sed 's/^/      /'
    failures=$((failures + 1))
  fi
}

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

# --- Prometheus ------------------------------------------------------------------------------
# The config names its rule files by their paths in the container (/etc/prometheus/...,
# mounted from deploy/prometheus/ by docker-compose.yml), and promtool loads them: check a
# copy with those paths mapped back to the repository, so the real alerts.yml is checked too.
sed "s#/etc/prometheus/#$repo/deploy/prometheus/#g" deploy/prometheus/prometheus.yml \
  >"$scratch/prometheus.yml"
check "promtool check config deploy/prometheus/prometheus.yml" \
  promtool check config "$scratch/prometheus.yml"

if ((failures)); then
  echo "check-deploy-files: $failures check(s) failed" >&2
  exit 1
fi
