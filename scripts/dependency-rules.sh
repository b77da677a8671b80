#!/usr/bin/env bash
# What must never depend on what (docs/architecture.md, "Crates"): checked on the resolved
# dependency graph, and no module cycles inside the crates that must stay layered.
set -euo pipefail
cd "$(dirname "$0")/.."

failed=0
# forbid <crate> <dependency>...: none of the dependencies may be in the crate's normal tree.
forbid() {
  local crate=$1
  shift
  local tree
  tree="$(cargo tree --locked --offline -p "$crate" -e normal --prefix none --format '{p}' | sed 's/ v[0-9].*//' | sort -u)"
  for dependency in "$@"; do
    if grep -qx -- "$dependency" <<<"$tree"; then
      echo "dependency rule broken: $crate depends on $dependency"
      failed=1
    fi
  done
}
forbid kvfleet-planner kvfleet-proto tokio tonic kube
forbid kvfleet-resharding kube k8s-openapi clap kvfleet-operator
forbid kvfleet-client clap redis indicatif comfy-table hdrhistogram mimalloc
forbid kvfleet-operator redis hdrhistogram indicatif kvctl
forbid kvfleet-node kube k8s-openapi kvfleet-resharding kvfleet-planner
forbid kvfleet-replication kube k8s-openapi clap tonic kvfleet-proto

# The node's node.rs/moves.rs pair is one type over two files (left to the replication work).
python3 scripts/module_cycles.py operator/src resharding/src replication/src client/src planner/src kvctl/src view/src proto/src || failed=1

if ((failed)); then exit 1; fi
echo "dependency rules: ok"
