#!/usr/bin/env bash
# Embedded store vs --store redis, back to back on this host: the README's
# "Performance" rows for Redis. Each run gets a fresh server (2 shards, --rate-limit 0)
# and, on Redis, a fresh redis-server with `--appendonly yes --appendfsync always` on
# a loopback port of its own; both are stopped by PID. Runs alternate
# (embedded, redis, [redis with a second binary]) CYCLES times per scenario.
#
#   benches/redis_vs_embedded.sh [SERVER_BIN] [BEFORE_BIN]
#
# SERVER_BIN (default target/release/imshard) runs embedded and redis; BEFORE_BIN, if
# given, runs redis too (e.g. a build of main, to compare before/after). Knobs (env):
# CYCLES (3), DUR (10s), PORT (18480), RPORT (16400), OUT (target/perf/redis),
# REDIS_ARGS (extra redis-server arguments, e.g. "--auto-aof-rewrite-min-size 4gb").
# Prints one line per run (acked sends/s; for group also deliveries/s); JSON in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
NEW=${1:-target/release/imshard}
OLD=${2:-}
CYCLES=${CYCLES:-3}
DUR=${DUR:-10s}
PORT=${PORT:-18480}
RPORT=${RPORT:-16400}
OUT=${OUT:-target/perf/redis}
LOADGEN=${LOADGEN:-target/release/imshard-loadgen}
S=redis-vs-embedded-secret-0123456789
mkdir -p "$OUT"
[ -x "$LOADGEN" ] || cargo build --release -q -p imshard-loadgen
SPID= RPID= TMP=
cleanup() {
  [ -n "$SPID" ] && kill "$SPID" 2>/dev/null && wait "$SPID" 2>/dev/null
  [ -n "$RPID" ] && kill "$RPID" 2>/dev/null && wait "$RPID" 2>/dev/null
  [ -n "$TMP" ] && rm -rf "$TMP"
  SPID= RPID= TMP=
}
trap cleanup EXIT

run() { # BIN STORE SCENARIO TAG
  local bin=$1 store=$2 scen=$3 tag=$4 extra=()
  TMP=$(mktemp -d)
  if [ "$store" = redis ]; then
    redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly yes \
      --appendfsync always --dir "$TMP" ${REDIS_ARGS:-} >"$TMP/redis.log" 2>&1 &
    RPID=$!
    for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    extra=(--store redis --redis-url "redis://127.0.0.1:$RPORT/0")
  fi
  "$bin" serve --shards 2 --rate-limit 0 --listen "127.0.0.1:$PORT" --jwt-secret "$S" \
    --data-dir "$TMP/data" --log warn "${extra[@]}" >"$TMP/server.log" 2>&1 &
  SPID=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
  local json="$OUT/$tag-$store-$scen.json" args=()
  if [ "$scen" = p2p ]; then
    args=(p2p --pairs 100 --rate 0 --window 16)
  else
    args=(group --groups 20 --members 100 --senders 2 --rate 0 --window 8)
  fi
  "$LOADGEN" "${args[@]}" --target "127.0.0.1:$PORT" --jwt-secret "$S" --server-shards 2 \
    --duration "$DUR" --server-pid "$SPID" --json "$json" >"$json.txt" 2>&1 || true
  echo "$tag $store $scen: $(grep -E '^  (sends|deliveries|failures)' "$json.txt" | tr -s ' ' | tr '\n' ' ')"
  cleanup
}

for scen in p2p group; do
  for c in $(seq "$CYCLES"); do
    run "$NEW" embedded "$scen" "c$c"
    [ -n "$OLD" ] && run "$OLD" redis "$scen" "c$c-before"
    run "$NEW" redis "$scen" "c$c"
  done
done
