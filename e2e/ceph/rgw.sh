#!/usr/bin/env bash
# A single-host Ceph with a RADOS Gateway, for tests: 1 monitor, 1 OSD (BlueStore on a sparse
# 2 GiB file), radosgw on 127.0.0.1:RGW_PORT, an S3 user (access key AKSTRATA, secret key
# SKSTRATA) and a bucket `backups`. Everything lives in DIR; the daemons' pid files are in
# DIR/run (kill them to stop). Exits once the bucket exists.
#   usage: e2e/ceph/rgw.sh DIR MON_PORT RGW_PORT
# Needs Debian's ceph-mon, ceph-osd, radosgw and s3cmd (scripts/deps.sh installs them).
set -euo pipefail
D=$1 MON_PORT=$2 RGW_PORT=$3
mkdir -p "$D"/mon "$D"/osd0 "$D"/run "$D"/log "$D"/rgw
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
osd data = $D/osd0
rgw data = $D/rgw
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 2147483648
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
ceph-authtool "$K" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap osd 'allow *' >/dev/null
ceph-authtool "$K" --gen-key -n client.rgw.x --cap mon 'allow rw' --cap osd 'allow rwx' >/dev/null
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null
ceph-mon "${C[@]}" -i a --mkfs --monmap "$D/monmap" --keyring "$K" 2>>"$D/log/setup.log"
ceph-mon "${C[@]}" -i a 2>>"$D/log/setup.log"
timeout 60 ceph "${C[@]}" osd create >/dev/null
ceph-osd "${C[@]}" -i 0 --mkfs 2>>"$D/log/setup.log"
ceph-osd "${C[@]}" -i 0 2>>"$D/log/setup.log"
timeout 90 radosgw "${C[@]}" -n client.rgw.x 2>>"$D/log/setup.log"
for _ in $(seq 1 120); do
  (exec 3<>"/dev/tcp/127.0.0.1/$RGW_PORT") 2>/dev/null && break
  sleep 0.5
done
timeout 60 radosgw-admin "${C[@]}" user create --uid strata --display-name strata --access-key AKSTRATA --secret-key SKSTRATA >/dev/null
S3=(s3cmd --host="127.0.0.1:$RGW_PORT" --host-bucket= --no-ssl --access_key=AKSTRATA --secret_key=SKSTRATA)
timeout 60 "${S3[@]}" mb s3://backups >/dev/null
