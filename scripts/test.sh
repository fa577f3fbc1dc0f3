#!/usr/bin/env bash
# Installs what the tests need, builds the workspace once and runs every test with nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
cargo build --workspace --all-targets
cargo nextest run --workspace --profile ci "$@"
