#!/usr/bin/env bash
# One run, one 2 GiB backing file, five fio workloads against:
#   raw (io_uring, O_DIRECT) | nbdkit null (no storage: the NBD client's ceiling) |
#   nbdkit file cache=none | qemu-nbd --cache=none --aio=io_uring |
#   Strata repl=1 over a unix socket | Strata over TCP loopback.
# Prints a table (IOPS, MiB/s, p50/p99 latency, fio's own CPU per I/O, ratio to nbdkit and to
# raw) and writes JSON. nbdkit's null plugin discards writes and reads zeroes, so against it fio
# measures what the NBD client and the socket alone allow on this machine: no NBD server that
# stores data can beat it, and on a small machine the client's CPU competes with the server's.
# Then measures an idle engine with 10 volumes, each with a connected NBD client.
#
# Environment: BENCH_RUNTIME (seconds per workload, default 15), BENCH_DIR (default
# /var/tmp/strata-bench), BENCH_IDLE_SECONDS (default 60), BENCH_OUT (default bench/out),
# BENCH_BACKING: `file` (default: a 2 GiB file on BENCH_DIR's filesystem) or `memory` (a loop
# device over a 2 GiB file in /dev/shm: no disk noise, so the figures are software overhead).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNTIME=${BENCH_RUNTIME:-15}
IDLE=${BENCH_IDLE_SECONDS:-60}
DIR=${BENCH_DIR:-/var/tmp/strata-bench}
OUT=${BENCH_OUT:-$ROOT/bench/out}
./scripts/deps.sh
cargo build --release -p strata-engine -p stratactl
BIN=$ROOT/target/release
rm -rf "$DIR"; mkdir -p "$DIR" "$OUT"
SIZE=1900M   # the region every target exercises (fits in a Strata pool on the 2 GiB file)
PIDS=()
LOOPDEV=""
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  if [ -n "$LOOPDEV" ]; then losetup -d "$LOOPDEV" || true; rm -f /dev/shm/strata-bench.img; fi
}
trap cleanup EXIT
case "${BENCH_BACKING:-file}" in
  file) FILE=$DIR/backing.img; truncate -s 2G "$FILE" ;;
  memory) truncate -s 2G /dev/shm/strata-bench.img; LOOPDEV=$(losetup -f --show /dev/shm/strata-bench.img); FILE=$LOOPDEV ;;
  *) echo "BENCH_BACKING must be file or memory" >&2; exit 2 ;;
esac
echo "backing: $FILE"
mkdir -p "$OUT"; echo "{\"backing\": \"${BENCH_BACKING:-file}\", \"runtime_s\": $RUNTIME}" > "$OUT/meta.json"

# workload name, fio args
WORKLOADS=(
  "randwrite-4k-qd32|--rw=randwrite --bs=4k --iodepth=32"
  "randread-4k-qd32|--rw=randread --bs=4k --iodepth=32"
  "write-1m-qd8|--rw=write --bs=1M --iodepth=8"
  "read-1m-qd8|--rw=read --bs=1M --iodepth=8"
  "randwrite-4k-qd1|--rw=randwrite --bs=4k --iodepth=1"
)

prefill() { # target args...: write the whole region once so every target starts fully allocated
  fio --name=prefill "$@" --rw=write --bs=1M --iodepth=8 --size=$SIZE --output=/dev/null
}

# Every workload starts with a cold page cache: peers that read through it (nbdkit's file
# plugin does, even with cache=none) would otherwise serve a 2 GiB file from memory.
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "  (cannot drop caches: not root)"; }

run_target() { # target-name, fio target args...
  local target=$1; shift
  prefill "$@"
  for w in "${WORKLOADS[@]}"; do
    local name=${w%%|*} args=${w#*|}
    drop_caches
    # shellcheck disable=SC2086
    fio --name="$name" "$@" $args --size=$SIZE --time_based --runtime="$RUNTIME" --ramp_time=2 \
        --numjobs=1 --group_reporting --output-format=json --output="$OUT/$target.$name.json"
    echo "  $target $name done"
  done
}

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }

echo "== raw file (io_uring, O_DIRECT)"
run_target raw --ioengine=io_uring --direct=1 --filename="$FILE"

