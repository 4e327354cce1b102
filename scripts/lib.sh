# Shared by the check-*.sh scripts (sourced, not run): one line per check, and the Debian
# packages a check needs installed when missing.
# shellcheck shell=bash

failures=0

# check NAME COMMAND...: run it and print one line; on failure also the tool's own output;
# after a pass, its WARN lines (kubernetes-validate's skipped custom resources).
check() {
  local name=$1 output
  shift
  if output=$("$@" 2>&1); then
    printf 'ok    %s\n' "$name"
    grep '^WARN' <<<"$output" | sort -u | sed 's/^/      /' || true
  else
    printf 'FAIL  %s\n' "$name"
    printf '%s\n' "$output" | sed 's/^/      /'
    failures=$((failures + 1))
  fi
}

# need TOOL=PACKAGE...: install (apt-get, without refreshing the lists first unless that
# fails) the packages of the tools not on PATH; fail if a tool is still missing after.
need() {
  local pair packages=()
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null 2>&1 || packages+=("${pair#*=}")
  done
  if ((${#packages[@]})); then
    echo "installing ${packages[*]} (apt-get)" >&2
    # --no-install-recommends: docker-compose would otherwise pull in the whole Docker engine.
    _apt() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2; }
    _apt || { apt-get update -qq >&2 && _apt; }
  fi
  for pair in "$@"; do
    if ! command -v "${pair%%=*}" >/dev/null 2>&1; then
      echo "${pair%%=*} still not found on PATH after installing ${pair#*=}" >&2
      return 1
    fi
  done
}

# finish NAME: exit 1 if any check failed.
finish() {
  if ((failures)); then
    echo "$1: $failures check(s) failed" >&2
    exit 1
  fi
}
