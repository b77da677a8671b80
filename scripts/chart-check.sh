#!/usr/bin/env bash
# Lints the Helm chart and validates what it renders (and what the operator applies for the
# examples) against the Kubernetes schemas, offline. Python packages go to a venv under
# ~/.cache (installed once, reused).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

python="$(scripts/python-venv.sh | tail -n 1)"
cargo build -q --locked -p kvfleet-operator
KVFLEET_OPERATOR_BIN="$CARGO_TARGET_DIR/debug/kvfleet-operator" timeout 300 "$python" scripts/chart_check.py
