#!/usr/bin/env bash
# Cloud snapshot throughput: `stratactl cloudsnap backup` (full) and `cloudsnap restore` of a
# volume holding BENCH_SIZE MiB of random data, beside s3cmd uploading and downloading a file
# of the same bytes to the same S3 server (s3s-fs on loopback, its objects on the same
# filesystem), interleaved round by round. Random data: zstd gains nothing, so both move the
# same bytes. Prints MiB/s of each and the ratios; JSON to BENCH_OUT. BENCH_S3=rgw uses Ceph's
# RADOS Gateway instead (a one-host Ceph, e2e/ceph/start.sh: 1 monitor, 1 BlueStore OSD on a file).
#
# Environment: BENCH_SIZE (MiB, default 512), BENCH_ROUNDS (default 2), BENCH_PASSPHRASE=1
# (encrypted backups), BENCH_DIR (default /var/tmp/strata-bench-cloudsnap), BENCH_OUT (default
# bench/out-cloudsnap).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZE=${BENCH_SIZE:-512}
ROUNDS=${BENCH_ROUNDS:-2}
OUT=${BENCH_OUT:-$ROOT/bench/out-cloudsnap}
DIR=${BENCH_DIR:-/var/tmp/strata-bench-cloudsnap}
./scripts/deps.sh
command -v s3cmd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq s3cmd >/dev/null; }
command -v s3s-fs >/dev/null || cargo install --locked s3s-fs --version 0.14.1 --features binary
cargo build --release -p strata-engine -p stratactl
BIN=$ROOT/target/release
rm -rf "$DIR" "$OUT"; mkdir -p "$DIR/s3/bench" "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT

PORT=23990
if [ "${BENCH_S3:-s3s-fs}" = rgw ]; then
  AK=AKSTRATA SK=SKSTRATA BUCKET=backups
  cleanup_rgw() { for f in "$DIR"/ceph/run/*.pid; do kill "$(cat "$f")" 2>/dev/null || true; done; cleanup; }
  trap cleanup_rgw EXIT
  ./e2e/ceph/start.sh "$DIR/ceph" 23991 $PORT
else
  AK=AKBENCH SK=SKBENCH BUCKET=bench
  s3s-fs --host 127.0.0.1 --port $PORT --access-key $AK --secret-key $SK "$DIR/s3" >"$DIR/s3s.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
fi
head -c 32 /dev/urandom >"$DIR/cred.key"
"$BIN/strata-engine" --data-dir "$DIR/n1/data" --device "$DIR/n1/pool.img" --device-size $((SIZE * (ROUNDS + 1) + 1024))MiB \
  --credentials-key-file "$DIR/cred.key" --nbd-listen 127.0.0.1:0 --sdk-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  --repl-listen 127.0.0.1:0 --nbd-socket "$DIR/n1/nbd.sock" --ready-file "$DIR/n1/ready.json" 2>"$DIR/engine.log" &
PIDS+=($!)
for _ in $(seq 200); do [ -f "$DIR/n1/ready.json" ] && break; sleep 0.05; done
SDK=$(python3 -c "import json;print(json.load(open('$DIR/n1/ready.json'))['sdk'])")
CTL=("$BIN/stratactl" --endpoint "$SDK")
pass=()
if [ "${BENCH_PASSPHRASE:-0}" = 1 ]; then echo "bench passphrase" >"$DIR/pass"; pass=(--passphrase-file "$DIR/pass"); fi
"${CTL[@]}" credentials create bench --s3-endpoint "http://127.0.0.1:$PORT" --bucket $BUCKET --s3-access-key $AK \
  --s3-secret-key $SK --path-style "${pass[@]}" >/dev/null
cat >"$DIR/s3cfg" <<CFG
[default]
access_key = $AK
secret_key = $SK
host_base = 127.0.0.1:$PORT
host_bucket = 127.0.0.1:$PORT
use_https = False
signature_v2 = False
CFG
S3CMD=(s3cmd -c "$DIR/s3cfg" --no-progress --multipart-chunk-size-mb=64)
head -c $((SIZE << 20)) /dev/urandom >"$DIR/src.bin"
now() { date +%s.%N; }
mibs() { python3 -c "print(round($SIZE / ($2 - $1), 1))"; }

for r in $(seq "$ROUNDS"); do
  v=cs$r
  "${CTL[@]}" volume create "$v" --size "${SIZE}MiB" >/dev/null
  qemu-img convert -n -f raw -O raw -t none "$DIR/src.bin" "nbd+unix:///$v?socket=$DIR/n1/nbd.sock"
  "${CTL[@]}" host detach "$v" >/dev/null || true
  sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  t0=$(now); "${CTL[@]}" cloudsnap backup "$v" --cred bench --full --wait --json >"$OUT/backup-$r.json"; t1=$(now)
  id=$(python3 -c "import json;print(json.load(open('$OUT/backup-$r.json'))[0]['id'])")
  t2=$(now); "${CTL[@]}" cloudsnap restore --cred bench --snap "$id" --name "$v-back" >/dev/null; t3=$(now)
  t4=$(now); "${S3CMD[@]}" put "$DIR/src.bin" "s3://$BUCKET/raw-$r.bin" >/dev/null; t5=$(now)
  rm -f "$DIR/got.bin"
  t6=$(now); "${S3CMD[@]}" get "s3://$BUCKET/raw-$r.bin" "$DIR/got.bin" >/dev/null; t7=$(now)
  cmp -s "$DIR/src.bin" "$DIR/got.bin" || { echo "s3cmd round trip differs" >&2; exit 1; }
  echo "{\"round\": $r, \"backup\": $(mibs "$t0" "$t1"), \"restore\": $(mibs "$t2" "$t3"), \"s3cmd_put\": $(mibs "$t4" "$t5"), \"s3cmd_get\": $(mibs "$t6" "$t7")}" | tee "$OUT/round-$r.json"
  "${CTL[@]}" cloudsnap delete --cred bench --snap "$id" >/dev/null
  "${CTL[@]}" volume delete "$v-back" >/dev/null
done
python3 - "$OUT" <<'PY'
import glob, json, sys
rows = [json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + "/round-*.json"))]
avg = lambda k: sum(r[k] for r in rows) / len(rows)
out = {k: round(avg(k), 1) for k in ("backup", "restore", "s3cmd_put", "s3cmd_get")}
out["backup_vs_put"] = round(out["backup"] / out["s3cmd_put"], 2)
out["restore_vs_get"] = round(out["restore"] / out["s3cmd_get"], 2)
json.dump(out, open(sys.argv[1] + "/summary.json", "w"))
print(json.dumps(out))
PY
