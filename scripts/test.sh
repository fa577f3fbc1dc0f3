#!/usr/bin/env bash
# Installs what the tests need (and the VM tier's kernel, e2e/vm/build.sh), builds the workspace once, runs every test with nextest, then a
# real `helm lint` of the chart (Helm's library through helm-sdkpy, in a venv), then builds and
# smoke-runs the container images (scripts/images.sh; STRATA_SKIP_IMAGES=1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
# One build, never rebuilt here: incremental state would only take disk.
export CARGO_INCREMENTAL=0
# CI's disk is small; say how much there is, so a full disk is seen as such.
df -h . "${TMPDIR:-/tmp}" | sed 's/^/disk: /'
./scripts/deps.sh
# The Docker volume plugin's test runs a real Docker Engine on a busybox image.
need=()
command -v dockerd >/dev/null || need+=(docker.io)
# Static: it is the whole of the test image (and of the VM tier's initrd).
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed" || need+=(busybox-static)
# The cloud snapshot tests' second S3 server: Ceph's RADOS Gateway on a one-host Ceph (e2e/ceph/start.sh).
for p in ceph-mon ceph-osd radosgw s3cmd; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The VM tier's guest: qemu and Debian's 6.12 kernel (nbd, ublk), fetched once and cached.
./e2e/vm/build.sh >/dev/null
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
# A real S3 server for the cloud-snapshot tests (the newest s3s-fs needs a newer rustc).
command -v s3s-fs >/dev/null || cargo install --locked s3s-fs --version 0.14.1 --features binary
# The tree stays clean: formatted (rustfmt.toml) and free of clippy warnings.
cargo fmt --all --check
cargo build --workspace --all-targets
cargo clippy --workspace --all-targets -- -D warnings
# One version each of the RPC stack (etcd-client is held at the release that shares our tonic).
if dup=$(cargo tree --workspace -d -e normal --locked 2>/dev/null | grep -E '^(tonic|prost|axum) v'); then
  echo "more than one version of: $dup" >&2
  exit 1
fi
cargo nextest run --workspace --profile ci "$@"
VENV=${STRATA_HELM_VENV:-/var/tmp/strata-helm-venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c 'import helm_sdkpy' 2>/dev/null || "$VENV/bin/pip" install -q --ignore-requires-python helm-sdkpy
"$VENV/bin/python" scripts/helm_lint.py charts/strata
# Both container images, built from the binaries above and smoke-run on a real Docker Engine.
[ "${STRATA_SKIP_IMAGES:-}" = 1 ] || ./scripts/images.sh
