#!/usr/bin/env bash
# Runs shellcheck on every script of the repo (the kind workflow cannot run here: this is its
# check). Installs Debian's shellcheck when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
need shellcheck=shellcheck
check "shellcheck scripts/*.sh .ci/run" shellcheck -x scripts/*.sh .ci/run
finish check-shell
