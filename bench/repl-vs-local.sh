#!/usr/bin/env bash
# Replication cost: 4k random writes at QD32 on a repl=3 volume (three engines on one etcd,
# each on its own file-backed pool, replicas over loopback TCP) against a repl=1 volume on the
# same engine, in the same run. Prints IOPS, p50/p99 latency, the engines' CPU per write (all
# three engines' user + system time over the run, from /proc, ÷ writes) and the ratios,
# and writes JSON to BENCH_OUT (default bench/out-repl).
#
# Beside them, in the same run, the peer both are measured against: fio itself writing
# 4k at random with io_uring into files of the same filesystem (O_DIRECT on the disk), once on
# one file at QD32 (the repl=1 peer) and once on three files at QD32 each at the same time
# (three copies of every write on one disk: the repl=3 peer), with fio's own CPU per write.
# A replicated write is three device writes, so three times fio's CPU per device write is what
# the writes alone cost on this machine, and a third of the three-file IOPS is what the disk
# allows three copies.
#
# Environment: BENCH_TLS (1, the default: replication over mutual TLS; 0: plaintext),
# BENCH_RUNTIME (seconds per run, default 15), BENCH_DIR (default
# /var/tmp/strata-bench-repl), BENCH_BACKING: `file` (default: pool files on BENCH_DIR's
# filesystem) or `memory` (pool files in /dev/shm: the software cost alone; tmpfs has no
# O_DIRECT, so there the raw peer writes through the page cache, as the engines do).
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
# The raw peer: fio on files of the same filesystem, fallocated and written through first (as
# the volumes are), its CPU from the rusage of the fio it ran.
DIRECT=1; [ "${BENCH_BACKING:-file}" = memory ] && DIRECT=0
for i in 1 2 3; do
  fallocate -l 1G "$DIR/raw$i.img"
  fio --name=prefill --filename="$DIR/raw$i.img" --ioengine=io_uring --direct=$DIRECT --rw=write --bs=1M --iodepth=8 --size=1G --output=/dev/null
done
raw() { # name files...
  local name=$1 args=() f; shift
  for f in "$@"; do args+=(--name="$name-$(basename "$f" .img)" --filename="$f"); done
  python3 - "$OUT/$name.cpu" fio --ioengine=io_uring --direct=$DIRECT --rw=randwrite --bs=4k --iodepth=32 --size=1G \
      --time_based --runtime="$RUNTIME" --group_reporting --output-format=json --output="$OUT/$name.json" "${args[@]}" <<'PY'
import resource, subprocess, sys
subprocess.run(sys.argv[2:], check=True)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(str(r.ru_utime + r.ru_stime))
PY
}
# Alternate, so drift on a noisy machine hits all.
raw raw1 "$DIR/raw1.img"; run r1; raw raw3 "$DIR/raw1.img" "$DIR/raw2.img" "$DIR/raw3.img"; run r3
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def load(n):
    j = json.load(open(f"{out}/{n}.json"))["jobs"][0]["write"]
    p = j["clat_ns"]["percentile"]
    cpu = float(open(f"{out}/{n}.cpu").read())
    return {"iops": j["iops"], "p50_us": p["50.000000"] / 1000, "p99_us": p["99.000000"] / 1000,
            "cpu_us_per_write": cpu * 1e6 / j["total_ios"]}
r1, r3, raw1, raw3 = load("r1"), load("r3"), load("raw1"), load("raw3")
res = {"repl1": r1, "repl3": r3, "raw_1file": raw1, "raw_3files": raw3,
       "iops_ratio": r3["iops"] / r1["iops"], "p99_ratio": r3["p99_us"] / r1["p99_us"],
       "repl1_vs_raw": r1["iops"] / raw1["iops"],
       # What the disk allows three copies, and the CPU against what three device writes cost fio.
       "repl3_vs_disk_for_3_copies": r3["iops"] / (raw3["iops"] / 3),
       "repl3_cpu_vs_3_raw_writes": r3["cpu_us_per_write"] / (3 * raw3["cpu_us_per_write"])}
json.dump(res, open(f"{out}/summary.json", "w"), indent=2)
print(f"{'run':34} {'IOPS':>10} {'p50 us':>9} {'p99 us':>9} {'CPU us/write':>13}")
for n, r in (("raw: fio, 1 file, QD32", raw1), ("Strata repl=1", r1), ("raw: fio, 3 files, QD32 each", raw3), ("Strata repl=3", r3)):
    print(f"{n:34} {r['iops']:10.0f} {r['p50_us']:9.0f} {r['p99_us']:9.0f} {r['cpu_us_per_write']:13.1f}")
print(f"repl=3 / repl=1: IOPS {res['iops_ratio']:.2f}x (target >= 0.60, issue #19; #4 asked 0.70), p99 {res['p99_ratio']:.2f}x (target <= 2.00)")
print(f"repl=1 / raw 1 file: IOPS {res['repl1_vs_raw']:.2f}x (target >= 0.80)")
print(f"repl=3 / (raw 3 files / 3): IOPS {res['repl3_vs_disk_for_3_copies']:.2f}x of what the backing allows three copies")
print(f"repl=3 CPU per write / (3 x raw CPU per device write): {res['repl3_cpu_vs_3_raw_writes']:.2f}x")
PY
