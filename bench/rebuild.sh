#!/usr/bin/env bash
# Rebuild speed: a repl=1 volume with BENCH_SIZE written (sequential 1 MiB) gains a replica on a
# second engine (`ha-update --repl 2`), timed until the new replica is in sync, beside a raw
# O_DIRECT copy (dd, 1 MiB blocks) of the same number of bytes between two files on the same
# filesystem, once right before and once right after each rebuild: the peer of a round is the
# mean of the two, so a disk that speeds up or slows down during a round does not favour either.
# Two engines on one etcd, plaintext replication over loopback (BENCH_TLS=1: mutual TLS). No
# client I/O during the rebuild, so the adaptive rate limit does not pace it. Prints MiB/s of
# each and the ratio per round, then the mean, median and range of the ratios over all rounds
# (a virtual disk's rate swings by a third from one minute to the next, so one round says
# little); JSON to BENCH_OUT. The rebuild's time is the user's: `stratactl volume ha-update
# --wait`, which returns once the new replica is in sync (it looks every 50 ms); the copy alone,
# from the target's log, is printed beside it.
#
# Environment: BENCH_SIZE (MiB, default 1024), BENCH_ROUNDS (default 10), BENCH_DIR (default
# /var/tmp/strata-bench-rebuild; BENCH_BACKING=memory puts everything in /dev/shm), BENCH_OUT
# (default bench/out-rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZE=${BENCH_SIZE:-1024}
ROUNDS=${BENCH_ROUNDS:-10}
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
# Each round deletes its volume, so the pools need room for one (and its replica) only.
start_cluster 23890 2 $((SIZE + 1024))MiB
CTL=("$BIN/stratactl" --endpoint "$SDK")
head -c $((SIZE << 20)) /dev/urandom >"$DIR/src.bin"

# The raw copy: prints its seconds.
raw_copy() {
  sync; echo 3 >/proc/sys/vm/drop_caches
  local a b
  a=$(date +%s.%N)
  dd if="$DIR/src.bin" of="$DIR/copy.bin" bs=1M count="$SIZE" iflag=direct oflag=direct conv=fsync status=none
  b=$(date +%s.%N)
  rm -f "$DIR/copy.bin"
  python3 -c "print($b - $a)"
}

for r in $(seq "$ROUNDS"); do
  v=rb$r
  "${CTL[@]}" volume create "$v" --size "${SIZE}MiB" --repl 1 --nodes node-1 >/dev/null
  "${CTL[@]}" host attach "$v" >/dev/null
  nbdcopy "$DIR/src.bin" "nbd+unix:///$v?socket=$DIR/n1/nbd.sock"
  dd_before=$(raw_copy)
  sync; echo 3 >/proc/sys/vm/drop_caches
  t0=$(date +%s.%N)
  "${CTL[@]}" volume ha-update "$v" --repl 2 --node node-2 --wait --timeout 600 >/dev/null
  t1=$(date +%s.%N)
  # The copy alone, by the target's own clock: from "resync started" to "replica back in sync".
  grep -E "(resync started|replica back in sync) volume=$v " "$DIR/n1/engine.log" | cut -c1-27 >"$DIR/copy.times"
  dd_after=$(raw_copy)
  python3 - "$OUT/round$r.json" "$SIZE" "$DIR/copy.times" "$t0" "$t1" "$dd_before" "$dd_after" <<'PY'
import datetime, json, sys
out, size, times, t0, t1, before, after = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(float, sys.argv[4:])
rb = size / (t1 - t0)
dd = (size / before + size / after) / 2
stamps = [datetime.datetime.fromisoformat(l.strip().rstrip("Z")) for l in open(times) if l.strip()]
copy = size / (stamps[-1] - stamps[0]).total_seconds() if len(stamps) >= 2 else float("nan")
json.dump({"mib": size, "rebuild_mib_s": rb, "copy_mib_s": copy, "dd_direct_mib_s": dd, "dd_before_mib_s": size / before,
           "dd_after_mib_s": size / after, "ratio": rb / dd, "copy_ratio": copy / dd}, open(out, "w"), indent=1)
print(f"round: rebuild {rb:.0f} MiB/s (the copy alone, by the engine's log: {copy:.0f}), dd O_DIRECT {dd:.0f} MiB/s "
      f"({size / before:.0f} before, {size / after:.0f} after), ratio {rb / dd:.2f} ({copy / dd:.2f})")
PY
  "${CTL[@]}" volume delete "$v" --force >/dev/null
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rs = [json.load(open(f"{out}/round{r}.json")) for r in range(1, rounds + 1)]
summary = {"rounds": rounds}
for key, name in (("ratio", "rebuild ÷ dd"), ("copy_ratio", "copy alone ÷ dd")):
    v = [r[key] for r in rs]
    summary[key] = {"mean": statistics.mean(v), "median": statistics.median(v), "min": min(v), "max": max(v)}
    print(f"{name} over {rounds} rounds: mean {statistics.mean(v):.2f}, median {statistics.median(v):.2f}, "
          f"range {min(v):.2f}-{max(v):.2f}")
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(f"target (issue #19): mean rebuild ÷ dd >= 0.80: {'met' if summary['ratio']['mean'] >= 0.8 else 'MISSED'}")
PY
