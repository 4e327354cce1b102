#!/usr/bin/env bash
# Prove the images: build Dockerfile.api and Dockerfile.consumer with buildah and run them
# with podman as the Kubernetes chart runs them, against the local RabbitMQ. No Docker
# engine and no container registry are needed:
#
#   base     a stand-in for python:3.11-slim-bookworm: `debootstrap --variant=minbase` of
#            bookworm with Debian's Python 3.11 from the mirror apt already uses, python/pip
#            in /usr/local/bin, no EXTERNALLY-MANAGED marker, the host's CA bundle trusted;
#            imported with `podman import` under docker.io/library/python:3.11-slim-bookworm
#            (what the Dockerfiles' short name resolves to). Cached as a tar keyed by a hash
#            of the recipe, so only the first run pays for debootstrap.
#   build    `buildah bud --pull=never --layers --force-rm --format docker`, host network.
#   run      --read-only (only /tmp writable, a tmpfs), the image's own user, no
#            capabilities, no new privileges, host network, RabbitMQ in a vhost of its own,
#            free ports, the consumer's /data a bind-mounted directory owned by uid 10001.
#   checks   /healthz, POST /message -> 201, the entries in the consumer's files owned by
#            10001, both /metrics, `podman healthcheck run`, SIGTERM -> exit 0 within the
#            bound with every posted entry written and the queues empty, image sizes.
#
# Prints one line per check and a summary; exits 1 if any check failed. Needs root (apt-get,
# debootstrap, rootful podman, rabbitmqctl). Storage, containers.conf and registries.conf
# are its own (CONTAINERS_STORAGE_CONF, CONTAINERS_CONF, CONTAINERS_REGISTRIES_CONF), under
# a cache directory outside the repository (ADP_IMAGES_CACHE, default
# ${XDG_CACHE_HOME:-$HOME/.cache}/adp-images) that also keeps the base tar and the build
# layers, so a second run takes seconds. Only the host network is used: no CNI or netavark
# network is created. Idempotent; one run at a time (a lock in the cache directory).
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$PWD
started=$SECONDS

BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm  # FROM python:3.11-slim-bookworm
API_IMAGE=localhost/async-data-processor-api:ci
CONSUMER_IMAGE=localhost/async-data-processor-consumer:ci
MAX_IMAGE_BYTES=${MAX_IMAGE_BYTES:-200000000}  # 200 MB, the API image
# The consumer image also carries the operator (kopf) and the object-store client (obstore,
# 16 MB): a bound of its own, so neither image grows unnoticed.
MAX_CONSUMER_IMAGE_BYTES=${MAX_CONSUMER_IMAGE_BYTES:-235000000}  # 235 MB
STOP_BOUND_SECONDS=25  # SHUTDOWN_TIMEOUT_SECONDS (20) + the consumer's 3 s of closing + margin
SUITE=bookworm
INCLUDE=python3,python3-venv,python3-pip,ca-certificates
HOST_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

