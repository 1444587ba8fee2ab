#!/usr/bin/env bash
# Reproduces the README's "Cluster" numbers (Performance section) on this host: builds
# release binaries, starts a redis-server of its own (AOF, fsync always) and imshard
# nodes on non-default loopback ports, runs the loadgen, keeps every JSON report in
# $OUT, and stops every process it started by PID.
#
#   loadgen/cluster-numbers.sh [OUT_DIR]     (default: target/perf-cluster)
#
# Part 1, throughput (one Redis per configuration, fresh):
#   ref   one node on --store redis without --node-id (no cluster, no pub/sub)
#   one   one node, --node-id n1 (cluster mode: pushes go through Redis pub/sub)
#   three three nodes n1..n3 on the same Redis, the loadgen spreading users over them
# each with --shards 1, all sharing the host's cores with Redis and the loadgen; per
# configuration: p2p peak, group peak, then p2p and group at fixed rates every
# configuration sustains (P2P_RATE, GROUP_RATE), for latency.
# Part 2, fan-out: FAN_NODES nodes (--shards 1), FAN_GROUPS groups of 100 members of
# which 1, 2, 5, 10 or 100 are online, spread round robin over the nodes; how many
# channel messages (nodes x shards subscribed) each group message costs, from the
# nodes' /metrics, against FAN_NODES for an all-node broadcast. Then FAN2_NODES nodes
# with 2 shards each, 100 online: one message per subscribed shard.
#
# The three configurations run in turn, ROUNDS times (the box is shared: compare within
# a round, quote the range). Knobs (env): ROUNDS (3), REDIS_PORT (16480), BASE (19180: node i serves WebSocket on BASE+i and
# its node link on BASE+100+i), DUR (10s), P2P_RATE (5000), GROUP_RATE (400 sends/s,
# x99 deliveries), FAN_NODES (10), FAN2_NODES (5), FAN_GROUPS (10), FAN_RATE (100
# sends/s), SKIP_THROUGHPUT=1 / SKIP_FANOUT=1. `fwd/msg` in the fan-out table: node
# requests forwarded per stored message (the send, and one row update per node owning
# a member's rows, online or not).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/perf-cluster}
REDIS_PORT=${REDIS_PORT:-16480}
BASE=${BASE:-19180}
DUR=${DUR:-10s}
ROUNDS=${ROUNDS:-3}
P2P_RATE=${P2P_RATE:-5000}
GROUP_RATE=${GROUP_RATE:-400}
FAN_NODES=${FAN_NODES:-10}
FAN2_NODES=${FAN2_NODES:-5}
FAN_GROUPS=${FAN_GROUPS:-10}
FAN_RATE=${FAN_RATE:-100}
SECRET=cluster-numbers-secret-0123456789
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cargo build --release -q -p imshard -p imshard-loadgen
SERVER=$PWD/target/release/imshard
LOADGEN=$PWD/target/release/imshard-loadgen
command -v redis-server >/dev/null || { echo "redis-server is not installed (apt-get install -y redis-server)" >&2; exit 2; }

REDIS_PID=
NODES=0
NODE_PIDS=()
TARGETS=

stop_nodes() {
  local p
  for p in "${NODE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${NODE_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  NODE_PIDS=()
  TARGETS=
}
stop_redis() {
  if [ -n "$REDIS_PID" ]; then
    kill "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
  fi
  REDIS_PID=
}
stop_all() { stop_nodes; stop_redis; }
trap stop_all EXIT

start_redis() {
  rm -rf "$OUT/redis"
  mkdir -p "$OUT/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$OUT/redis" --save '' \
    --appendonly yes --appendfsync always --daemonize no --logfile "$OUT/redis/log" &
  REDIS_PID=$!
  for _ in $(seq 100); do
    redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && return 0
    sleep 0.1
  done
  echo "redis-server did not come up" >&2
  exit 1
}

