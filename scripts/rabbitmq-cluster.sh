#!/usr/bin/env bash
# A local three-node RabbitMQ cluster of the machine's own rabbitmq-server, on loopback ports
# of its own, beside (never instead of) the default broker on 5672. For the cluster tests
# (tests/e2e/test_cluster_faults.py), the cluster benchmark and trying failover by hand.
#
#   scripts/rabbitmq-cluster.sh up            start the nodes missing, join them (idempotent)
#   scripts/rabbitmq-cluster.sh down          stop every node and delete the cluster's state
#   scripts/rabbitmq-cluster.sh kill NODE     kill -9 a node (NODE: n1, n2 or n3)
#   scripts/rabbitmq-cluster.sh stop NODE     stop a node gracefully (as a rolling restart does)
#   scripts/rabbitmq-cluster.sh start NODE    start a stopped or killed node; it rejoins
#   scripts/rabbitmq-cluster.sh status        every node's state, the cluster's members
#   scripts/rabbitmq-cluster.sh urls          the RABBITMQ_URL of the cluster (node list)
#
# Node nI listens for AMQP on 127.0.0.1:$((ADP_CLUSTER_PORT_BASE + I)) (5791..5793 by
# default) and for Erlang distribution on 20000 more (25791..25793); no plugin is enabled,
# so no management port. State and logs live under ADP_CLUSTER_DIR
# (default /tmp/adp-rabbitmq-cluster). The nodes run as the rabbitmq user with its HOME, so
# they share the Erlang cookie with rabbitmqctl.
set -euo pipefail

base_port=${ADP_CLUSTER_PORT_BASE:-5790}
state=${ADP_CLUSTER_DIR:-/tmp/adp-rabbitmq-cluster}
wait_seconds=${ADP_CLUSTER_WAIT_SECONDS:-90}
nodes=(n1 n2 n3)
rabbit_home=$(getent passwd rabbitmq | cut -d: -f6 || true)

die() {
  echo "rabbitmq-cluster: $*" >&2
  exit 1
}

index() { # n2 -> 2
  case $1 in
  n1 | n2 | n3) echo "${1#n}" ;;
  *) die "unknown node '$1' (n1, n2 or n3)" ;;
  esac
}

ctl() { # ctl NODE ARGS...: rabbitmqctl against that node, as the nodes' user (same cookie)
  local node=$1
  shift
  HOME=$rabbit_home rabbitmqctl -q -n "$node@localhost" "$@"
}

running() { ctl "$1" ping >/dev/null 2>&1; }

start_node() {
  local node=$1 i dir
  i=$(index "$node")
  dir=$state/$node
  if running "$node"; then
    return 0
  fi
  mkdir -p "$dir/mnesia" "$dir/log"
  printf 'listeners.tcp.local = 127.0.0.1:%d\n' "$((base_port + i))" >"$dir/rabbitmq.conf"
  echo '[].' >"$dir/enabled_plugins"
  chown -R rabbitmq:rabbitmq "$state"
  (
    cd "$rabbit_home"
    env HOME="$rabbit_home" \
      RABBITMQ_NODENAME="$node@localhost" \
      RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
      RABBITMQ_DIST_PORT="$((base_port + i + 20000))" \
      RABBITMQ_MNESIA_BASE="$dir/mnesia" \
      RABBITMQ_LOG_BASE="$dir/log" \
      RABBITMQ_PID_FILE="$dir/pid" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
      runuser -u rabbitmq -- rabbitmq-server -detached >/dev/null 2>&1
  ) || die "$node: rabbitmq-server -detached failed (logs: $dir/log)"
}

await_node() {
  local node=$1 deadline=$((SECONDS + wait_seconds))
  until running "$node"; do
    ((SECONDS < deadline)) || die "$node did not answer within ${wait_seconds}s (logs: $state/$node/log)"
    sleep 1
  done
  # The ping answers before the broker's applications (and its AMQP listener) are up.
  ctl "$node" await_startup --timeout "$wait_seconds" >/dev/null ||
    die "$node did not finish starting within ${wait_seconds}s (logs: $state/$node/log)"
}

member() { # member NODE: NODE is a running member of n1's cluster
  ctl n1 cluster_status --formatter json 2>/dev/null | grep -q "\"$1@localhost\""
}

join() {
  local node=$1
  if member "$node"; then
    return 0
  fi
  local out step
  for step in stop_app reset "join_cluster n1@localhost" start_app await_startup; do
    # shellcheck disable=SC2086 # a step is a command and its argument
    out=$(ctl "$node" $step 2>&1) || die "$node: rabbitmqctl $step failed: $out"
  done
}

up() {
  [[ -n $rabbit_home ]] || die "no rabbitmq user (Debian: apt-get install rabbitmq-server)"
  command -v rabbitmq-server >/dev/null || die "rabbitmq-server not found (apt-get install rabbitmq-server)"
  local node
  for node in "${nodes[@]}"; do start_node "$node"; done
  for node in "${nodes[@]}"; do await_node "$node"; done
  join n2
  join n3
  echo "rabbitmq-cluster: up: $(urls)" >&2
}

down() {
  local node pid
  for node in "${nodes[@]}"; do
    if running "$node"; then
      ctl "$node" stop >/dev/null 2>&1 || true
    fi
    if [[ -f $state/$node/pid ]] && pid=$(cat "$state/$node/pid") && kill -0 "$pid" 2>/dev/null; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$state"
  echo "rabbitmq-cluster: down" >&2
}

kill_node() {
  local node=$1 pid
  index "$node" >/dev/null
  [[ -f $state/$node/pid ]] || die "$node has no pid file: not started"
  pid=$(cat "$state/$node/pid")
  kill -9 "$pid" 2>/dev/null || die "$node (pid $pid) is not running"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

stop_node() {
  local node=$1
  index "$node" >/dev/null
  running "$node" || return 0
  ctl "$node" stop >/dev/null
}

status() {
  local node
  for node in "${nodes[@]}"; do
    if running "$node"; then
      echo "$node@localhost running, AMQP 127.0.0.1:$((base_port + $(index "$node")))"
    else
      echo "$node@localhost not running"
    fi
  done
  for node in "${nodes[@]}"; do
    if running "$node"; then
      ctl "$node" cluster_status
      return 0
    fi
  done
}

urls() {
  local i list=()
  for i in 1 2 3; do list+=("amqp://guest:guest@127.0.0.1:$((base_port + i))/"); done
  (
    IFS=,
    echo "${list[*]}"
  )
}

case ${1:-} in
up) up ;;
down) down ;;
kill) kill_node "${2:?usage: kill NODE}" ;;
stop) stop_node "${2:?usage: stop NODE}" ;;
start)
  start_node "${2:?usage: start NODE}"
  await_node "$2"
  ;;
status) status ;;
urls) urls ;;
*)
  echo "usage: $0 up|down|kill NODE|stop NODE|start NODE|status|urls" >&2
  exit 2
  ;;
esac
