#!/usr/bin/env bash
# Instructions per operation on the hot paths, counted by valgrind's callgrind (repeatable on a
# noisy machine, unlike time): three engines on one etcd, each under callgrind; a repl=1 volume
# on node-1 and a repl=3 volume; BENCH_IOS (default 2000) 4k random writes at QD1 through
# node-1's NBD socket on each. Counters are zeroed before and dumped after each run, so only
# that run counts (background tasks in the window included). Reports, per write: node-1 for the
# repl=1 volume (NBD write), node-1 for the repl=3 volume (replicated write at the target),
# and the mean of node-2 and node-3 (replica apply). JSON to BENCH_OUT.
#
# Environment: BENCH_IOS, BENCH_TLS (1, the default: replication over mutual TLS; 0: plaintext),
# BENCH_DIR (default /var/tmp/strata-bench-callgrind), BENCH_OUT (default bench/out-callgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
IOS=${BENCH_IOS:-2000}
OUT=${BENCH_OUT:-$ROOT/bench/out-callgrind}
DIR=${BENCH_DIR:-/var/tmp/strata-bench-callgrind}
./scripts/deps.sh
command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
cargo build --release -p strata-engine -p stratactl
BIN=$ROOT/target/release
rm -rf "$DIR" "$OUT"; mkdir -p "$DIR" "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
TLS=${BENCH_TLS:-1}
ENGINE_WRAP=(valgrind --tool=callgrind "--callgrind-out-file=$DIR/cg.%p")
. "$ROOT/bench/cluster.sh"
start_cluster 23590 3 1GiB
CTL=("$BIN/stratactl" --endpoint "$SDK")
"${CTL[@]}" volume create r1 --size 64MiB --repl 1 --nodes node-1 >/dev/null
"${CTL[@]}" volume create r3 --size 64MiB --repl 3 >/dev/null
totals() { # pid dump-number → instructions in that dump
  awk '/^(summary|totals):/ {print $2; exit}' "$DIR/cg.$1.$2"
}
dumps=0
measure() { # volume
  local uri="nbd+unix:///$1?socket=$DIR/n1/nbd.sock" p
  fio --name=prefill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --size=16M --output=/dev/null
  for p in "${ENGINE_PIDS[@]}"; do callgrind_control -z "$p" >/dev/null 2>&1; done
  fio --name="$1" --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --size=16M --iodepth=1 --number_ios="$IOS" --output=/dev/null
  for p in "${ENGINE_PIDS[@]}"; do callgrind_control -d "$p" >/dev/null 2>&1; done
  dumps=$((dumps + 1))
  sleep 1
  for p in "${ENGINE_PIDS[@]}"; do totals "$p" "$dumps"; done >"$OUT/$1.ir"
}
measure r1
measure r3
python3 - "$OUT" "$IOS" <<'PY'
import json, sys
out, ios = sys.argv[1], int(sys.argv[2])
r1 = [int(x) for x in open(f"{out}/r1.ir").read().split()]
r3 = [int(x) for x in open(f"{out}/r3.ir").read().split()]
res = {
    "nbd_write_repl1": round(r1[0] / ios),
    "replicated_write_target": round(r3[0] / ios),
    "replica_apply": round((r3[1] + r3[2]) / 2 / ios),
    "all_engines_repl3": round(sum(r3) / ios),
}
json.dump(res, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(res))
PY
