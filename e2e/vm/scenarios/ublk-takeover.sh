# The volume's target moves to another engine and back while the guest keeps its ublk device
# mounted and fio writes through it. Two engines (vm-a, whose node plugin staged the volume, and
# vm-b) on one etcd, repl 2. Under the load: vm-a's engine is killed (SIGKILL), vm-b takes the
# volume over (host attach --force: a new epoch that fences vm-a), vm-a's engine starts again and
# the volume is handed back to it (vm-b has no client). The helper's connection waits and resends
# throughout; fio sees no error and verifies every block, and both replicas end in sync.
etcd --name vm --data-dir "$W/etcd" --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster vm=http://127.0.0.1:2380 >"$W/etcd.log" 2>&1 &
wait_for "etcd's start" 60 curl -fs http://127.0.0.1:2379/health
A_PID=
start_node() { # node sdk-port nbd-port log
  mkdir -p "$W/$1"
  rm -f "$W/$1/ready.json"
  "$BIN/strata-engine" --etcd http://127.0.0.1:2379 --node-id "$1" --data-dir "$W/$1/data" --device "$W/$1/pool.img" \
    --device-size 1GiB --sdk-listen "127.0.0.1:$2" --nbd-listen "127.0.0.1:$3" --metrics-listen 127.0.0.1:0 \
    --repl-listen 127.0.0.1:0 --nbd-socket "$W/$1/nbd.sock" --ready-file "$W/$1/ready.json" --replica-io-timeout 1 >>"$W/$4" 2>&1 &
  NODE_PID=$!
  wait_for "the start of $1's engine" 60 test -f "$W/$1/ready.json"
}
start_node vm-a 9020 10809 engine.log
A_PID=$NODE_PID
start_node vm-b 9030 10819 engine-b.log
ctlb() { "$BIN/stratactl" --endpoint 127.0.0.1:9030 "$@"; }
target() { ctlb volume inspect vol --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["attached_node"])'; }
rm -f "$W/csi.sock"
"$BIN/strata-csi" --mode node --endpoint "unix://$W/csi.sock" --node-id vm-a --nbd-socket "$W/vm-a/nbd.sock" \
  --state-dir "$W/csi-state" --attach ublk >>"$W/csi.log" 2>&1 &
wait_for "the node plugin's start" 30 test -S "$W/csi.sock"
ctl volume create vol --size 256MiB --repl 2 >/dev/null
csc stage vol "$W/st" --fs ext4
csc publish vol "$W/st" "$W/pod"
[ "$(target)" = vm-a ] || fail "the volume is served by $(target), not vm-a"
takeover_and_back() {
  kill -9 "$A_PID"
  wait "$A_PID" 2>/dev/null || true
  ctlb host attach vol --node vm-b --force >/dev/null
  [ "$(target)" = vm-b ] || fail "vm-b did not take the volume over: $(target)"
  echo "vm-b took the volume over"
  sleep 3
  start_node vm-a 9020 10809 engine.log
  A_PID=$NODE_PID
  ctl host attach vol --node vm-a >/dev/null
  [ "$(target)" = vm-a ] || fail "the volume did not come back to vm-a: $(target)"
  echo "handed back to vm-a"
}
step "write while the target moves to vm-b and back"
write_through "$W/pod/f" 24M takeover_and_back
step "both replicas in sync"
in_sync() { timeout 10 "$BIN/stratactl" --endpoint 127.0.0.1:9030 volume inspect vol --json | python3 -c 'import json,sys; sys.exit(len(json.load(sys.stdin)["in_sync_nodes"]) != 2)'; }
wait_for "both replicas in sync" 60 in_sync
step "unpublish, unstage"
timeout 30 "$BIN/strata-csc" --endpoint "$W/csi.sock" unpublish vol "$W/pod" || fail "unpublish"
timeout 60 "$BIN/strata-csc" --endpoint "$W/csi.sock" unstage vol "$W/st" || fail "unstage"
[ -z "$(ls /sys/class/ublk-char 2>/dev/null)" ] || fail "ublk devices left: $(ls /sys/class/ublk-char)"
step "done"
echo "PASS"
