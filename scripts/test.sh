#!/usr/bin/env bash
# The test suite: formatting, lints, unit tests, and end-to-end tests on real node processes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

scripts/install-deps.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build binaries (the e2e tests start them as processes)"
cargo build --workspace --bins --locked
echo "== cargo test"
cargo test --workspace --locked
