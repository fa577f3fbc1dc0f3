#!/usr/bin/env bash
# The user's path beside the engine's own speed, in one run: fio through fio's NBD engine on a
# volume (direct), through the node plugin's FUSE view under a loop device (raw device), and on
# ext4 mounted on that device (a file, O_DIRECT), interleaved round by round on one engine
# (repl 1, pool on a loop device over /dev/shm: no disk noise). Prints each path's figures and
# its ratio to direct; writes JSON to $BENCH_OUT.
#
# Environment: BENCH_RUNTIME (seconds per workload, default 10), BENCH_ROUNDS (default 2),
# BENCH_DIR (default /var/tmp/strata-attach-bench), BENCH_OUT (default bench/out-attach),
# BENCH_CSI (a strata-csi binary to take the FUSE view from, e.g. an older build; default this one).
#
# The kernel paths (kernel NBD, ublk) cannot be measured on this machine class (no modules; the VM
# tier's guest is emulated): on a real node, run the same fio lines against the /dev/nbdN the
# node plugin stages (strata-csi --attach kernel-nbd), or the /dev/ublkbN (--attach ublk), and
# divide by the direct figures.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNTIME=${BENCH_RUNTIME:-10}
ROUNDS=${BENCH_ROUNDS:-2}
DIR=${BENCH_DIR:-/var/tmp/strata-attach-bench}
OUT=${BENCH_OUT:-$ROOT/bench/out-attach}
./scripts/deps.sh
cargo build --release -p strata-engine -p stratactl -p strata-csi
BIN=$ROOT/target/release
CSI=${BENCH_CSI:-$BIN/strata-csi}
rm -rf "$DIR" "$OUT"; mkdir -p "$DIR" "$OUT"
PIDS=(); LOOPS=(); MNTS=()
cleanup() {
  for m in "${MNTS[@]}"; do umount "$m" 2>/dev/null || true; done
  for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  for m in "$DIR/fuse-a" "$DIR/fuse-b"; do umount "$m" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  rm -f /dev/shm/strata-attach-bench.img
}
trap cleanup EXIT
truncate -s 3G /dev/shm/strata-attach-bench.img
POOL=$(losetup -f --show /dev/shm/strata-attach-bench.img); LOOPS+=("$POOL")

"$BIN/strata-engine" --data-dir "$DIR/data" --device "$POOL" --force-format \
  --nbd-listen 127.0.0.1:0 --sdk-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --repl-listen 127.0.0.1:0 \
  --nbd-socket "$DIR/nbd.sock" --ready-file "$DIR/ready.json" 2>"$DIR/engine.log" &
PIDS+=($!)
for _ in $(seq 200); do [ -f "$DIR/ready.json" ] && break; sleep 0.05; done
SDK=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sdk"])' "$DIR/ready.json")
SIZE=1G
for v in a b; do "$BIN/stratactl" --endpoint "$SDK" volume create "vol-$v" --size 1200MiB >/dev/null; done
DIRECT="--ioengine=nbd --uri=nbd+unix:///vol-a?socket=$DIR/nbd.sock"
fio --name=prefill $DIRECT --rw=write --bs=1M --iodepth=8 --size=$SIZE --output=/dev/null

fuse_view() { # volume, mountpoint -> prints the loop device
  mkdir -p "$2"
  # Its own stdout: the command substitution this runs in waits for that to close.
  "$CSI" fuse-disk --export "$1" --mount "$2" --socket "$DIR/nbd.sock" >/dev/null 2>>"$DIR/fuse.log" &
  for _ in $(seq 200); do [ -f "$2/disk" ] && break; sleep 0.05; done
  losetup -f --show --direct-io=on "$2/disk"
}
RAW=$(fuse_view vol-a "$DIR/fuse-a"); LOOPS+=("$RAW")
EXT=$(fuse_view vol-b "$DIR/fuse-b"); LOOPS+=("$EXT")
echo "FUSE views: $RAW (raw, dio=$(cat /sys/block/${RAW#/dev/}/loop/dio)), $EXT (ext4)"
mkfs.ext4 -q -F "$EXT"; mkdir -p "$DIR/ext4"; mount "$EXT" "$DIR/ext4"; MNTS+=("$DIR/ext4")
fio --name=prefill --filename="$DIR/ext4/f" --ioengine=io_uring --direct=1 --rw=write --bs=1M --iodepth=8 --size=$SIZE --output=/dev/null

WORKLOADS=(
  "randwrite-4k-qd32|--rw=randwrite --bs=4k --iodepth=32"
  "randread-4k-qd32|--rw=randread --bs=4k --iodepth=32"
  "write-1m-qd8|--rw=write --bs=1M --iodepth=8"
  "read-1m-qd8|--rw=read --bs=1M --iodepth=8"
)
TARGETS=(
  "direct|$DIRECT"
  "fuse-raw|--ioengine=io_uring --direct=1 --filename=$RAW"
  "fuse-ext4|--ioengine=io_uring --direct=1 --filename=$DIR/ext4/f"
)
for r in $(seq "$ROUNDS"); do
  for w in "${WORKLOADS[@]}"; do
    for t in "${TARGETS[@]}"; do
      # shellcheck disable=SC2086
      fio --name="${w%%|*}" ${t#*|} ${w#*|} --size=$SIZE --time_based --runtime="$RUNTIME" --ramp_time=2 \
        --output-format=json --output="$OUT/${t%%|*}.${w%%|*}.$r.json"
    done
    echo "round $r ${w%%|*} done"
  done
done

python3 - "$OUT" "$ROUNDS" <<'PY'
import json, os, sys
out, rounds = sys.argv[1], int(sys.argv[2])
targets = ["direct", "fuse-raw", "fuse-ext4"]
workloads = ["randwrite-4k-qd32", "randread-4k-qd32", "write-1m-qd8", "read-1m-qd8"]
def fig(t, w, r):
    text = open(os.path.join(out, f"{t}.{w}.{r}.json")).read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    side = job["write"] if "write" in w else job["read"]
    return side["iops"] if "4k" in w else side["bw_bytes"] / (1 << 20)
summary = {}
print(f"{'workload':20} {'target':10} {'value':>10} {'÷ direct':>9}   (per round: IOPS for 4k, MiB/s for 1M)")
for w in workloads:
    for t in targets:
        vals = [fig(t, w, r) for r in range(1, rounds + 1)]
        ratios = [v / fig("direct", w, r) for r, v in enumerate(vals, 1)]
        mean = sum(vals) / len(vals)
        summary[f"{t}.{w}"] = {"values": vals, "ratio_to_direct": ratios}
        print(f"{w:20} {t:10} {mean:10.0f} {sum(ratios)/len(ratios):9.2f}   {' '.join(f'{v:.0f}' for v in vals)}")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
PY
