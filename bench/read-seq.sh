#!/usr/bin/env bash
# Sequential 1 MiB reads at QD8 from a cold start, against the same peers as nbd-vs-peers.sh,
# alternated over rounds. Each target serves its own 1900 MiB file (written through first) on the
# same filesystem; each round drops the page cache, then reads every target's region once,
# start to end (not time-based), in turn:
#   raw (fio, io_uring, O_DIRECT) | nbdkit file cache=none | nbdkit file (its default cache) |
#   qemu-nbd --cache=none --aio=io_uring (O_DIRECT) | Strata repl=1 over a unix socket.
# Beside each read it prints the bytes the disk itself delivered (/proc/diskstats of the device
# under BENCH_DIR): a server that answers from the page cache reads less than it serves.
#
# Why one pass: nbd-vs-peers.sh reads for a fixed time, so fio wraps around its 1900 MiB region
# several times, and a server that reads through the page cache (nbdkit's file plugin, even with
# cache=none) serves every pass after the first from memory; Strata reads with O_DIRECT and has
# no page cache to serve from. One cold pass compares the servers' read paths on the same disk.
#
# Prints each round, then per target the mean, median and range of MiB/s, and Strata ÷ each peer
# per round (mean, median, range); JSON to BENCH_OUT (default bench/out-read).
# Environment: BENCH_ROUNDS (default 8), BENCH_DIR (default /var/tmp/strata-bench-read).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${BENCH_ROUNDS:-8}
DIR=${BENCH_DIR:-/var/tmp/strata-bench-read}
OUT=${BENCH_OUT:-$ROOT/bench/out-read}
./scripts/deps.sh
cargo build --release -p strata-engine -p stratactl
BIN=$ROOT/target/release
rm -rf "$DIR" "$OUT"; mkdir -p "$DIR" "$OUT"
SIZE=1900M
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
wait_file() { for _ in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done; echo "no $1" >&2; return 1; }

# The block device under DIR, as /proc/diskstats names it (empty when there is none, e.g. tmpfs).
DISK=$(basename "$(df --output=source "$DIR" | tail -1)")
grep -qw "$DISK" /proc/diskstats || DISK=""
disk_read_mib() { # sectors read so far by DISK, in MiB
  if [ -n "$DISK" ]; then awk -v d="$DISK" '$3 == d { printf "%.1f\n", $6 / 2048 }' /proc/diskstats; else echo 0; fi
}

for t in raw nbdkit-none nbdkit qemu-nbd strata; do truncate -s 2G "$DIR/$t.img"; done
nbdkit --unix "$DIR/nbdkit-none.sock" --foreground --exit-with-parent file "$DIR/nbdkit-none.img" cache=none &
PIDS+=($!)
nbdkit --unix "$DIR/nbdkit.sock" --foreground --exit-with-parent file "$DIR/nbdkit.img" &
PIDS+=($!)
qemu-nbd --cache=none --aio=io_uring -f raw -t -e 4 -k "$DIR/qemu.sock" "$DIR/qemu-nbd.img" &
PIDS+=($!)
"$BIN/strata-engine" --data-dir "$DIR/data" --device "$DIR/strata.img" --force-format \
  --nbd-listen 127.0.0.1:0 --sdk-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --repl-listen 127.0.0.1:0 \
  --nbd-socket "$DIR/strata.sock" --ready-file "$DIR/ready.json" 2>"$DIR/engine.log" &
PIDS+=($!)
for f in nbdkit-none.sock nbdkit.sock qemu.sock ready.json; do wait_file "$DIR/$f"; done
SDK=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sdk"])' "$DIR/ready.json")
"$BIN/stratactl" --endpoint "$SDK" volume create bench --size $SIZE >/dev/null

