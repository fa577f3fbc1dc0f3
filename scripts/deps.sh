#!/usr/bin/env bash
# Installs the system packages Strata's build and tests need (Debian bookworm). Idempotent.
set -euo pipefail
PKGS=(protobuf-compiler qemu-utils libnbd-bin nbdkit fio e2fsprogs xfsprogs fuse3 etcd-server python3 python3-venv curl)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
