#!/usr/bin/env bash
# The Kubernetes e2e suite on a local kind cluster, in one command. Needs docker, kind, kubectl
# and helm (not available on the CI machines: there the suite skips itself).
#   scripts/e2e-kind.sh            create (or reuse) kind cluster "kvfleet", build and load the
#                                  images, run e2e/tests/kubernetes.rs
#   KVFLEET_E2E_KEEP=1 ...         leave the test namespace in place to look around
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "e2e-kind: $tool is not installed" >&2; exit 1; }
done
scripts/install-deps.sh

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
node_image="ghcr.io/kvfleet/kvfleet-node:$version"
operator_image="ghcr.io/kvfleet/kvfleet-operator:$version"
echo "== building $node_image and $operator_image"
docker build -f docker/Dockerfile --target node -t "$node_image" .
docker build -f docker/Dockerfile --target operator -t "$operator_image" .

if ! kind get clusters | grep -qx kvfleet; then
  echo "== creating kind cluster kvfleet"
  kind create cluster --name kvfleet --wait 120s
fi
kind load docker-image --name kvfleet "$node_image" "$operator_image"
export KUBECONFIG="${KUBECONFIG:-$HOME/.kube/config}"
kubectl config use-context kind-kvfleet >/dev/null

echo "== e2e/tests/kubernetes.rs"
KVFLEET_NODE_IMAGE="$node_image" KVFLEET_OPERATOR_IMAGE="$operator_image" \
  cargo test -p kvfleet-e2e --test kubernetes -- --include-ignored --nocapture
