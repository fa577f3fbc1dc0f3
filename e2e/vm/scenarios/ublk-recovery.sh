# ublk through everything that can die under a mounted filesystem: the engine (SIGKILL and
# restart, and an upgrade: SIGTERM and a start from another binary; the helper's connection
# reconnects), the ublk helper itself (SIGKILL: the kernel holds
# the device's I/O and the plugin's keeper starts a helper that takes the device over), and the
# node plugin (SIGKILL: the helper keeps serving; the new plugin watches the device and recovers
# it when its helper dies). fio writes through each and verifies every block; no I/O error.
start_engine
start_csi --attach ublk
ctl volume create vol --size 256MiB >/dev/null
csc stage vol "$W/st" --fs ext4
csc publish vol "$W/st" "$W/pod"
helper() { cut -d' ' -f2 "$W/csi-state/vol.ublk"; }
kill_helper() {
  old=$(helper)
  kill -9 "$old"
  wait_for "a new ublk helper" 30 sh -c "[ \"\$(cut -d' ' -f2 $W/csi-state/vol.ublk)\" != $old ]"
}
step "write under an engine restart"
write_through "$W/pod/f1" 16M restart_engine
step "write under an engine upgrade (SIGTERM, then a new binary)"
upgrade_engine "$W/pod/f0" 16M
step "write while the ublk helper is killed"
write_through "$W/pod/f2" 16M kill_helper
grep -q "took over /dev/ublkb" "$W/csi-state/vol.ublk.log" || fail "the new helper did not report the takeover"
grep -E "recovered|is gone" "$W/csi.log" | sed 's/^[^ ]* *//'
step "restart the node plugin, then kill the helper"
kill -9 "$CSI_PID"
wait "$CSI_PID" 2>/dev/null || true
kill -0 "$(helper)" || fail "the helper died with the node plugin"
start_csi --attach ublk
grep -q "watching the ublk device a previous run staged" "$W/csi.log" || fail "the new plugin does not watch the staged device"
write_through "$W/pod/f3" 16M kill_helper
step "the new plugin unstages"
csc unpublish vol "$W/pod"
csc unstage vol "$W/st"
[ -z "$(ls /sys/class/ublk-char 2>/dev/null)" ] || fail "ublk devices left: $(ls /sys/class/ublk-char)"
pgrep -f "ublk-disk" >/dev/null && fail "a ublk helper still runs"
step "done"
echo "PASS"
