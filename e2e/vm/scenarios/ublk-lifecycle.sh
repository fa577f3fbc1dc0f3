# ublk through the node plugin: stage and publish with ext4 and xfs, write, discard, expand (online
# where the kernel's ublk can resize; else a clear refusal and the new size at the next stage),
# raw block, and unstage leaves no mount and no ublk device.
start_engine
start_csi --attach ublk
ublk_devs() { ls /sys/class/ublk-char 2>/dev/null || true; }
step "ext4: stage, publish, write, discard"
ctl volume create fsvol --size 256MiB >/dev/null
csc stage fsvol "$W/st1" --fs ext4
csc stage fsvol "$W/st1" --fs ext4
csc publish fsvol "$W/st1" "$W/pod1"
dev=$(findmnt -n -o SOURCE "$W/st1")
case $dev in /dev/ublkb*) ;; *) fail "staged on $dev, not a ublk device" ;; esac
[ "$(ls /sys/block/${dev#/dev/}/mq | wc -l)" -eq 2 ] || fail "$dev has not 2 queues"
[ "$(cat /sys/block/${dev#/dev/}/queue/logical_block_size)" -eq 512 ] || fail "$dev sectors are not 512 bytes"
pgrep -f "ublk-disk --export fsvol" >/dev/null || fail "no ublk helper runs for fsvol"
head -c 8388608 /dev/urandom >"$W/data.bin"
cp "$W/data.bin" "$W/pod1/data.bin"
sync
head -c 16777216 /dev/zero >"$W/pod1/gone.bin" && sync && rm "$W/pod1/gone.bin"
fstrim -v "$W/pod1" || fail "fstrim failed (discard)"
step "ext4: expand to 512 MiB"
ctl volume update fsvol --size 512MiB >/dev/null
if csc expand fsvol "$W/pod1" "$W/st1" 536870912 >"$W/expand.out" 2>&1; then
  [ "$(cat /sys/block/${dev#/dev/}/size)" -eq 1048576 ] || fail "$dev did not grow"
  grown_online=1
else
  grep -q "cannot change a live device's size" "$W/expand.out" || { cat "$W/expand.out"; fail "expand failed without the reason"; }
  echo "this kernel cannot resize a live ublk device: $(cat "$W/expand.out" | tail -1)"
  grown_online=0
fi
step "ext4: unpublish, unstage, stage again, data intact"
csc unpublish fsvol "$W/pod1"
csc unstage fsvol "$W/st1"
csc unstage fsvol "$W/st1"
[ -z "$(ublk_devs)" ] || fail "ublk devices left after unstage: $(ublk_devs)"
pgrep -f "ublk-disk --export fsvol" >/dev/null && fail "the ublk helper still runs"
findmnt "$W/st1" >/dev/null && fail "$W/st1 is still mounted"
csc stage fsvol "$W/st1" --fs ext4
csc publish fsvol "$W/st1" "$W/pod1"
cmp "$W/data.bin" "$W/pod1/data.bin" || fail "the file differs after a new stage"
dev=$(findmnt -n -o SOURCE "$W/st1")
[ "$(cat /sys/block/${dev#/dev/}/size)" -eq 1048576 ] || fail "$dev is not 512 MiB after the new stage"
if [ $grown_online = 0 ]; then
  # What the kubelet does with a resize still pending: expand again; the device has the size now.
  csc expand fsvol "$W/pod1" "$W/st1" 536870912 >/dev/null || fail "the second expand failed"
fi
size=$(df -B1 --output=size "$W/pod1" | tail -1)
[ "$size" -gt 400000000 ] || fail "the filesystem is $size bytes after the expansion"
csc unpublish fsvol "$W/pod1"
csc unstage fsvol "$W/st1"
xfs_and_raw_block
[ -z "$(ublk_devs)" ] || fail "ublk devices left at the end: $(ublk_devs)"
[ -z "$(findmnt -rn -o TARGET | grep "^$W" || true)" ] || fail "mounts left: $(findmnt -rn -o TARGET | grep "^$W")"
step "done"
echo "PASS"
