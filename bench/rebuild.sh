#!/usr/bin/env bash
# Rebuild speed: a repl=1 volume with BENCH_SIZE written (sequential 1 MiB) gains a replica on a
# second engine (`ha-update --repl 2`), timed until the new replica is in sync, beside a raw
# O_DIRECT copy (dd, 1 MiB blocks) of the same number of bytes between two files on the same
# filesystem, interleaved round by round. Two engines on one etcd, plaintext replication over
# loopback (BENCH_TLS=1: mutual TLS). No client I/O during the rebuild, so the adaptive rate
# limit does not pace it. Prints MiB/s of each and the ratio; JSON to BENCH_OUT. The rebuild's
# time is the user's: `stratactl volume ha-update --wait`, which returns once the new replica is
# in sync (it looks every 50 ms); the copy alone, from the target's log, is printed beside it.
#
# Environment: BENCH_SIZE (MiB, default 1024), BENCH_ROUNDS (default 2), BENCH_DIR (default
# /var/tmp/strata-bench-rebuild; BENCH_BACKING=memory puts everything in /dev/shm), BENCH_OUT
# (default bench/out-rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZE=${BENCH_SIZE:-1024}
ROUNDS=${BENCH_ROUNDS:-2}
OUT=${BENCH_OUT:-$ROOT/bench/out-rebuild}
case "${BENCH_BACKING:-file}" in
  file) DIR=${BENCH_DIR:-/var/tmp/strata-bench-rebuild} ;;
  memory) DIR=/dev/shm/strata-bench-rebuild ;;
  *) echo "BENCH_BACKING must be file or memory" >&2; exit 2 ;;
esac
./scripts/deps.sh
cargo build --release -p strata-engine -p stratactl
BIN=$ROOT/target/release
rm -rf "$DIR" "$OUT"; mkdir -p "$DIR" "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT

TLS=${BENCH_TLS:-0}
. "$ROOT/bench/cluster.sh"
start_cluster 23890 2 $((SIZE * ROUNDS + 1024))MiB
CTL=("$BIN/stratactl" --endpoint "$SDK")
head -c $((SIZE << 20)) /dev/urandom >"$DIR/src.bin"

for r in $(seq "$ROUNDS"); do
  v=rb$r
  "${CTL[@]}" volume create "$v" --size "${SIZE}MiB" --repl 1 --nodes node-1 >/dev/null
  "${CTL[@]}" host attach "$v" >/dev/null
  nbdcopy "$DIR/src.bin" "nbd+unix:///$v?socket=$DIR/n1/nbd.sock"
  sync; echo 3 >/proc/sys/vm/drop_caches
  t0=$(date +%s.%N)
  "${CTL[@]}" volume ha-update "$v" --repl 2 --node node-2 --wait --timeout 600 >/dev/null
  t1=$(date +%s.%N)
  # The copy alone, by the target's own clock: from "resync started" to "replica back in sync".
  grep -E "(resync started|replica back in sync) volume=$v " "$DIR/n1/engine.log" | cut -c1-27 >"$DIR/copy.times"
  sync; echo 3 >/proc/sys/vm/drop_caches
  t2=$(date +%s.%N)
  dd if="$DIR/src.bin" of="$DIR/copy.bin" bs=1M count="$SIZE" iflag=direct oflag=direct conv=fsync status=none
  t3=$(date +%s.%N)
  rm -f "$DIR/copy.bin"
  python3 - "$OUT/round$r.json" "$SIZE" "$DIR/copy.times" "$t0" "$t1" "$t2" "$t3" <<'PY'
import datetime, json, sys
out, size, times, t0, t1, t2, t3 = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(float, sys.argv[4:])
rb, dd = size / (t1 - t0), size / (t3 - t2)
stamps = [datetime.datetime.fromisoformat(l.strip().rstrip("Z")) for l in open(times) if l.strip()]
copy = size / (stamps[-1] - stamps[0]).total_seconds() if len(stamps) >= 2 else float("nan")
json.dump({"mib": size, "rebuild_mib_s": rb, "copy_mib_s": copy, "dd_direct_mib_s": dd, "ratio": rb / dd, "copy_ratio": copy / dd},
          open(out, "w"), indent=1)
print(f"round: rebuild {rb:.0f} MiB/s (the copy alone, by the engine's log: {copy:.0f}), dd O_DIRECT {dd:.0f} MiB/s, "
      f"ratio {rb / dd:.2f} ({copy / dd:.2f})")
PY
  "${CTL[@]}" volume delete "$v" --force >/dev/null
done
