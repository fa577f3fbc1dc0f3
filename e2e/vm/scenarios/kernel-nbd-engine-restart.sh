# Kernel NBD through an engine restart: fio writes (and later verifies) a file on a mounted ext4
# while the engine is killed with SIGKILL and started again (optionally from another binary, as
# an upgrade would). The kernel holds the I/O, the node plugin's keeper reconnects, and fio sees
# no error and reads back every block it wrote.
start_engine
start_csi --attach kernel-nbd --nbd-io-timeout 5
ctl volume create vol --size 256MiB >/dev/null
csc stage vol "$W/st" --fs ext4
csc publish vol "$W/st" "$W/pod"
step "write under an engine restart"
fio --name=restart --filename="$W/pod/f" --size=48M --bs=64k --rw=randwrite --direct=1 --ioengine=psync \
  --rate=4m --verify=crc32c --verify_fatal=1 --do_verify=1 --output="$W/fio.out" &
FIO=$!
sleep 4
kill -0 $FIO || fail "fio ended before the restart"
kill -9 "$ENGINE_PID"
wait "$ENGINE_PID" 2>/dev/null || true
sleep 2
start_engine "${NEW_ENGINE:-}"
wait $FIO || { cat "$W/fio.out"; fail "fio failed"; }
grep -q "err= 0" "$W/fio.out" || { cat "$W/fio.out"; fail "fio reported errors"; }
grep -q "restored" "$W/csi.log" || fail "the keeper did not report restored connections"
grep -E "connections (lost|restored)" "$W/csi.log" | sed 's/^[^ ]* *//'
grep -E "err=|WRITE:|READ:" "$W/fio.out"
dmesg | grep -i "I/O error" && fail "the kernel logged I/O errors"
step "after the restart: new writes, unstage"
head -c 4194304 /dev/urandom >"$W/after.bin"
cp "$W/after.bin" "$W/pod/after.bin" && sync
cmp "$W/after.bin" "$W/pod/after.bin" || fail "a write after the restart differs"
csc unpublish vol "$W/pod"
csc unstage vol "$W/st"
[ -z "$(nbd_connected)" ] || fail "NBD devices still connected: $(nbd_connected)"
step "done"
echo "PASS"
