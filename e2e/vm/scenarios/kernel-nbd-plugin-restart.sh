# The node plugin restarts (SIGKILL, as a container restart would) while a kernel NBD device is
# staged and mounted; the new plugin adopts the device. Then the engine is killed and restarted
# under a write load: the adopted device reconnects, fio sees no error and verifies every block,
# and the new plugin unstages it cleanly.
start_engine
start_csi --attach kernel-nbd --nbd-io-timeout 5
ctl volume create vol --size 256MiB >/dev/null
csc stage vol "$W/st" --fs ext4
csc publish vol "$W/st" "$W/pod"
step "restart the node plugin"
kill -9 "$CSI_PID"
wait "$CSI_PID" 2>/dev/null || true
start_csi --attach kernel-nbd --nbd-io-timeout 5
grep -q "adopted a device" "$W/csi.log" || fail "the new plugin did not adopt the staged device"
step "write under an engine restart"
write_through_engine_restart "$W/pod/f" 32M
grep -q "offered the kernel new NBD connections (adopted device)" "$W/csi.log" || fail "the adopted device was not reconnected"
grep -E "adopted" "$W/csi.log" | sed 's/^[^ ]* *//'
step "the new plugin unstages"
csc unpublish vol "$W/pod"
csc unstage vol "$W/st"
[ -z "$(nbd_connected)" ] || fail "NBD devices still connected: $(nbd_connected)"
step "done"
echo "PASS"
