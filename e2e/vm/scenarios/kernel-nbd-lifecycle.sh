# Kernel NBD through the node plugin: stage and publish with ext4 and xfs, write, grow online,
# raw block, and unstage leaves no mount and no connected device.
start_engine
start_csi --attach kernel-nbd
step "ext4: stage, publish, write"
ctl volume create fsvol --size 256MiB >/dev/null
csc stage fsvol "$W/st1" --fs ext4
csc stage fsvol "$W/st1" --fs ext4
csc publish fsvol "$W/st1" "$W/pod1"
dev=$(findmnt -n -o SOURCE "$W/st1")
case $dev in /dev/nbd*) ;; *) fail "staged on $dev, not an NBD device" ;; esac
[ "$(ls /sys/block/${dev#/dev/}/mq | wc -l)" -eq 2 ] || fail "$dev has not 2 queues"
[ "$(cat /sys/block/${dev#/dev/}/queue/logical_block_size)" -eq 512 ] || fail "$dev sectors are not 512 bytes"
head -c 8388608 /dev/urandom >"$W/data.bin"
cp "$W/data.bin" "$W/pod1/data.bin"
sync
step "ext4: grow online to 512 MiB"
ctl volume update fsvol --size 512MiB >/dev/null
csc expand fsvol "$W/pod1" "$W/st1" 536870912 >/dev/null
size=$(df -B1 --output=size "$W/pod1" | tail -1)
[ "$size" -gt 400000000 ] || fail "the filesystem is $size bytes after the expansion"
[ "$(cat /sys/block/${dev#/dev/}/size)" -eq 1048576 ] || fail "$dev did not grow"
step "ext4: unpublish, unstage, stage again, data intact"
csc unpublish fsvol "$W/pod1"
csc unstage fsvol "$W/st1"
csc unstage fsvol "$W/st1"
[ -z "$(nbd_connected)" ] || fail "NBD devices still connected after unstage: $(nbd_connected)"
findmnt "$W/st1" >/dev/null && fail "$W/st1 is still mounted"
csc stage fsvol "$W/st1" --fs ext4
csc publish fsvol "$W/st1" "$W/pod1"
cmp "$W/data.bin" "$W/pod1/data.bin" || fail "the file differs after a new stage"
csc unpublish fsvol "$W/pod1"
csc unstage fsvol "$W/st1"
xfs_and_raw_block
[ -z "$(nbd_connected)" ] || fail "NBD devices still connected at the end: $(nbd_connected)"
[ -z "$(findmnt -rn -o TARGET | grep "^$W" || true)" ] || fail "mounts left: $(findmnt -rn -o TARGET | grep "^$W")"
step "done"
echo "PASS"
