# Kernel NBD through an engine restart: fio writes (and later verifies) a file on a mounted ext4
# while the engine is killed with SIGKILL and started again, then while it is upgraded (SIGTERM and
# a start from another binary). The kernel holds the I/O, the node
# plugin's keeper reconnects, and fio sees no error and reads back every block it wrote.
start_engine
start_csi --attach kernel-nbd --nbd-io-timeout 5
ctl volume create vol --size 256MiB >/dev/null
csc stage vol "$W/st" --fs ext4
csc publish vol "$W/st" "$W/pod"
step "write under an engine restart"
write_through_engine_restart "$W/pod/f" 48M
grep -q "restored" "$W/csi.log" || fail "the keeper did not report restored connections"
grep -E "connections (lost|restored)" "$W/csi.log" | sed 's/^[^ ]* *//'
step "write under an engine upgrade (SIGTERM, then a new binary)"
upgrade_engine "$W/pod/g" 32M
step "after the restart: new writes, unstage"
head -c 4194304 /dev/urandom >"$W/after.bin"
cp "$W/after.bin" "$W/pod/after.bin" && sync
cmp "$W/after.bin" "$W/pod/after.bin" || fail "a write after the restart differs"
csc unpublish vol "$W/pod"
csc unstage vol "$W/st"
[ -z "$(nbd_connected)" ] || fail "NBD devices still connected: $(nbd_connected)"
step "done"
echo "PASS"
