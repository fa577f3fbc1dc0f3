#!/usr/bin/env bash
# The control plane at scale, simulated (issue #19): BENCH_NODES node identities (default
# 1000) and BENCH_VOLUMES volume records (default 100000) against one real etcd on this
# machine's disk, no data path (storage-engine/examples/controlplane.rs). Prints and writes
# JSON: placement decision times at 0/25/50/100% of the volumes, etcd writes per volume create,
# attach and delete, heartbeat writes per node per second, etcd's size, a full listing's time
# (one read, and pages of 1,000), then `stratactl volume list` through one real engine's SDK.
#
# Environment: BENCH_NODES, BENCH_VOLUMES, BENCH_HEARTBEAT (seconds watched, default 30),
# BENCH_DIR (default /var/tmp/strata-bench-controlplane), BENCH_OUT (default bench/out-controlplane).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${BENCH_DIR:-/var/tmp/strata-bench-controlplane}
OUT=${BENCH_OUT:-$ROOT/bench/out-controlplane}
./scripts/deps.sh
cargo build --release -p strata-engine -p stratactl --bins --example controlplane
rm -rf "$DIR" "$OUT"; mkdir -p "$DIR" "$OUT"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
PORT=24379
etcd --data-dir "$DIR/etcd" --listen-client-urls "http://127.0.0.1:$PORT" --advertise-client-urls "http://127.0.0.1:$PORT" \
  --listen-peer-urls http://127.0.0.1:24380 --quota-backend-bytes $((8 << 30)) >"$DIR/etcd.log" 2>&1 &
ETCD=$!
trap 'kill $ETCD 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
"$ROOT/target/release/examples/controlplane" "http://127.0.0.1:$PORT" "${BENCH_NODES:-1000}" "${BENCH_VOLUMES:-100000}" "${BENCH_HEARTBEAT:-30}" | tee "$OUT/summary.json"

# `stratactl volume list` at that size, through a real engine's SDK (pages of 1,000): one engine
# joins the cluster on a small file-backed pool, then the listing is timed as a user sees it.
mkdir -p "$DIR/engine"
"$ROOT/target/release/strata-engine" --etcd "http://127.0.0.1:$PORT" --node-id bench-sdk --data-dir "$DIR/engine/data" \
  --device "$DIR/engine/pool.img" --device-size 1GiB --nbd-listen 127.0.0.1:0 --sdk-listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --repl-listen 127.0.0.1:0 --ready-file "$DIR/engine/ready.json" 2>"$DIR/engine/engine.log" &
ENGINE=$!
trap 'kill $ENGINE $ETCD 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 1200); do [ -f "$DIR/engine/ready.json" ] && break; sleep 0.05; done
[ -f "$DIR/engine/ready.json" ] || { echo "the engine did not start within 60 s; its log:" >&2; tail -20 "$DIR/engine/engine.log" >&2; exit 1; }
SDK=$(python3 -c "import json;print(json.load(open('$DIR/engine/ready.json'))['sdk'])")
for fmt in table json; do
  args=(); [ $fmt = json ] && args=(--json)
  t0=$(date +%s.%N)
  n=$("$ROOT/target/release/stratactl" --endpoint "$SDK" volume list "${args[@]}" | wc -l)
  t1=$(date +%s.%N)
  python3 -c "print(f'stratactl volume list ($fmt): {$t1 - $t0:.2f} s, {$n} lines')" | tee -a "$OUT/stratactl-list.txt"
done
