#!/usr/bin/env bash
# Replication cost: 4k random writes at QD32 on a repl=3 volume (three engines on one etcd,
# each on its own file-backed pool, replicas over loopback TCP) against a repl=1 volume on the
# same engine, in the same run. Prints IOPS, p50/p99 latency, the engines' CPU per write (all
# three engines' user + system time over the run, from /proc, ÷ writes) and the ratios,
# and writes JSON to BENCH_OUT (default bench/out-repl).
#
# Environment: BENCH_TLS (1, the default: replication over mutual TLS; 0: plaintext),
# BENCH_RUNTIME (seconds per run, default 15), BENCH_DIR (default
# /var/tmp/strata-bench-repl), BENCH_BACKING: `file` (default: pool files on BENCH_DIR's
# filesystem) or `memory` (pool files in /dev/shm: the software cost alone).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNTIME=${BENCH_RUNTIME:-15}
OUT=${BENCH_OUT:-$ROOT/bench/out-repl}
case "${BENCH_BACKING:-file}" in
  file) DIR=${BENCH_DIR:-/var/tmp/strata-bench-repl} ;;
  memory) DIR=/dev/shm/strata-bench-repl ;;
  *) echo "BENCH_BACKING must be file or memory" >&2; exit 2 ;;
esac
./scripts/deps.sh
cargo build --release -p strata-engine -p stratactl
BIN=$ROOT/target/release
rm -rf "$DIR"; mkdir -p "$DIR" "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT

# Replication is mutual TLS, as in production; BENCH_TLS=0 measures plaintext for the ratio.
TLS=${BENCH_TLS:-1}
. "$ROOT/bench/cluster.sh"
start_cluster 23790 3 3GiB
"$BIN/stratactl" --endpoint "$SDK" volume create r1 --size 1GiB --repl 1 >/dev/null
"$BIN/stratactl" --endpoint "$SDK" volume create r3 --size 1GiB --repl 3 >/dev/null
"$BIN/stratactl" --endpoint "$SDK" volume inspect r3

run() { # volume
  local uri="nbd+unix:///$1?socket=$DIR/n1/nbd.sock"
  fio --name=prefill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size=1G --output=/dev/null
  # No ramp time: the engines' CPU is counted over the whole run, so every write must be too.
  local c0; c0=$(engines_cpu)
  fio --name="$1" --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 --size=1G \
      --time_based --runtime="$RUNTIME" --output-format=json --output="$OUT/$1.json"
  python3 -c "print($(engines_cpu) - $c0)" >"$OUT/$1.cpu"
}
# Alternate, so drift on a noisy machine hits both.
run r1; run r3
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def load(n):
    j = json.load(open(f"{out}/{n}.json"))["jobs"][0]["write"]
    p = j["clat_ns"]["percentile"]
    cpu = float(open(f"{out}/{n}.cpu").read())
    return {"iops": j["iops"], "p50_us": p["50.000000"] / 1000, "p99_us": p["99.000000"] / 1000,
            "cpu_us_per_write": cpu * 1e6 / j["total_ios"]}
r1, r3 = load("r1"), load("r3")
res = {"repl1": r1, "repl3": r3, "iops_ratio": r3["iops"] / r1["iops"], "p99_ratio": r3["p99_us"] / r1["p99_us"]}
json.dump(res, open(f"{out}/summary.json", "w"), indent=2)
print(f"{'volume':8} {'IOPS':>10} {'p50 us':>9} {'p99 us':>9} {'engine CPU us/write':>20}")
for n, r in (("repl=1", r1), ("repl=3", r3)):
    print(f"{n:8} {r['iops']:10.0f} {r['p50_us']:9.0f} {r['p99_us']:9.0f} {r['cpu_us_per_write']:20.1f}")
print(f"repl=3 / repl=1: IOPS {res['iops_ratio']:.2f}x (target >= 0.70), p99 {res['p99_ratio']:.2f}x (target <= 2.00)")
PY
