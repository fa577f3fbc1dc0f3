# Sourced by every scenario inside the guest (e2e/vm/init runs the job's run.sh, which sets BIN,
# the host's target directory, then sources this file and the scenario). Everything the
# scenario makes lives under $W, a tmpfs of the guest.
set -eu
W=/tmp/strata-vm
mkdir -p "$W"
STEP=start
step() { STEP=$*; echo "== $STEP"; }
fail() { echo "FAIL ($STEP): $*"; dump; exit 1; }
dump() {
  for f in "$W"/engine*.log "$W"/csi.log "$W"/csi-state/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -n 30 "$f"; }; done
  echo "--- dmesg"; dmesg | tail -n 30
}
trap 'rc=$?; [ $rc -eq 0 ] || { echo "FAIL ($STEP): exit $rc"; dump; }' EXIT

wait_for() { # what, seconds, test command...
  what=$1; secs=$2; shift 2
  i=0
  while ! "$@" 2>/dev/null; do
    i=$((i + 1)); [ $i -lt $((secs * 10)) ] || fail "$what did not happen within ${secs}s"
    sleep 0.1
  done
}

ENGINE_PID=
CSI_PID=
start_engine() { # engine binary (default: $BIN/strata-engine)
  rm -f "$W/ready.json"
  "${1:-$BIN/strata-engine}" --data-dir "$W/data" --device "$W/pool.img" --device-size 1GiB --node-id vm \
    --nbd-socket "$W/nbd.sock" --ready-file "$W/ready.json" >>"$W/engine.log" 2>&1 &
  ENGINE_PID=$!
  wait_for "the engine's start" 60 test -f "$W/ready.json"
}

start_csi() { # extra strata-csi flags...
  rm -f "$W/csi.sock"
  "$BIN/strata-csi" --mode node --endpoint "unix://$W/csi.sock" --node-id vm --nbd-socket "$W/nbd.sock" \
    --state-dir "$W/csi-state" "$@" >>"$W/csi.log" 2>&1 &
  CSI_PID=$!
  wait_for "the node plugin's start" 30 test -S "$W/csi.sock"
}

ctl() { "$BIN/stratactl" "$@"; }
csc() { "$BIN/strata-csc" --endpoint "$W/csi.sock" "$@"; }

# The kernel devices this node uses: connected NBD devices and loop devices.
nbd_connected() { for d in /sys/block/nbd*; do [ -e "$d/pid" ] && echo "${d##*/}"; done; true; }
loops() { losetup -n -O NAME 2>/dev/null || true; }

restart_engine() {
  kill -9 "$ENGINE_PID"
  wait "$ENGINE_PID" 2>/dev/null || true
  sleep 2
  start_engine
}

# fio writes SIZE of a file on the mounted volume at PATH (64 KiB random writes, 4 MiB/s, checked
# with crc32c and read back at the end) while ACTION runs after 3 s; fails unless fio saw no error
# and the kernel logged no I/O error.
write_through() { # path size action...
  f=$1 sz=$2
  shift 2
  fio --name=through --filename="$f" --size="$sz" --bs=64k --rw=randwrite --direct=1 --ioengine=psync \
    --rate=4m --verify=crc32c --verify_fatal=1 --do_verify=1 --output="$W/fio.out" &
  FIO=$!
  sleep 3
  kill -0 $FIO || fail "fio ended before: $*"
  "$@"
  wait $FIO || { cat "$W/fio.out"; fail "fio failed"; }
  grep -q "err= 0" "$W/fio.out" || { cat "$W/fio.out"; fail "fio reported errors"; }
  grep -E "err=|WRITE:|READ:" "$W/fio.out"
  if dmesg | grep -i "I/O error"; then fail "the kernel logged I/O errors"; fi
}

# The same while the engine is killed (SIGKILL) and started again 2 s later.
write_through_engine_restart() { # path size
  write_through "$1" "$2" restart_engine
}

# An engine upgrade under the same write load: SIGTERM (a graceful stop: requests it no longer
# serves get no error, their connections close) and a start from another binary.
stop_and_start_next_engine() {
  cp "$BIN/strata-engine" "$W/strata-engine-next"
  kill -TERM "$ENGINE_PID"
  wait "$ENGINE_PID" 2>/dev/null || true
  start_engine "$W/strata-engine-next"
}
upgrade_engine() { # path size
  write_through "$1" "$2" stop_and_start_next_engine
  grep -q "strata-engine-next" /proc/"$ENGINE_PID"/cmdline || fail "the engine was not started from the new binary"
}

# The lifecycle scenarios' second half: an xfs volume staged, written and unstaged; a raw block
# volume published, written through and read back ($W/data.bin: 8 MiB), unpublished, unstaged.
xfs_and_raw_block() {
  step "xfs: stage, write, unstage"
  ctl volume create xfsvol --size 512MiB >/dev/null
  csc stage xfsvol "$W/st2" --fs xfs
  [ "$(findmnt -n -o FSTYPE "$W/st2")" = xfs ] || fail "not xfs"
  cp "$W/data.bin" "$W/st2/data.bin"
  sync
  csc unstage xfsvol "$W/st2"
  step "raw block: publish, write, read back"
  ctl volume create rawvol --size 64MiB >/dev/null
  csc stage rawvol "$W/st3" --block
  csc publish rawvol "$W/st3" "$W/pod3" --block
  dd if="$W/data.bin" of="$W/pod3" bs=1M oflag=direct status=none
  cmp -n 8388608 "$W/data.bin" "$W/pod3" || fail "raw block read back differs"
  csc unpublish rawvol "$W/pod3"
  csc unstage rawvol "$W/st3"
}
