#!/usr/bin/env bash
# Lints the Helm chart and validates what it renders (and what the operator applies for the
# examples) against the Kubernetes schemas, offline. Python packages go to a venv under
# ~/.cache (installed once, reused).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

venv="${KVFLEET_VENV:-$HOME/.cache/kvfleet-venv}"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
# helm-sdkpy declares Python >= 3.12 but works on Debian 12's 3.11.
if ! "$venv/bin/python" -c "import helm_sdkpy, kubernetes_validate" 2>/dev/null; then
  "$venv/bin/pip" install -q --disable-pip-version-check --ignore-requires-python \
    "helm-sdkpy==0.1.32" "kubernetes-validate==1.37.0"
fi
cargo build -q --locked -p kvfleet-operator
KVFLEET_OPERATOR_BIN="$CARGO_TARGET_DIR/debug/kvfleet-operator" timeout 300 "$venv/bin/python" scripts/chart_check.py
