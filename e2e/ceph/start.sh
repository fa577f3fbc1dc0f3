#!/usr/bin/env bash
# A single-host Ceph for tests and benchmarks: 1 monitor and CEPH_OSDS OSDs (default 1; BlueStore,
# each on a sparse file of CEPH_OSD_SIZE bytes, default 2 GiB), on loopback. With RGW_PORT, also
# radosgw on 127.0.0.1:RGW_PORT with an S3 user (access key AKSTRATA, secret key SKSTRATA) and a
# bucket `backups`. Pools default to one copy per OSD (size = CEPH_OSDS, at most 3). Everything
# lives in DIR (`DIR/ceph.conf` for clients); the daemons' pid files are in DIR/run (kill them to
# stop). Exits once the cluster (and the bucket) is ready.
#   usage: e2e/ceph/start.sh DIR MON_PORT [RGW_PORT]
# Needs Debian's ceph-mon, ceph-osd, and for the gateway radosgw and s3cmd (scripts/test.sh
# installs them).
set -euo pipefail
D=$1 MON_PORT=$2 RGW_PORT=${3:-}
# A daemon that refuses to start often says nothing on stderr: name the step and the disk it ran on.
trap 'rc=$?; echo "e2e/ceph/start.sh: \"$BASH_COMMAND\" failed with exit code $rc (28 is ENOSPC); free space in $D:" >&2; df -h "$D" >&2' ERR
OSDS=${CEPH_OSDS:-1}
SIZE=$(( OSDS < 3 ? OSDS : 3 ))
mkdir -p "$D"/mon "$D"/run "$D"/log "$D"/rgw
FSID=$(cat /proc/sys/kernel/random/uuid)
cat >"$D/ceph.conf" <<CONF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MON_PORT
public addr = 127.0.0.1
ms bind ipv6 = false
keyring = $D/keyring
run dir = $D/run
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
log file = $D/log/\$name.log
mon data = $D/mon
osd data = $D/osd\$id
rgw data = $D/rgw
osd pool default size = $SIZE
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
# a test machine's disk may be nearly full (CI's had under 1% free): the monitor must not refuse to
# start; it refuses when the free percentage is <= this, so 0 still refuses below 1%
mon data avail crit = -1
mon data avail warn = -1
osd objectstore = bluestore
bluestore block create = true
bluestore block size = ${CEPH_OSD_SIZE:-2147483648}
bluestore cache size = 134217728
bluestore fsck on mkfs = false
osd memory target = 536870912
[client.rgw.x]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
CONF
C=(-c "$D/ceph.conf")
K="$D/keyring"
ceph-authtool --create-keyring "$K" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$K" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
for i in $(seq 0 $((OSDS - 1))); do
  ceph-authtool "$K" --gen-key -n "osd.$i" --cap mon 'allow profile osd' --cap osd 'allow *' >/dev/null
done
ceph-authtool "$K" --gen-key -n client.rgw.x --cap mon 'allow rw' --cap osd 'allow rwx' >/dev/null
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null
ceph-mon "${C[@]}" -i a --mkfs --monmap "$D/monmap" --keyring "$K" 2>>"$D/log/setup.log"
ceph-mon "${C[@]}" -i a 2>>"$D/log/setup.log"
for i in $(seq 0 $((OSDS - 1))); do
  mkdir -p "$D/osd$i"
  timeout 60 ceph "${C[@]}" osd create >/dev/null
  ceph-osd "${C[@]}" -i "$i" --mkfs 2>>"$D/log/setup.log"
  ceph-osd "${C[@]}" -i "$i" 2>>"$D/log/setup.log"
done
for _ in $(seq 1 120); do
  [ "$(timeout 10 ceph "${C[@]}" osd stat -f json 2>/dev/null | python3 -c 'import json,sys;print(json.load(sys.stdin)["num_up_osds"])' 2>/dev/null)" = "$OSDS" ] && break
  sleep 0.5
done
[ -n "$RGW_PORT" ] || exit 0
timeout 90 radosgw "${C[@]}" -n client.rgw.x 2>>"$D/log/setup.log"
for _ in $(seq 1 120); do
  (exec 3<>"/dev/tcp/127.0.0.1/$RGW_PORT") 2>/dev/null && break
  sleep 0.5
done
timeout 60 radosgw-admin "${C[@]}" user create --uid strata --display-name strata --access-key AKSTRATA --secret-key SKSTRATA >/dev/null
S3=(s3cmd --host="127.0.0.1:$RGW_PORT" --host-bucket= --no-ssl --access_key=AKSTRATA --secret_key=SKSTRATA)
timeout 60 "${S3[@]}" mb s3://backups >/dev/null
