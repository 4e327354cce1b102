#!/usr/bin/env bash
# Runs shellcheck on every script of the repo (the kind workflow cannot run here: this is its
# check). Installs Debian's shellcheck when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v shellcheck >/dev/null 2>&1; then
  apt-get install -y -qq shellcheck >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && apt-get install -y -qq shellcheck >/dev/null; }
fi
shellcheck scripts/*.sh .ci/run
echo "ok    shellcheck scripts/*.sh .ci/run"
