#!/usr/bin/env bash
# Reproduces the README's "Performance" numbers on this host: builds release binaries,
# starts a fresh server per scenario on a loopback port, runs the loadgen, keeps every
# JSON report in $OUT, and stops the server by PID.
#
#   loadgen/readme-numbers.sh [OUT_DIR]     (default: target/perf)
#
# Knobs (env): SHARDS (2), CONNS (19000: the 20,000 open-files cap of our boxes), DUR
# (20s), PORT (19080). Server and loadgen share the host's cores unless PIN=1, which
# runs the server with one shard on cpu 0 and the loadgen on cpu 1. The server is asked
# for --max-connections $CONNS: 19,000 is more than its default (the open-files limit
# minus 1,024) on a box capped at 20,000, so it warns at start; the run still fits.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/perf}
SHARDS=${SHARDS:-2}
CONNS=${CONNS:-19000}
DUR=${DUR:-20s}
PORT=${PORT:-19080}
PIN=${PIN:-0}
SECRET=readme-numbers-secret-0123456789
mkdir -p "$OUT"
cargo build --release -q -p imshard -p imshard-loadgen
SERVER=target/release/imshard
LOADGEN=target/release/imshard-loadgen
SRV_PIN=() LG_PIN=()
if [ "$PIN" = 1 ]; then SHARDS=1 SRV_PIN=(taskset -c 0) LG_PIN=(taskset -c 1); fi
PID=

start() {
  rm -rf "$OUT/data"
  "${SRV_PIN[@]}" "$SERVER" serve --listen "127.0.0.1:$PORT" --shards "$SHARDS" \
    --data-dir "$OUT/data" --jwt-secret "$SECRET" --rate-limit 0 --log warn \
    --max-connections "$CONNS" &
  PID=$!
  for _ in $(seq 50); do
    curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server did not come up" >&2
  exit 1
}
stop() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; PID=; }
trap stop EXIT

lg() { "${LG_PIN[@]}" "$LOADGEN" "$@" --target "127.0.0.1:$PORT" --jwt-secret "$SECRET" \
  --server-shards "$SHARDS" --server-pid "$PID"; }

# The rate (sends/s) a peak run reached, from its JSON.
peak_rate() { python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["sends"]["acked_per_sec"]))' "$1"; }

echo "== connect: $CONNS idle connections"
start; lg connect --connections "$CONNS" --rate 5000 --duration 25s --json "$OUT/connect.json"; stop

echo "== p2p: peak durable sends/s"
start; lg p2p --pairs 100 --rate 0 --window 16 --duration "$DUR" --json "$OUT/p2p-peak.json"; stop
HALF=$(( $(peak_rate "$OUT/p2p-peak.json") / 2 ))
echo "== p2p: half of the peak, $HALF sends/s"
start; lg p2p --pairs 100 --rate "$HALF" --window 16 --duration "$DUR" --json "$OUT/p2p-half.json"; stop
QUARTER=$(( HALF / 2 ))
echo "== p2p: a quarter of the peak, $QUARTER sends/s"
start; lg p2p --pairs 100 --rate "$QUARTER" --window 16 --duration "$DUR" --json "$OUT/p2p-quarter.json"; stop

echo "== group: 100-member groups, peak deliveries/s"
start; lg group --groups 20 --members 100 --senders 2 --rate 0 --window 8 --duration "$DUR" \
  --json "$OUT/group-peak.json"; stop
GHALF=$(( $(peak_rate "$OUT/group-peak.json") / 2 ))
echo "== group: half of the peak, $GHALF sends/s"
start; lg group --groups 20 --members 100 --senders 2 --rate "$GHALF" --window 8 --duration "$DUR" \
  --json "$OUT/group-half.json"; stop
echo "reports in $OUT"
