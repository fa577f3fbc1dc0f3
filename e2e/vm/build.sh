#!/usr/bin/env bash
# Builds what the VM test tier boots: Debian's backports kernel (it has nbd.ko and ublk_drv.ko;
# bookworm's own 6.1 has no ublk) and a busybox initrd holding the modules the scenarios need.
# Everything comes from Debian's registry and is cached in $STRATA_VM_CACHE (default
# /var/cache/strata-vm): the second run only checks. Prints the cache directory.
#
# The guest gets the host's root read-only over 9p and runs the host's binaries in a chroot
# (e2e/vm/init), so nothing but the kernel and the modules is built here.
set -euo pipefail
cache=${STRATA_VM_CACHE:-/var/cache/strata-vm}
mkdir -p "$cache"
here=$(cd "$(dirname "$0")" && pwd)

need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
# Static: the initrd has no libc.
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed" || need_apt+=(busybox-static)
command -v cpio >/dev/null || need_apt+=(cpio)
command -v strings >/dev/null || need_apt+=(binutils)
src=/etc/apt/sources.list.d/strata-backports.sources
if ! grep -rqs bookworm-backports /etc/apt/sources.list.d/ /etc/apt/sources.list; then
  cat >"$src" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -qq >&2
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  # qemu-system from backports: the machine's qemu-utils is backports' and breaks bookworm's.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports "${need_apt[@]}" >&2
fi

# The newest 6.12 kernel backports has (ublk user recovery needs >= 6.0).
kpkg=$(cat "$cache/kernel.pkg" 2>/dev/null || true)
if [ -z "$kpkg" ] || [ ! -f "$cache/vmlinuz" ]; then
  kpkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -1)
  [ -n "$kpkg" ] || { apt-get update -qq >&2; kpkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -1); }
  [ -n "$kpkg" ] || { echo "no linux-image-6.12.*+deb12-amd64-unsigned in bookworm-backports" >&2; exit 1; }
  tmp=$(mktemp -d "$cache/fetch.XXXX")
  (cd "$tmp" && apt-get download -qq "$kpkg" 2>/dev/null && dpkg-deb -x ./*.deb root)
  rm -rf "$cache/kernel"
  mv "$tmp/root" "$cache/kernel"
  rm -rf "$tmp"
  cp "$cache"/kernel/boot/vmlinuz-* "$cache/vmlinuz"
  echo "$kpkg" >"$cache/kernel.pkg"
  rm -f "$cache/initrd.gz"
fi
kv=$(ls "$cache/kernel/lib/modules")
mods="$cache/kernel/lib/modules/$kv"

stamp=$(cat "$here/init" "$0" | sha256sum | cut -c1-16)
if [ ! -f "$cache/initrd.gz" ] || [ "$(cat "$cache/initrd.stamp" 2>/dev/null)" != "$stamp" ]; then
  rd=$(mktemp -d "$cache/initrd.XXXX")
  mkdir -p "$rd"/{bin,dev,proc,sys,host,lib/modules/"$kv"}
  cp "$(command -v busybox)" "$rd/bin/busybox"
  for a in sh mount umount mkdir insmod chroot sleep cat echo poweroff reboot ip ifconfig route; do ln -s busybox "$rd/bin/$a"; done
  cp "$here/init" "$rd/init"
  chmod +x "$rd/init"
  # The modules the scenarios use and, in load order, what they depend on (from each module's
  # own modinfo `depends=`), decompressed: busybox's insmod takes plain ELF.
  order=()
  declare -A seen=()
  add() {
    local m=$1 f dep
    [ -n "${seen[$m]:-}" ] && return
    seen[$m]=1
    f=$(find "$mods/kernel" -name "$m.ko*" -print -quit)
    [ -n "$f" ] || f=$(find "$mods/kernel" -name "${m//_/-}.ko*" -print -quit)
    if [ -z "$f" ]; then
      grep -qE "/($m|${m//_/-})\.ko" "$mods/modules.builtin" && return
      echo "module $m not found in $kv" >&2; exit 1
    fi
    for dep in $(xzcat -f "$f" | strings | sed -n 's/^depends=//p' | tr ',' ' '); do add "$dep"; done
    xzcat -f "$f" >"$rd/lib/modules/$kv/$m.ko"
    order+=("$m")
  }
  # crc32c_generic first: libcrc32c (xfs) and ext4 want the crc32c algorithm, a soft dependency
  # that busybox's insmod cannot resolve.
  for m in crc32c_generic 9pnet_virtio 9p nbd ublk_drv loop fuse ext4 xfs virtio_net; do add "$m"; done
  printf '%s\n' "${order[@]}" >"$rd/lib/modules/$kv/load-order"
  (cd "$rd" && find . | cpio -o -H newc --quiet | gzip -1) >"$cache/initrd.gz.new"
  mv "$cache/initrd.gz.new" "$cache/initrd.gz"
  echo "$stamp" >"$cache/initrd.stamp"
  rm -rf "$rd"
fi
echo "$cache"
