#!/usr/bin/env bash
# The Python the chart tools run with: a venv under ~/.cache with helm-sdkpy (Helm's own library)
# and kubernetes-validate, installed once and reused. Prints the venv's python on the last line.
set -euo pipefail

venv="${KVFLEET_VENV:-$HOME/.cache/kvfleet-venv}"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv" >&2
fi
# helm-sdkpy declares Python >= 3.12 but works on Debian 12's 3.11.
if ! "$venv/bin/python" -c "import helm_sdkpy, kubernetes_validate" 2>/dev/null; then
  "$venv/bin/pip" install -q --disable-pip-version-check --ignore-requires-python \
    "helm-sdkpy==0.1.32" "kubernetes-validate==1.37.0" >&2
fi
echo "$venv/bin/python"
