#!/usr/bin/env bash
# The test suite: formatting, lints, unit tests, end-to-end tests on real node processes and
# against a real Kubernetes API server (built from Debian's sources, cached), and the Helm
# chart check.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

scripts/install-deps.sh
echo "== a real Kubernetes control plane for the operator's tests (built once, cached)"
KVFLEET_K8S_BIN="$(scripts/control-plane.sh | tail -n 1)"
# Helm's library installs the chart into that control plane (and checks it, below).
KVFLEET_PYTHON="$(scripts/python-venv.sh | tail -n 1)"
export KVFLEET_K8S_BIN KVFLEET_PYTHON
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build binaries (the e2e tests start them as processes)"
cargo build --workspace --bins --locked
echo "== cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "== dependency rules (docs/architecture.md: what must never depend on what)"
scripts/dependency-rules.sh || status=1
echo "== Helm chart: lint, and rendered manifests against the Kubernetes schemas"
scripts/chart-check.sh
chart_status=$?
# One closing line for the whole run (cargo prints one per test binary, the last often empty).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
if ((chart_status != 0)); then echo "chart check failed"; fi
exit $((status != 0 ? status : chart_status))
