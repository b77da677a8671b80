#!/usr/bin/env bash
# Local demo until the playground lands: starts one kvfleet-node, drives it with kvctl (writes,
# reads, a split, a short benchmark, status), then keeps the node running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

scripts/install-deps.sh
cargo build --workspace --bins --locked
bin="$CARGO_TARGET_DIR/debug"
data_dir="${KVFLEET_DATA_DIR:-$PWD/data/node-1}"
listen="${KVFLEET_LISTEN:-127.0.0.1:7700}"
export KVFLEET_ENDPOINTS="$listen"

"$bin/kvfleet-node" --node-id node-1 --data-dir "$data_dir" --listen "$listen" \
  --metrics-listen 127.0.0.1:9700 --bootstrap &
node_pid=$!
trap 'kill -TERM $node_pid 2>/dev/null; wait $node_pid 2>/dev/null || true' EXIT INT TERM

for _ in $(seq 1 100); do
  "$bin/kvctl" ranges --timeout 0.2 >/dev/null 2>&1 && break
  sleep 0.1
done

set -x
"$bin/kvctl" put greeting "hello, kvfleet"
"$bin/kvctl" get greeting
"$bin/kvctl" split user5 || true   # already split if the data directory is reused
"$bin/kvctl" ranges
"$bin/kvctl" bench --workload a --distribution zipfian --records 2000 --concurrency 16 --duration 5
"$bin/kvctl" status
set +x

cat <<MSG

kvfleet-node is serving on $listen (data in $data_dir, metrics on http://127.0.0.1:9700/metrics).
Try:  $bin/kvctl --endpoints $listen status
Press Ctrl-C to stop it (it shuts down gracefully and keeps its data for the next run).
MSG
wait $node_pid
