#!/usr/bin/env bash
# Strata repl=3 beside Ceph RBD size=3 on the same machine and disk (issue #19): a one-host Ceph
# (e2e/ceph/start.sh: 1 monitor, 3 BlueStore OSDs on sparse files, pool `rbd` of size 3) and
# three Strata engines on one etcd (replication over mutual TLS); a 1 GiB image / repl=3 volume
# each, filled first. Then, alternating between the two: fio 4k random writes at QD32 (IOPS) and
# at QD1 (p50/p99 latency), Ceph through fio's rbd engine (librbd), Strata through fio's nbd
# engine (the node's NBD socket); librbd's write-back cache is off. Prints the figures and Strata / Ceph ratios; JSON to BENCH_OUT.
#
# Environment: BENCH_RUNTIME (seconds per run, default 15), BENCH_DIR (default
# /var/tmp/strata-bench-ceph), BENCH_OUT (default bench/out-ceph).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNTIME=${BENCH_RUNTIME:-15}
OUT=${BENCH_OUT:-$ROOT/bench/out-ceph}
DIR=${BENCH_DIR:-/var/tmp/strata-bench-ceph}
./scripts/deps.sh
need=()
for p in ceph-mon ceph-osd ceph-common; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
[ "${#need[@]}" -eq 0 ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }
cargo build --release -p strata-engine -p stratactl
BIN=$ROOT/target/release
rm -rf "$DIR" "$OUT"; mkdir -p "$DIR" "$OUT"
PIDS=()
cleanup() {
  for f in "$DIR"/ceph/run/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

CEPH_OSDS=3 CEPH_OSD_SIZE=$((4 << 30)) ./e2e/ceph/start.sh "$DIR/ceph" 23890
export CEPH_CONF=$DIR/ceph/ceph.conf
# librbd's write-back cache would acknowledge writes from the client's memory; Strata
# acknowledges a write once every in-sync replica has it. Compare like with like.
printf '[client]\nrbd cache = false\n' >>"$CEPH_CONF"
ceph osd pool create rbd 32 >/dev/null 2>&1
ceph osd pool set rbd size 3 >/dev/null 2>&1
timeout 120 rbd pool init rbd
rbd create bench --size 1G
TLS=1
. "$ROOT/bench/cluster.sh"
start_cluster 23790 3 3GiB
"$BIN/stratactl" --endpoint "$SDK" volume create r3 --size 1GiB --repl 3 >/dev/null
NBD="nbd+unix:///r3?socket=$DIR/n1/nbd.sock"
RBD=(--ioengine=rbd --clientname=admin --pool=rbd --rbdname=bench)
fio --name=fill-ceph "${RBD[@]}" --rw=write --bs=1M --iodepth=8 --size=1G --output=/dev/null
fio --name=fill-strata --ioengine=nbd --uri="$NBD" --rw=write --bs=1M --iodepth=8 --size=1G --output=/dev/null

run() { # name qd engine-args...
  local name=$1 qd=$2; shift 2
  fio --name="$name" "$@" --rw=randwrite --bs=4k --iodepth="$qd" --size=1G --time_based --runtime="$RUNTIME" \
    --ramp_time=2 --output-format=json --output="$OUT/$name.json"
}
run ceph-qd32 32 "${RBD[@]}"
run strata-qd32 32 --ioengine=nbd --uri="$NBD"
run ceph-qd1 1 "${RBD[@]}"
run strata-qd1 1 --ioengine=nbd --uri="$NBD"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def load(n):
    j = json.load(open(f"{out}/{n}.json"))["jobs"][0]["write"]
    p = j["clat_ns"]["percentile"]
    return {"iops": round(j["iops"]), "p50_us": round(p["50.000000"] / 1000), "p99_us": round(p["99.000000"] / 1000)}
r = {n: load(n) for n in ("ceph-qd32", "strata-qd32", "ceph-qd1", "strata-qd1")}
r["iops_ratio_qd32"] = round(r["strata-qd32"]["iops"] / r["ceph-qd32"]["iops"], 2)
r["p99_ratio_qd1"] = round(r["strata-qd1"]["p99_us"] / r["ceph-qd1"]["p99_us"], 2)
json.dump(r, open(f"{out}/summary.json", "w"), indent=2)
print(f"{'run':12} {'IOPS':>8} {'p50 us':>8} {'p99 us':>8}")
for n in ("ceph-qd32", "strata-qd32", "ceph-qd1", "strata-qd1"):
    print(f"{n:12} {r[n]['iops']:8} {r[n]['p50_us']:8} {r[n]['p99_us']:8}")
print(f"Strata repl=3 / Ceph size=3: 4k QD32 IOPS {r['iops_ratio_qd32']}x (goal >= 10), 4k QD1 p99 {r['p99_ratio_qd1']}x (goal <= 0.25)")
PY