# The sum of a metric over the shards of the node serving on port $1.
metric() {
  curl -fs "http://127.0.0.1:$1/metrics" 2>/dev/null |
    awk -v m="$2" '$1 ~ "^"m"(\\{|$)" { s += $2 } END { print s + 0 }'
}

# start_nodes N SHARDS CLUSTER(0|1): N nodes on the running Redis.
start_nodes() {
  local n=$1 shards=$2 cluster=$3 i port
  NODES=$n
  for i in $(seq 0 $((n - 1))); do
    port=$((BASE + i))
    rm -rf "$OUT/data-$i"
    local extra=()
    if [ "$cluster" = 1 ]; then
      extra=(--node-id "n$((i + 1))" --node-listen "127.0.0.1:$((BASE + 100 + i))")
    fi
    "$SERVER" serve --listen "127.0.0.1:$port" --shards "$shards" \
      --store redis --redis-url "redis://127.0.0.1:$REDIS_PORT/0" "${extra[@]}" \
      --data-dir "$OUT/data-$i" --jwt-secret "$SECRET" --rate-limit 0 --log warn &
    NODE_PIDS+=($!)
    TARGETS="${TARGETS:+$TARGETS,}127.0.0.1:$port"
  done
  # Up, and in cluster mode formed: every shard sees n nodes and holds the lease.
  local deadline=$((SECONDS + 60)) ok
  while :; do
    ok=1
    for i in $(seq 0 $((n - 1))); do
      port=$((BASE + i))
      curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 || { ok=0; break; }
      if [ "$cluster" = 1 ]; then
        [ "$(metric "$port" imshard_cluster_nodes)" = $((n * shards)) ] || { ok=0; break; }
        [ "$(metric "$port" imshard_cluster_active)" = "$shards" ] || { ok=0; break; }
      fi
    done
    [ "$ok" = 1 ] && return 0
    [ $SECONDS -lt $deadline ] || { echo "the nodes did not come up / form a cluster" >&2; exit 1; }
    sleep 0.2
  done
}

pids_csv() { local IFS=,; echo "${NODE_PIDS[*]}"; }
redis_ticks() { awk '{ print $14 + $15 }' "/proc/$REDIS_PID/stat"; }

# lg NAME SCENARIO ARGS...: one loadgen run against $TARGETS; JSON in $OUT/NAME.json,
# Redis CPU seconds over the run in $OUT/NAME.redis-cpu. A failed check is reported,
# not fatal (the run's JSON says what failed).
lg() {
  local name=$1 scenario=$2
  shift 2
  local before after
  echo "$name: $(uptime)" >>"$OUT/load-average.txt"
  before=$(redis_ticks)
  "$LOADGEN" "$scenario" --target "$TARGETS" --jwt-secret "$SECRET" --server-shards "$SHARDS" \
    --server-pid "$(pids_csv)" --json "$OUT/$name.json" "$@" | tee "$OUT/$name.txt" ||
    echo "!! $name: the loadgen reported failures (see $OUT/$name.txt)"
  after=$(redis_ticks)
  echo "$NODES $SHARDS" >"$OUT/$name.meta"
  awk -v a="$after" -v b="$before" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f\n", (a - b) / hz }' \
    >"$OUT/$name.redis-cpu"
}

if [ "${SKIP_THROUGHPUT:-0}" != 1 ]; then
  SHARDS=1
  for round in $(seq "$ROUNDS"); do
  for conf in ref one three; do
    case $conf in
      ref) N=1 CL=0 ;;
      one) N=1 CL=1 ;;
      three) N=3 CL=1 ;;
    esac
    echo "== round $round, $conf: $N node(s), cluster mode $CL"
    start_redis
    start_nodes "$N" 1 "$CL"
    lg "$conf-p2p-peak-r$round" p2p --pairs 100 --rate 0 --window 16 --duration "$DUR"
    lg "$conf-group-peak-r$round" group --groups 20 --members 100 --senders 2 --rate 0 \
      --window 8 --duration "$DUR" --cpu-per-delivery
    lg "$conf-p2p-fixed-r$round" p2p --pairs 100 --rate "$P2P_RATE" --window 16 --duration "$DUR"
    lg "$conf-group-fixed-r$round" group --groups 20 --members 100 --senders 2 \
      --rate "$GROUP_RATE" --window 8 --duration "$DUR" --cpu-per-delivery
    stop_nodes
    stop_redis
  done
  done