echo "== nbdkit null (no storage: the NBD client's ceiling)"
nbdkit --unix "$DIR/null.sock" --foreground --exit-with-parent null 2G &
PIDS+=($!); wait_sock "$DIR/null.sock"
run_target nbd-null --ioengine=nbd --uri="nbd+unix:///?socket=$DIR/null.sock"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

echo "== nbdkit file cache=none"
nbdkit --unix "$DIR/nbdkit.sock" --foreground --exit-with-parent file "$FILE" cache=none &
PIDS+=($!); wait_sock "$DIR/nbdkit.sock"
run_target nbdkit --ioengine=nbd --uri="nbd+unix:///?socket=$DIR/nbdkit.sock"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

echo "== qemu-nbd --cache=none --aio=io_uring"
qemu-nbd --cache=none --aio=io_uring -f raw -t -e 4 -k "$DIR/qemu.sock" "$FILE" &
PIDS+=($!); wait_sock "$DIR/qemu.sock"
run_target qemu-nbd --ioengine=nbd --uri="nbd+unix:///?socket=$DIR/qemu.sock"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

echo "== Strata (repl 1, pool on the same file)"
"$BIN/strata-engine" --data-dir "$DIR/data" --device "$FILE" --force-format \
  --nbd-listen 127.0.0.1:0 --sdk-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --repl-listen 127.0.0.1:0 \
  --nbd-socket "$DIR/strata.sock" --ready-file "$DIR/ready.json" 2> "$DIR/engine.log" &
EPID=$!; PIDS+=($EPID)
for _ in $(seq 200); do [ -f "$DIR/ready.json" ] && break; sleep 0.05; done
SDK=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sdk"])' "$DIR/ready.json")
NBD=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nbd"])' "$DIR/ready.json")
"$BIN/stratactl" --endpoint "$SDK" volume create bench --size $SIZE >/dev/null
run_target strata-unix --ioengine=nbd --uri="nbd+unix:///bench?socket=$DIR/strata.sock"
run_target strata-tcp --ioengine=nbd --uri="nbd://$NBD/bench"
kill "$EPID"; wait "$EPID" 2>/dev/null || true

echo "== idle engine: 10 volumes, each with a connected client, ${IDLE}s"
rm -rf "$DIR/idle"; mkdir -p "$DIR/idle"
"$BIN/strata-engine" --data-dir "$DIR/idle/data" --device "$DIR/idle/d.img" --device-size 1GiB \
  --nbd-listen 127.0.0.1:0 --sdk-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --repl-listen 127.0.0.1:0 \
  --nbd-socket "$DIR/idle/nbd.sock" --ready-file "$DIR/idle/ready.json" 2> "$DIR/idle/engine.log" &
IPID=$!; PIDS+=($IPID)
for _ in $(seq 200); do [ -f "$DIR/idle/ready.json" ] && break; sleep 0.05; done
SDK=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sdk"])' "$DIR/idle/ready.json")
for i in $(seq 10); do
  "$BIN/stratactl" --endpoint "$SDK" volume create "idle$i" --size 64MiB >/dev/null
  qemu-io -f raw -c "sleep $(( (IDLE + 10) * 1000 ))" "nbd+unix:///idle$i?socket=$DIR/idle/nbd.sock" >/dev/null 2>&1 &
  PIDS+=($!)
done
sleep 3
CLK=$(getconf CLK_TCK)
t0=$(awk '{print $14+$15}' /proc/$IPID/stat)
sleep "$IDLE"
t1=$(awk '{print $14+$15}' /proc/$IPID/stat)
RSS_KB=$(awk '/VmRSS/{print $2}' /proc/$IPID/status)
CONNS=$("$BIN/stratactl" --endpoint "$SDK" volume list --json | python3 -c 'import json,sys; print(sum(v["connections"] for v in json.load(sys.stdin)))')
python3 - "$OUT/idle.json" "$t0" "$t1" "$CLK" "$IDLE" "$RSS_KB" "$CONNS" <<'PY'
import json, sys
out, t0, t1, clk, secs, rss, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
cpu = (t1 - t0) / clk / secs * 100
json.dump({"seconds": secs, "cpu_percent_of_one_core": round(cpu, 3), "rss_mib": round(rss / 1024, 1), "connections": conns,
           "rss_budget_mib": 64 + 10}, open(out, "w"), indent=1)
PY

python3 "$ROOT/bench/report.py" "$OUT"