log() { printf 'ci-images: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}

[[ $(id -u) == 0 ]] || die "needs root (apt-get, debootstrap, rootful podman, rabbitmqctl)"

# --- tools -----------------------------------------------------------------------------------
# debootstrap and rabbitmqctl live in /usr/sbin, which a non-login PATH may lack.
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
packages=()
for tool in debootstrap buildah podman runc; do
  command -v "$tool" >/dev/null 2>&1 || packages+=("$tool")
done
for tool in curl jq; do
  command -v "$tool" >/dev/null 2>&1 || packages+=("$tool")
done
if ((${#packages[@]})); then
  log "installing ${packages[*]} (apt-get)"
  apt_install() {
    DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get install -y -qq --no-install-recommends \
      "${packages[@]}" >&2
  }
  apt_install || { apt-get update -qq >&2 && apt_install; }
fi
for tool in debootstrap buildah podman runc curl jq rabbitmqctl; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool still not found on PATH"
done
scripts/ensure-rabbitmq.sh

# --- own configuration and storage, under the cache directory --------------------------------
cache=${ADP_IMAGES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/adp-images}
run_dir=/run/adp-images
mkdir -p "$cache/config" "$cache/storage" "$cache/cni" "$run_dir"
# One run at a time: they share the storage.
exec 9>"$cache/lock"
flock -w 900 9 || die "another ci-images run holds $cache/lock"

cat >"$cache/config/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$cache/storage"
runroot = "$run_dir/storage"
EOF
cat >"$cache/config/containers.conf" <<EOF
[containers]
# The machine's hard limits are below podman's defaults (nofile 1048576), which then fail.
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "host"
log_driver = "k8s-file"

[network]
# Only --network host is used; keep any network configuration out of /etc/cni.
network_config_dir = "$cache/cni"

[engine]
cgroup_manager = "cgroupfs"
# runc, not crun: some of these machines mount cgroup v1 and v2 side by side ("hybrid"),
# which crun refuses ("cgroups in hybrid mode not supported"); runc runs on both.
runtime = "runc"
events_logger = "file"
events_logfile_path = "$run_dir/events.log"
tmp_dir = "$run_dir/libpod"
EOF
cat >"$cache/config/registries.conf" <<EOF
# No registry is ever asked (--pull=never): a short name resolves to docker.io/library/...
# in local storage, where the stand-in base is imported.
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
EOF
export CONTAINERS_STORAGE_CONF=$cache/config/storage.conf
export CONTAINERS_CONF=$cache/config/containers.conf
export CONTAINERS_REGISTRIES_CONF=$cache/config/registries.conf

# --- checks and clean-up ---------------------------------------------------------------------
failures=0
passed=0
ok() {
  printf 'ok    %s\n' "$*"
  passed=$((passed + 1))
}
fail() {
  printf 'FAIL  %s\n' "$1"
  if (($# > 1)); then printf '%s\n' "$2" | sed 's/^/      /'; fi
  failures=$((failures + 1))
}

suffix="$$-$RANDOM"
vhost=adp-ci-images-$suffix
api_ctr=adp-ci-api-$suffix
consumer_ctr=adp-ci-consumer-$suffix
out_dir=
vhost_made=0
cleanup() {
  local status=$?
  set +e
  podman rm -f -t 0 "$api_ctr" "$consumer_ctr" >/dev/null 2>&1
  buildah rm --all >/dev/null 2>&1
  ((vhost_made)) && rabbitmqctl -q delete_vhost "$vhost" >/dev/null 2>&1
  [[ -n $out_dir ]] && rm -rf "$out_dir"
  rm -rf "$cache/rootfs.tmp" "$cache"/base-*.tar.tmp
  exit "$status"
}
trap cleanup EXIT
trap 'log "unexpected failure at line $LINENO: $BASH_COMMAND"' ERR

# --- the stand-in base image -----------------------------------------------------------------
# The Debian mirror apt uses: the first bookworm source of deb822 files, else of sources.list.
debian_mirror() {
  local file
  for file in /etc/apt/sources.list.d/*.sources; do
    [[ -f $file ]] || continue
    awk -v suite="$SUITE" '
      /^[[:space:]]*$/ { if (uri != "" && ok) { print uri; exit } uri = ""; ok = 0; next }
      tolower($1) == "uris:" { uri = $2 }
      tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
      END { if (uri != "" && ok) print uri }' "$file"
  done
  { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } |
    sed -E 's/\[[^]]*\]//' |
    awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2 }'
}

# make_base_rootfs DIR MIRROR: python:3.11-slim-bookworm as far as the Dockerfiles rely on it.
# (Its text is part of the cache key: change it and the base is made again.)
make_base_rootfs() {
  local root=$1 mirror=$2 name
  # passwd (groupadd, useradd) and coreutils (install) are Priority: required, so in minbase.
  if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$root" "$mirror" \
    >"$cache/debootstrap.log" 2>&1; then
    tail -n 30 "$cache/debootstrap.log" >&2
    return 1
  fi
  # python, python3, pip, pip3 in /usr/local/bin, as in the official image.
  ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
  ln -sf /usr/bin/python3 "$root/usr/local/bin/python3"
  ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
  ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip3"
  # The official image's Python is its own, not the distribution's: pip installs freely.
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  # The host's CA bundle (it may hold a proxy's CA), so pip in the build reaches PyPI.
  cp "$HOST_CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
  # Slim, as debian:bookworm-slim and the official image: no package lists, caches,
  # documentation, translations or logs; no test packages or .pyc files in Python's tree.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/var/log/* "$root"/tmp/* "$root"/root/.cache "$root"/usr/lib/python3.11/test
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  find "$root/usr/lib/python3" "$root/usr/lib/python3.11" -depth \
    \( -type d -name __pycache__ -o -type f -name '*.py[co]' \) -exec rm -rf {} +
  : >"$root/etc/resolv.conf"
  chroot "$root" python -m pip --version >/dev/null
}

mirror=$(debian_mirror | awk 'NR == 1')
[[ -n $mirror ]] || die "no Debian $SUITE source found in /etc/apt/sources.list{,.d}"
[[ -r $HOST_CA_BUNDLE ]] || die "$HOST_CA_BUNDLE not readable"
recipe_hash=$(
  {
    declare -f make_base_rootfs
    echo "$SUITE $INCLUDE $mirror"
    sha256sum <"$HOST_CA_BUNDLE"
  } | sha256sum | cut -c1-16
)
base_tar=$cache/base-$recipe_hash.tar

have_base=$(podman image inspect --format '{{index .Labels "adp.base-recipe"}}' "$BASE_IMAGE" \
  2>/dev/null || true)
if [[ $have_base == "$recipe_hash" ]]; then
  log "base image $BASE_IMAGE ($recipe_hash) already in storage"
else
  if [[ ! -f $base_tar ]]; then
    t0=$SECONDS
    log "making the base rootfs: debootstrap $SUITE from $mirror"
    rm -rf "$cache/rootfs.tmp"
    make_base_rootfs "$cache/rootfs.tmp" "$mirror"
    tar --numeric-owner -C "$cache/rootfs.tmp" -cf "$base_tar.tmp" .
    mv "$base_tar.tmp" "$base_tar"
    rm -rf "$cache/rootfs.tmp"
    # Older recipes' tars are of no use any more.
    find "$cache" -maxdepth 1 -name 'base-*.tar' ! -name "base-$recipe_hash.tar" -delete
    log "base rootfs cached as $base_tar in $((SECONDS - t0)) s"
  fi
  # Everything in this storage was built on the old base: of no use any more.
  if podman image exists "$BASE_IMAGE"; then podman rmi --all --force >/dev/null; fi
  podman import --quiet \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change "LABEL adp.base-recipe=$recipe_hash" \
    --message "stand-in for python:3.11-slim-bookworm (debootstrap $SUITE)" \
    "$base_tar" "$BASE_IMAGE" >/dev/null
  log "imported $base_tar as $BASE_IMAGE"
fi

# --- build -----------------------------------------------------------------------------------
bud() {
  buildah bud --pull=never --layers --force-rm --format docker --network host \
    --runtime runc "$@" "$repo" 2>&1
}
# build DOCKERFILE IMAGE: the build stage is tagged too (IMAGE-build), so that pruning the
# nameless images left by earlier builds keeps its cached layers.
build() {
  local dockerfile=$1 image=$2 output t0=$SECONDS
  if output=$(bud -f "$dockerfile" --target build -t "${image%:*}-build:ci") &&
    output=$(bud -f "$dockerfile" -t "$image"); then
    ok "build $dockerfile -> $image ($((SECONDS - t0)) s)"
  else
    fail "build $dockerfile" "$(tail -n 40 <<<"$output")"
    return 1
  fi
}
built=1
build Dockerfile.api "$API_IMAGE" || built=0
build Dockerfile.consumer "$CONSUMER_IMAGE" || built=0
# Earlier builds' images that lost their name, and the layers only they used.
podman image prune --force >/dev/null 2>&1 || true

summary() {
  printf 'ci-images: %d passed, %d failed (%d s)\n' "$passed" "$failures" "$((SECONDS - started))"
  ((failures == 0))
}
if ((!built)); then
  summary
  exit 1
fi

for image in "$API_IMAGE" "$CONSUMER_IMAGE"; do
  size=$(podman image inspect --format '{{.Size}}' "$image")
  mb=$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1e6 }')
  limit=$MAX_IMAGE_BYTES
  [[ $image == "$CONSUMER_IMAGE" ]] && limit=$MAX_CONSUMER_IMAGE_BYTES
  limit_mb=$((limit / 1000000))
  if ((size < limit)); then
    ok "size $image: $mb MB (< $limit_mb MB)"
  else
    fail "size $image: $mb MB (limit $limit_mb MB)"
  fi
done

# The chart runs the operator from the consumer image (the `operator` extra); the API image
# leaves it out.
if output=$(podman run --rm --read-only --network none "$CONSUMER_IMAGE" operator --help 2>&1); then
  ok "consumer image carries the operator (operator --help)"
else
  fail "consumer image: operator --help" "$output"
fi

# --- run as the chart runs them --------------------------------------------------------------
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
api_port=$(free_port)
metrics_port=$(free_port)
while [[ $metrics_port == "$api_port" ]]; do metrics_port=$(free_port); done

rabbitmqctl -q add_vhost "$vhost" >/dev/null
vhost_made=1
rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null
broker_url="amqp://guest:guest@127.0.0.1:5672/$vhost"

out_dir=$(mktemp -d /tmp/adp-ci-images-data.XXXXXX)
chown 10001:10001 "$out_dir"
chmod 0750 "$out_dir"

# What a Kubernetes pod with the chart's securityContext gets: read-only root filesystem with
# only /tmp writable (no other tmpfs: --read-only-tmpfs=false), the image's own user, no
# capabilities, no privilege escalation.
run_opts=(--detach --read-only --read-only-tmpfs=false --tmpfs /tmp --network host
  --cap-drop ALL --security-opt no-new-privileges
  -e "RABBITMQ_URL=$broker_url" -e SHARDS_COUNT=5)
# start NAME ARGS...: podman run. Without systemd podman cannot schedule the HEALTHCHECK's
# timer and says so: expected here (`podman healthcheck run` runs the check instead).
start() {
  local name=$1 output
  shift
  if output=$(podman run "${run_opts[@]}" --name "$name" "$@" 2>&1 >/dev/null); then
    ok "podman run $name (read-only, /tmp tmpfs, no capabilities, host network)"
  else
    fail "podman run $name" "$output"
    return 1
  fi
}
started_both=1
start "$api_ctr" -e "PORT=$api_port" "$API_IMAGE" || started_both=0
# A partial batch would wait 60 s: the entries posted last are written only by the drain.
start "$consumer_ctr" -e "METRICS_PORT=$metrics_port" -e BATCH_SIZE=5 \
  -e BATCH_MAX_WAIT_SECONDS=60 -v "$out_dir:/data" "$CONSUMER_IMAGE" || started_both=0
if ((!started_both)); then
  summary
  exit 1
fi

logs() { podman logs --tail 25 "$1" 2>&1; }
running() { [[ $(podman inspect --format '{{.State.Status}}' "$1" 2>/dev/null) == running ]]; }
# wait_http URL SECONDS CTR: until URL answers 2xx (gives up at once if CTR has stopped).
wait_http() {
  local deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; do
    ((SECONDS < deadline)) && running "$3" || return 1
    sleep 0.5
  done
}

api=http://127.0.0.1:$api_port
consumer=http://127.0.0.1:$metrics_port
for pair in "$api_ctr:$API_IMAGE" "$consumer_ctr:$CONSUMER_IMAGE"; do
  ctr=${pair%%:*}
  image=${pair#*:}
  uid=$(podman exec "$ctr" id -u 2>&1 || true)
  image_user=$(podman image inspect --format '{{.Config.User}}' "$image")
  if [[ $uid == 10001 ]]; then
    ok "$ctr runs as the image's user $image_user (uid $uid)"
  else
    fail "$ctr runs as uid $uid, not 10001 (image USER '$image_user')" "$(logs "$ctr")"
  fi
done

if wait_http "$api/healthz" 30 "$api_ctr"; then ok "api GET /healthz 200"; else
  fail "api GET /healthz" "$(logs "$api_ctr")"
fi
if wait_http "$api/readyz" 60 "$api_ctr"; then ok "api GET /readyz 200 (connected to vhost $vhost)"; else
  fail "api GET /readyz" "$(logs "$api_ctr")"
fi
if wait_http "$consumer/healthz" 30 "$consumer_ctr"; then ok "consumer GET /healthz 200"; else
  fail "consumer GET /healthz" "$(logs "$consumer_ctr")"
fi
if wait_http "$consumer/readyz" 60 "$consumer_ctr"; then ok "consumer GET /readyz 200 (broker, /data writable)"
else
  fail "consumer GET /readyz" "$(curl -sS "$consumer/readyz" 2>&1; echo; logs "$consumer_ctr")"
fi

# entries TAG SHARD COUNT: COUNT entries landing in SHARD (of 5), values TAG-sSHARD-n.
entries() {
  jq -cn --arg tag "$1" --argjson shard "$2" --argjson count "$3" '
    [range($count) | {timestamp: (1570864850 + $shard + 5 * . | todate),
                     value: "\($tag)-s\($shard)-\(.)"}]'
}
expected=()
# post BODY: POST /message; the entries count as posted only on 201.
post() {
  local body=$1 status
  status=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 "$api/message" \
    -H 'Content-Type: application/json' -d "$body" 2>&1 || true)
  if [[ $status == 201 ]]; then
    mapfile -t -O "${#expected[@]}" expected < <(jq -r '.[].value' <<<"$body")
    return 0
  fi
  fail "POST /message: $status, not 201" "$(logs "$api_ctr")"
  return 1
}
# written: every value in the consumer's batch files (not its dot files), one a line.
written() {
  find "$out_dir" -maxdepth 1 -name '*.jsonl' ! -name '.*' -exec cat {} + 2>/dev/null |
    jq -r '.value'
}
missing() { comm -23 <(printf '%s\n' "${expected[@]}" | sort) <(written | sort -u); }

# Two full batches (shards 0 and 1): written at once.
if post "$(entries full 0 5)" && post "$(entries full 1 5)"; then
  ok "api POST /message 201 (10 entries, shards 0 and 1)"
fi
deadline=$((SECONDS + 20))
while [[ -n $(missing) ]] && ((SECONDS < deadline)) && running "$consumer_ctr"; do sleep 0.5; done
if [[ -z $(missing) ]]; then
  ok "consumer wrote the ${#expected[@]} entries into the bind-mounted /data"
else
  fail "consumer did not write: $(missing | tr '\n' ' ')" "$(logs "$consumer_ctr")"
fi
owners=$(find "$out_dir" -mindepth 1 -maxdepth 1 -name '*.jsonl' -printf '%U:%G\n' | sort -u)
if [[ $owners == 10001:10001 ]]; then
  ok "batch files owned by 10001:10001"
else
  fail "batch files owned by '${owners//$'\n'/ }', not 10001:10001"
fi

if body=$(curl -fsS --max-time 5 "$api/metrics") && grep -q '^adp_api_entries_accepted_total' <<<"$body"
then ok "api GET /metrics (adp_api_entries_accepted_total)"
else fail "api GET /metrics" "$(head -c 2000 <<<"${body:-}")"; fi
if body=$(curl -fsS --max-time 5 "$consumer/metrics") &&
  grep -q '^adp_consumer_batches_written_total' <<<"$body"
then ok "consumer GET /metrics (adp_consumer_batches_written_total)"
else fail "consumer GET /metrics" "$(head -c 2000 <<<"${body:-}")"; fi

for ctr in "$api_ctr" "$consumer_ctr"; do
  if output=$(podman healthcheck run "$ctr" 2>&1); then
    ok "podman healthcheck run $ctr: ${output:-healthy}"
  else
    fail "podman healthcheck run $ctr" "$output"
  fi
done

# Partial batches (3 entries in shard 2, 2 in shard 3): only a drain writes them now.
if post "$(entries partial 2 3)" && post "$(entries partial 3 2)"; then
  ok "api POST /message 201 (5 more entries, partial batches)"
fi
# queue_counts: "ready unacked" summed over the vhost's queues.
queue_counts() {
  rabbitmqctl -q list_queues -p "$vhost" --no-table-headers messages_ready \
    messages_unacknowledged 2>/dev/null | awk '{ r += $1; u += $2 } END { print r + 0, u + 0 }'
}
deadline=$((SECONDS + 15))
until [[ $(queue_counts) == "0 2" ]] || ((SECONDS >= deadline)) || ! running "$consumer_ctr"; do
  sleep 0.5
done
counts=$(queue_counts)
if [[ $counts == "0 2" ]]; then
  ok "consumer holds the 2 partial messages unacked"
else
  fail "queues (ready unacked) are '$counts', expected '0 2'"
fi

# stop CTR NAME: SIGTERM, then it must exit 0 within the bound (else it is killed).
stop() {
  local ctr=$1 name=$2 t0=$SECONDS code
  if ! running "$ctr"; then
    code=$(podman inspect --format '{{.State.ExitCode}}' "$ctr" 2>&1)
    fail "$name SIGTERM: had already stopped (exit $code)" "$(logs "$ctr")"
    return
  fi
  podman kill --signal TERM "$ctr" >/dev/null
  if code=$(timeout "$STOP_BOUND_SECONDS" podman wait "$ctr" 2>&1); then
    if [[ $code == 0 ]]; then
      ok "$name SIGTERM: exit 0 in $((SECONDS - t0)) s (bound ${STOP_BOUND_SECONDS} s)"
    else
      fail "$name SIGTERM: exit $code" "$(logs "$ctr")"
    fi
  else
    podman kill --signal KILL "$ctr" >/dev/null 2>&1 || true
    fail "$name SIGTERM: still running after ${STOP_BOUND_SECONDS} s (killed)" "$(logs "$ctr")"
  fi
}
stop "$consumer_ctr" consumer
if [[ -z $(missing) ]]; then
  ok "consumer drain lost nothing: all ${#expected[@]} posted entries are in the files"
else
  fail "consumer drain lost: $(missing | tr '\n' ' ')" "$(logs "$consumer_ctr")"
fi
duplicates=$(written | sort | uniq -d)
if [[ -z $duplicates ]]; then ok "no entry written twice"
else fail "written twice: ${duplicates//$'\n'/ }"; fi
counts=$(queue_counts)
if [[ $counts == "0 0" ]]; then ok "queues empty after the drain (all acked)"
else fail "queues (ready unacked) after the drain: '$counts'"; fi
stop "$api_ctr" api

summary