fi

if [ "${SKIP_FANOUT:-0}" != 1 ]; then
  SHARDS=1
  echo "== fan-out: $FAN_NODES nodes x 1 shard, groups of 100 members, some online"
  start_redis
  start_nodes "$FAN_NODES" 1 1
  for online in 1 2 5 10 100; do
    lg "fan-$FAN_NODES-online-$online" group --groups "$FAN_GROUPS" --members 100 \
      --online "$online" --senders 1 --rate "$FAN_RATE" --window 8 --duration "$DUR"
  done
  stop_nodes
  SHARDS=2
  echo "== fan-out: $FAN2_NODES nodes x 2 shards, 100 online"
  start_nodes "$FAN2_NODES" 2 1
  lg "fan2-$FAN2_NODES-online-100" group --groups "$FAN_GROUPS" --members 100 --senders 1 \
    --rate "$FAN_RATE" --window 8 --duration "$DUR"
  stop_nodes
  stop_redis
fi

python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name + ".json")
    if not os.path.exists(p):
        return None
    j = json.load(open(p))
    cpu = os.path.join(out, name + ".redis-cpu")
    j["redis_cpu"] = open(cpu).read().strip() if os.path.exists(cpu) else "?"
    return j
def ms(us): return "%.1f" % (us / 1000.0) if us is not None else "-"
print("\n%-22s %9s %9s %8s %8s %6s %7s %8s %s" % ("run", "acked/s", "deliv/s", "p50 ms", "p99 ms", "pass",
      "redis s", "srv us/d", "lost/dup"))
for kind in ["p2p-peak", "group-peak", "p2p-fixed", "group-fixed"]:
    for r in range(1, 100):
        found = False
        for conf in ["ref", "one", "three"]:
            name = "%s-%s-r%d" % (conf, kind, r)
            j = load(name)
            if not j: continue
            found = True
            lat = j["deliveries"]["push_latency"]
            cpu = j["server"].get("cpu_us_per_delivery")
            print("%-22s %9.0f %9.0f %8s %8s %6s %7s %8s %d/%d" % (name, j["sends"]["acked_per_sec"],
                  j["deliveries"]["per_sec"], ms(lat.get("p50_us")), ms(lat.get("p99_us")), j["passed"],
                  j["redis_cpu"], "%.2f" % cpu if cpu else "-", j["check"]["lost"], j["check"]["duplicated"]))
        if not found: break
print("\n%-22s %6s %9s %12s %11s %10s %8s %s" % ("fan-out run", "online", "publishes", "channel msgs", "per publish",
      "broadcast", "fwd/msg", "pass"))
def key(n):
    parts = n[:-5].split("-")
    return (parts[0], int(parts[1]), int(parts[-1]))
for name in sorted((n for n in os.listdir(out) if n.startswith("fan") and n.endswith(".json")), key=key):
    j = load(name[:-5]); c = j.get("cluster") or {}
    nodes, shards = open(os.path.join(out, name[:-5] + ".meta")).read().split()
    per = c.get("channel_messages_per_publish")
    fwd = c["requests_forwarded"] / c["messages_stored"] if c.get("messages_stored") else None
    print("%-22s %6s %9s %12s %11s %10s %8s %s" % (name[:-5], j["params"].get("online", j["params"]["members"]),
          c.get("publishes"), c.get("channel_messages"), "%.2f" % per if per is not None else "-",
          "%s x %s" % (nodes, shards), "%.1f" % fwd if fwd is not None else "-", j["passed"]))
print("\nreports in", out)
EOF
