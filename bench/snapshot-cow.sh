#!/usr/bin/env bash
# Snapshot cost: 4k random writes at QD32 over a 512 MiB region of one volume on one engine
# (embedded store, file-backed pool), measured three times in one run: before any snapshot
# (extents private), right after a snapshot (the first write to each 1 MiB extent copies it),
# and again (every extent private again). Prints IOPS and p99 and the ratios to the first run;
# writes JSON to BENCH_OUT (default bench/out-snap).
#
# Environment: BENCH_RUNTIME (seconds per run, default 10), BENCH_DIR (default /var/tmp/strata-bench-snap).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNTIME=${BENCH_RUNTIME:-10}
OUT=${BENCH_OUT:-$ROOT/bench/out-snap}
DIR=${BENCH_DIR:-/var/tmp/strata-bench-snap}
./scripts/deps.sh
cargo build --release -p strata-engine -p stratactl
BIN=$ROOT/target/release
rm -rf "$DIR"; mkdir -p "$DIR" "$OUT"
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
"$BIN/strata-engine" --data-dir "$DIR/data" --device "$DIR/pool.img" --device-size 3GiB \
  --nbd-listen 127.0.0.1:0 --sdk-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  --nbd-socket "$DIR/nbd.sock" --ready-file "$DIR/ready.json" 2>"$DIR/engine.log" &
PID=$!
for _ in $(seq 200); do [ -f "$DIR/ready.json" ] && break; sleep 0.05; done
SDK=$(python3 -c "import json;print(json.load(open('$DIR/ready.json'))['sdk'])")
CTL=("$BIN/stratactl" --endpoint "$SDK")
"${CTL[@]}" volume create v --size 1GiB >/dev/null
URI="nbd+unix:///v?socket=$DIR/nbd.sock"
fio --name=prefill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 --size=512M --output=/dev/null
run() { # name: random 4k writes over the first 512 MiB, no ramp (the copies happen early)
  fio --name="$1" --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=32 --size=512M \
      --time_based --runtime="$RUNTIME" --output-format=json --output="$OUT/$1.json"
}
run private
"${CTL[@]}" volume snapshot create v --name s >/dev/null
run after-snapshot
run copied
"${CTL[@]}" --json service pool show > "$OUT/pool.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def load(n):
    j = json.load(open(f"{out}/{n}.json"))["jobs"][0]["write"]
    p = j["clat_ns"]["percentile"]
    return {"iops": j["iops"], "p99_us": p["99.000000"] / 1000}
r = {n: load(n) for n in ("private", "after-snapshot", "copied")}
base = r["private"]
res = {"runs": r, "after_snapshot_iops_ratio": r["after-snapshot"]["iops"] / base["iops"],
       "after_snapshot_p99_ratio": r["after-snapshot"]["p99_us"] / base["p99_us"],
       "copied_iops_ratio": r["copied"]["iops"] / base["iops"]}
json.dump(res, open(f"{out}/summary.json", "w"), indent=2)
print(f"{'run':16} {'IOPS':>10} {'p99 us':>9}")
for n, x in r.items():
    print(f"{n:16} {x['iops']:10.0f} {x['p99_us']:9.0f}")
print(f"after a snapshot / before: IOPS {res['after_snapshot_iops_ratio']:.2f}x, p99 {res['after_snapshot_p99_ratio']:.2f}x; once copied: IOPS {res['copied_iops_ratio']:.2f}x")
PY
