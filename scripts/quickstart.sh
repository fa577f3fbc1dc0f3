#!/usr/bin/env bash
# Starts a one-node Strata on file-backed devices (embedded metadata store), creates a volume,
# writes and verifies data through NBD with qemu-io, and shows the cluster with stratactl.
# The engine keeps running afterwards; the script prints how to stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo build --release -p strata-engine -p stratactl
BIN=$PWD/target/release
DIR=${STRATA_DEMO_DIR:-/var/tmp/strata-demo}
mkdir -p "$DIR"
if [ -f "$DIR/engine.pid" ] && kill -0 "$(cat "$DIR/engine.pid")" 2>/dev/null; then
  echo "stopping the previous demo engine"; kill "$(cat "$DIR/engine.pid")"; sleep 1
fi
rm -f "$DIR/ready.json"
"$BIN/strata-engine" --data-dir "$DIR/data" \
  --device "$DIR/disk0.img" --device "$DIR/disk1.img" --device-size 4GiB \
  --nbd-socket "$DIR/nbd.sock" --ready-file "$DIR/ready.json" > "$DIR/engine.log" 2>&1 &
echo $! > "$DIR/engine.pid"
for _ in $(seq 100); do [ -f "$DIR/ready.json" ] && break; sleep 0.1; done
[ -f "$DIR/ready.json" ] || { cat "$DIR/engine.log"; exit 1; }
export STRATA_ENDPOINT=127.0.0.1:9020
CTL="$BIN/stratactl"
$CTL volume inspect demo >/dev/null 2>&1 || $CTL volume create demo --size 1GiB --label app=demo
qemu-io -f raw -c 'write -P 0x5a 0 16M' -c 'read -P 0x5a 0 16M' "nbd+unix:///demo?socket=$DIR/nbd.sock" | grep -E '^(wrote|read)'
$CTL status
$CTL volume list
$CTL service pool show
echo
echo "Strata is running (pid $(cat "$DIR/engine.pid"), log $DIR/engine.log)."
echo "NBD: nbd://127.0.0.1:10809/demo or nbd+unix:///demo?socket=$DIR/nbd.sock; SDK: 127.0.0.1:9020; metrics: http://127.0.0.1:9021/metrics"
echo "Stop it with: kill \$(cat $DIR/engine.pid)"