declare -A ARGS=(
  [raw]="--ioengine=io_uring --direct=1 --filename=$DIR/raw.img"
  [nbdkit-none]="--ioengine=nbd --uri=nbd+unix:///?socket=$DIR/nbdkit-none.sock"
  [nbdkit]="--ioengine=nbd --uri=nbd+unix:///?socket=$DIR/nbdkit.sock"
  [qemu-nbd]="--ioengine=nbd --uri=nbd+unix:///?socket=$DIR/qemu.sock"
  [strata]="--ioengine=nbd --uri=nbd+unix:///bench?socket=$DIR/strata.sock"
)
TARGETS=(raw nbdkit-none nbdkit qemu-nbd strata)
for t in "${TARGETS[@]}"; do
  # shellcheck disable=SC2086
  fio --name=prefill ${ARGS[$t]} --rw=write --bs=1M --iodepth=8 --size=$SIZE --output=/dev/null 2>/dev/null
done

for r in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    sync; echo 3 >/proc/sys/vm/drop_caches
    # fio's own binary and libraries (~60 MiB with Debian's) come back first, outside the count.
    fio --name=warm --ioengine=null --size=1M --output=/dev/null
    d0=$(disk_read_mib)
    # shellcheck disable=SC2086
    fio --name="$t" ${ARGS[$t]} --rw=read --bs=1M --iodepth=8 --size=$SIZE --output-format=json \
        --output="$OUT/$t.$r.json" 2>/dev/null
    d1=$(disk_read_mib)
    python3 - "$OUT/$t.$r.json" "$d0" "$d1" "$DISK" <<'PY'
import json, sys
path, d0, d1, disk = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
text = open(path).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
served = job["read"]["io_bytes"] / (1 << 20)
res = {"mib_s": job["read"]["bw_bytes"] / (1 << 20), "served_mib": served, "disk_read_mib": (d1 - d0) if disk else None}
json.dump(res, open(path, "w"), indent=1)
disk_note = f", disk read {d1 - d0:.0f} MiB" if disk else ""
print(f"  {job['jobname']:<12} {res['mib_s']:7.0f} MiB/s (served {served:.0f} MiB{disk_note})")
PY
  done
  echo "round $r done"
done

python3 - "$OUT" "$ROUNDS" "${TARGETS[@]}" <<'PY'
import json, statistics, sys
out, rounds, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = {t: [json.load(open(f"{out}/{t}.{r}.json")) for r in range(1, rounds + 1)] for t in targets}
summary = {"rounds": rounds, "targets": {}, "strata_over": {}}
print(f"\n1 MiB sequential reads at QD8, one cold pass of 1900 MiB per read, {rounds} rounds")
print(f"{'target':<12} {'mean MiB/s':>10} {'median':>8} {'range':>12} {'disk read ÷ served':>19}")
for t in targets:
    v = [x["mib_s"] for x in runs[t]]
    disk = [x["disk_read_mib"] / x["served_mib"] for x in runs[t] if x["disk_read_mib"] is not None]
    d = statistics.mean(disk) if disk else None
    summary["targets"][t] = {"mean": statistics.mean(v), "median": statistics.median(v), "min": min(v), "max": max(v),
                             "disk_read_per_served": d}
    print(f"{t:<12} {statistics.mean(v):10.0f} {statistics.median(v):8.0f} {min(v):5.0f}-{max(v):<6.0f} "
          f"{'n/a' if d is None else f'{d:.2f}':>19}")
print("\nStrata ÷ peer, per round:")
for t in targets:
    if t == "strata":
        continue
    v = [s["mib_s"] / p["mib_s"] for s, p in zip(runs["strata"], runs[t])]
    summary["strata_over"][t] = {"mean": statistics.mean(v), "median": statistics.median(v), "min": min(v), "max": max(v)}
    print(f"  ÷ {t:<12} mean {statistics.mean(v):.2f}, median {statistics.median(v):.2f}, range {min(v):.2f}-{max(v):.2f}")
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
m = summary["strata_over"]["nbdkit-none"]["mean"]
print(f"target (issue #19): 1M read >= 0.95x nbdkit (cache=none, as in nbd-vs-peers.sh), cold pass: "
      f"{'met' if m >= 0.95 else 'MISSED'} ({m:.2f})")
PY
