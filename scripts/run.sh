#!/usr/bin/env bash
# The local playground: installs build dependencies, builds, and runs a 3-node kvfleet fleet with
# its resharding controller on loopback, with a live view of nodes, ranges and moves. Ctrl-C stops
# everything; the data stays in ./data/playground for the next run. Extra arguments go to
# `kvfleet-operator playground` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

scripts/install-deps.sh
cargo build --workspace --bins --locked
bin="$CARGO_TARGET_DIR/debug"
echo "kvctl is $bin/kvctl; in another terminal, load the fleet with:"
echo "  $bin/kvctl bench --workload a --distribution zipfian --records 20000 --concurrency 16 --duration 120"
exec "$bin/kvfleet-operator" playground --nodes 3 --dir "${KVFLEET_PLAYGROUND_DIR:-$PWD/data/playground}" "$@"
