#!/usr/bin/env bash
# Starts a local three-node Strata cluster: etcd and three engines, each engine with its own
# file-backed pool; creates a repl=3 volume, writes and verifies data through NBD with qemu-io,
# and shows the cluster and the volume's replicas with stratactl. Everything keeps running
# afterwards; the script prints how to stop it. Re-running it restarts the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo build --release -p strata-engine -p stratactl
BIN=$PWD/target/release
DIR=${STRATA_DEMO_DIR:-/var/tmp/strata-demo}
ETCD=127.0.0.1:23791
mkdir -p "$DIR"
if [ -f "$DIR/pids" ]; then
  echo "stopping the previous demo"
  # shellcheck disable=SC2046
  kill $(cat "$DIR/pids") 2>/dev/null || true
  sleep 1
fi
: > "$DIR/pids"
etcd --name strata-demo --data-dir "$DIR/etcd" \
  --listen-client-urls "http://$ETCD" --advertise-client-urls "http://$ETCD" \
  --listen-peer-urls http://127.0.0.1:23792 --initial-advertise-peer-urls http://127.0.0.1:23792 \
  --initial-cluster strata-demo=http://127.0.0.1:23792 > "$DIR/etcd.log" 2>&1 &
echo $! >> "$DIR/pids"
for _ in $(seq 100); do curl -fs "http://$ETCD/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "http://$ETCD/health" >/dev/null || { cat "$DIR/etcd.log"; exit 1; }

# A cluster CA of the demo's own (kept across re-runs), one certificate per node: replication
# between the engines is mutual TLS.
[ -f "$DIR/ca/ca.crt" ] || "$BIN/strata-engine" certs init --dir "$DIR/ca" >/dev/null
# The cluster's system key: the SDK takes only calls with a token signed by it (kept across re-runs).
[ -f "$DIR/system.key" ] || (umask 077; head -c 48 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DIR/system.key")
for i in 1 2 3; do
  n=$DIR/node-$i
  mkdir -p "$n"
  rm -f "$n/ready.json"
  [ -f "$n/tls/node.crt" ] || "$BIN/strata-engine" certs issue --ca-dir "$DIR/ca" --node-id "node-$i" --out "$n/tls" >/dev/null
  # node-1: NBD 10809, SDK 9020, metrics 9021, replication 9022; node-2: 10810, 9030...; node-3: 10811, 9040...
  "$BIN/strata-engine" --etcd "http://$ETCD" --node-id "node-$i" --data-dir "$n/data" --tls-dir "$n/tls" --auth-system-key-file "$DIR/system.key" \
    --device "$n/disk0.img" --device "$n/disk1.img" --device-size 2GiB \
    --nbd-listen "127.0.0.1:$((10808 + i))" --nbd-socket "$n/nbd.sock" \
    --sdk-listen "127.0.0.1:$((9010 + 10 * i))" --metrics-listen "127.0.0.1:$((9011 + 10 * i))" \
    --repl-listen "127.0.0.1:$((9012 + 10 * i))" --ready-file "$n/ready.json" > "$n/engine.log" 2>&1 &
  echo $! >> "$DIR/pids"
done
for i in 1 2 3; do
  for _ in $(seq 100); do [ -f "$DIR/node-$i/ready.json" ] && break; sleep 0.1; done
  [ -f "$DIR/node-$i/ready.json" ] || { cat "$DIR/node-$i/engine.log"; exit 1; }
done

export STRATA_ENDPOINT=127.0.0.1:9020
# The engines serve their SDK over TLS (they have certificates): stratactl checks it against the CA.
export STRATA_CA_FILE="$DIR/ca/ca.crt"
CTL="$BIN/stratactl"
# An admin token for this demo (a day long); users get `--role user` tokens and own what they make.
(umask 077; $CTL auth token --key-file "$DIR/system.key" --subject admin --role admin --ttl 24h > "$DIR/admin.token")
export STRATA_TOKEN="$(cat "$DIR/admin.token")"
$CTL volume inspect demo >/dev/null 2>&1 || $CTL volume create demo --size 1GiB --repl 3 --label app=demo
qemu-io -f raw -c 'write -P 0x5a 0 16M' -c 'read -P 0x5a 0 16M' "nbd://127.0.0.1:10809/demo" | grep -E '^(wrote|read)'
$CTL status
$CTL volume inspect demo
echo
echo "Strata is running: etcd on $ETCD and three engines (logs in $DIR/node-*/engine.log)."
echo "Volume demo (repl 3) is served by node-1: nbd://127.0.0.1:10809/demo or nbd+unix:///demo?socket=$DIR/node-1/nbd.sock"
echo "The SDK is TLS with tokens: export STRATA_CA_FILE=$DIR/ca/ca.crt STRATA_TOKEN=\$(cat $DIR/admin.token) (an admin's),"
echo "or mint others with"
echo "  $CTL auth token --key-file $DIR/system.key --subject alice --role user"
echo "Try: $CTL volume list; $CTL cluster list; kill one engine and watch 'volume inspect demo'."
echo "Stop everything with: kill \$(cat $DIR/pids)"
