#!/usr/bin/env bash
# Builds the two container images from binaries built on this machine and smoke-runs them on a
# real Docker Engine (Debian's docker.io). No image can be pulled here, so the base image is made
# from Debian's packages (debootstrap) and imported (`docker import`), then both Dockerfiles build
# FROM it. Tags are the ones the chart's defaults expect:
#   ghcr.io/strata-storage/strata:<appVersion> and ghcr.io/strata-storage/strata-operator:<appVersion>.
#
#   ./scripts/images.sh            # debug binaries (what the tests built)
#   PROFILE=release ./scripts/images.sh
#
# Containers run with --network none or --network host and talk only to loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-debug}
VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/strata/Chart.yaml)
REPO=ghcr.io/strata-storage
BASE=strata-base:bookworm
CACHE=${STRATA_IMAGE_CACHE:-/var/tmp/strata-images}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian's client, matching Debian's daemon.
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=docker

started=""
if ! $DOCKER info >/dev/null 2>&1; then
  # No bridge or iptables: the containers use --network none or host only.
  $SUDO dockerd --bridge=none --iptables=false --ip6tables=false >"$CACHE.dockerd.log" 2>&1 &
  started=$!
  for _ in $(seq 1 60); do $DOCKER info >/dev/null 2>&1 && break; sleep 0.5; done
  $DOCKER info >/dev/null 2>&1 || { echo "dockerd did not start:"; tail -20 "$CACHE.dockerd.log"; exit 1; }
fi
cleanup() {
  [ -n "${smoke:-}" ] && $DOCKER rm -f "$smoke" >/dev/null 2>&1 || true
  [ -n "${work:-}" ] && rm -rf "$work"
  [ -n "$started" ] && { $SUDO kill "$started" 2>/dev/null || true; wait "$started" 2>/dev/null || true; }
}
trap cleanup EXIT

# The base: a minimal Debian with what the CSI node plugin calls (losetup, mkfs, mount, FUSE).
if ! $DOCKER image inspect "$BASE" >/dev/null 2>&1; then
  mkdir -p "$CACHE"
  if [ ! -s "$CACHE/base.tar" ]; then
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    rm -rf "$CACHE/rootfs"
    $SUDO debootstrap --variant=minbase \
      --include=e2fsprogs,xfsprogs,util-linux,mount,fuse3,libnbd-bin,ca-certificates \
      bookworm "$CACHE/rootfs" "${mirror:-http://deb.debian.org/debian}" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
    $SUDO rm -rf "$CACHE/rootfs/var/cache/apt/archives/"*.deb "$CACHE/rootfs/var/lib/apt/lists/"*
    $SUDO tar -C "$CACHE/rootfs" -cf "$CACHE/base.tar" .
    $SUDO rm -rf "$CACHE/rootfs"
  fi
  $DOCKER import "$CACHE/base.tar" "$BASE" >/dev/null
fi

# Build contexts hold only the binaries (the repository's target/ is not sent to the daemon).
[ -x "target/$PROFILE/strata-engine" ] || cargo build --profile "$([ "$PROFILE" = debug ] && echo dev || echo "$PROFILE")" \
  -p strata-engine -p strata-csi -p strata-stork -p stratactl -p strata-operator
work=$(mktemp -d)
mkdir -p "$work/node/bin" "$work/operator/bin"
cp "target/$PROFILE/"{strata-engine,strata-csi,strata-stork,stratactl} "$work/node/bin/"
cp "target/$PROFILE/"{strata-operator,crdgen} "$work/operator/bin/"
$DOCKER build -q --network none --build-arg "BASE=$BASE" -f deploy/docker/Dockerfile -t "$REPO/strata:$VERSION" "$work/node" >/dev/null
$DOCKER build -q --network none --build-arg "BASE=$BASE" -f deploy/docker/Dockerfile.operator -t "$REPO/strata-operator:$VERSION" "$work/operator" >/dev/null
echo "built $REPO/strata:$VERSION and $REPO/strata-operator:$VERSION ($PROFILE binaries)"

passed=0
failed=0
check() { # name, command...
  local name=$1; shift
  if out=$("$@" 2>&1); then
    passed=$((passed + 1)); echo "ok: $name"
  else
    failed=$((failed + 1)); echo "FAILED: $name"; echo "$out" | tail -20
  fi
}
for bin in strata-engine strata-csi strata-stork stratactl; do
  check "$bin --version in the node image" $DOCKER run --rm --network none "$REPO/strata:$VERSION" "$bin" --version
done
check "strata-operator --version in the operator image (as its non-root user)" $DOCKER run --rm --network none "$REPO/strata-operator:$VERSION" --version
check "the node image has the node plugin's tools" $DOCKER run --rm --network none "$REPO/strata:$VERSION" sh -c 'command -v losetup mkfs.ext4 mkfs.xfs resize2fs xfs_growfs mount fusermount3 blkid'

# An engine on a file device, on host networking (loopback ports only), answering /healthz and
# serving its SDK to the image's stratactl.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sdk=$(port); met=$(port); nbd=$(port); repl=$(port)
smoke=strata-smoke-$$
$DOCKER run -d --name "$smoke" --network host --tmpfs /data "$REPO/strata:$VERSION" \
  strata-engine --data-dir /data --device /data/disk0.img --device-size 256MiB --node-id smoke \
  --sdk-listen "127.0.0.1:$sdk" --metrics-listen "127.0.0.1:$met" --nbd-listen "127.0.0.1:$nbd" --repl-listen "127.0.0.1:$repl" >/dev/null
healthy() { for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$met/healthz" >/dev/null 2>&1 && return 0; sleep 0.2; done; $DOCKER logs "$smoke" | tail -20; return 1; }
check "an engine in the node image answers /healthz" healthy
check "stratactl in the image creates a volume through the engine's SDK" $DOCKER run --rm --network host "$REPO/strata:$VERSION" \
  stratactl --endpoint "127.0.0.1:$sdk" volume create smoke-vol --size 64MiB
echo "images: $passed checks ok, $failed failed"
[ "$failed" -eq 0 ]
