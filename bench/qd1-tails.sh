#!/usr/bin/env bash
# QD1 write latency tails, interleaved: 4k random writes at queue depth 1 against the raw file
# (fio io_uring, O_DIRECT), `nbdkit file cache=none`, `qemu-nbd --cache=none --aio=io_uring` and
# a Strata repl=1 volume (fio's nbd engine on the unix socket), each on its own 1 GiB file on the
# same filesystem, written through first. BENCH_ROUNDS rounds of BENCH_RUNTIME seconds per
# target, in turn, so the virtual disk's periodic stalls (bursts of ~50 ms that every client sees)
# fall on all four alike; prints each round's p50/p99/p99.9 and the median over rounds, and JSON
# to BENCH_OUT.
#
# The two peers differ in when they reply: nbdkit's cache=none writes into the page cache, starts
# the writeback and replies before the disk has the data (it waits only for older writes), while
# qemu-nbd with cache=none writes O_DIRECT and replies when the disk has completed the write, as
# Strata does (a write is acknowledged only once the device has it).
#
# Environment: BENCH_ROUNDS (default 5), BENCH_RUNTIME (default 8), BENCH_DIR (default
# /var/tmp/strata-bench-qd1), BENCH_OUT (default bench/out-qd1).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${BENCH_ROUNDS:-5}
RUNTIME=${BENCH_RUNTIME:-8}
DIR=${BENCH_DIR:-/var/tmp/strata-bench-qd1}
OUT=${BENCH_OUT:-$ROOT/bench/out-qd1}
./scripts/deps.sh
cargo build --release -p strata-engine -p stratactl
BIN=$ROOT/target/release
rm -rf "$DIR" "$OUT"; mkdir -p "$DIR" "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
wait_for() { for _ in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done; echo "no $1" >&2; return 1; }

fallocate -l 1GiB "$DIR/raw.img"
fallocate -l 1GiB "$DIR/nbdkit.img"
fallocate -l 1GiB "$DIR/qemu.img"
nbdkit --unix "$DIR/nbdkit.sock" --foreground --exit-with-parent file "$DIR/nbdkit.img" cache=none &
PIDS+=($!)
qemu-nbd --persistent --format=raw --cache=none --aio=io_uring --socket="$DIR/qemu.sock" "$DIR/qemu.img" &
PIDS+=($!)
"$BIN/strata-engine" --data-dir "$DIR/data" --device "$DIR/pool.img" --device-size 2GiB \
  --nbd-listen 127.0.0.1:0 --sdk-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --repl-listen 127.0.0.1:0 \
  --nbd-socket "$DIR/strata.sock" --ready-file "$DIR/ready.json" 2>"$DIR/engine.log" &
PIDS+=($!)
wait_for "$DIR/nbdkit.sock"; wait_for "$DIR/qemu.sock"; wait_for "$DIR/ready.json"
SDK=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sdk"])' "$DIR/ready.json")
"$BIN/stratactl" --endpoint "$SDK" volume create qd1 --size 1GiB >/dev/null

TARGETS=(raw nbdkit qemu strata)
args() {
  case $1 in
    raw) echo "--ioengine=io_uring --direct=1 --filename=$DIR/raw.img" ;;
    nbdkit) echo "--ioengine=nbd --uri=nbd+unix:///?socket=$DIR/nbdkit.sock" ;;
    qemu) echo "--ioengine=nbd --uri=nbd+unix:///?socket=$DIR/qemu.sock" ;;
    strata) echo "--ioengine=nbd --uri=nbd+unix:///qd1?socket=$DIR/strata.sock" ;;
  esac
}
for t in "${TARGETS[@]}"; do
  # shellcheck disable=SC2046
  fio --name=prefill $(args "$t") --rw=write --bs=1M --iodepth=8 --size=1G --output=/dev/null
done
for r in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    # shellcheck disable=SC2046
    fio --name="$t" $(args "$t") --rw=randwrite --bs=4k --iodepth=1 --size=1G --time_based --runtime="$RUNTIME" \
      --output-format=json --output="$OUT/$t.$r.json"
  done
done
python3 - "$OUT" "$ROUNDS" "${TARGETS[@]}" <<'PY'
import json, statistics, sys
out, rounds, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
keys = {"p50": "50.000000", "p99": "99.000000", "p99.9": "99.900000"}
res = {}
print(f"{'target':8} {'round':>5} {'IOPS':>7} " + " ".join(f"{k + ' us':>9}" for k in keys))
for t in targets:
    rows = []
    for r in range(1, rounds + 1):
        w = json.load(open(f"{out}/{t}.{r}.json"))["jobs"][0]["write"]
        p = w["clat_ns"]["percentile"]
        row = {"iops": w["iops"], **{k: p[v] / 1000 for k, v in keys.items()}}
        rows.append(row)
        print(f"{t:8} {r:5} {row['iops']:7.0f} " + " ".join(f"{row[k]:9.0f}" for k in keys))
    res[t] = {"rounds": rows, "median": {k: statistics.median(x[k] for x in rows) for k in ["iops", *keys]}}
print()
for t in targets:
    m = res[t]["median"]
    print(f"{t:8} median {m['iops']:7.0f} " + " ".join(f"{m[k]:9.0f}" for k in keys))
s = res["strata"]["median"]
print()
for peer, note in [("nbdkit", "replies before the disk completes"), ("qemu", "replies on completion, like Strata")]:
    n = res[peer]["median"]
    print(f"Strata / {peer} ({note}), medians: p50 {s['p50'] / n['p50']:.2f}x, p99 {s['p99'] / n['p99']:.2f}x, p99.9 {s['p99.9'] / n['p99.9']:.2f}x")
json.dump(res, open(f"{out}/summary.json", "w"), indent=1)
PY
