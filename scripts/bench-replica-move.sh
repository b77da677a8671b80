#!/usr/bin/env bash
# A replica of a large replicated range moved under load, as membership changes: 3 nodes hold
# range 1 (N = 3, release build, loopback) and a fourth holds nothing; RECORDS records of
# VALUE_SIZE bytes are loaded (default 1,000,000 x 1,000 B: about 1 GB of values); then 64
# clients run workload a (50% reads, 50% updates) for BASELINE seconds without a move, and again
# while `kvctl move-replica` moves the leader's replica (r1) to r4 (learner, snapshot, leadership
# handed away, joint change). Prints both runs' tables, the move's duration as kvctl measured it,
# and the snapshot lines of the nodes' logs.
# Run: scripts/bench-replica-move.sh   (RECORDS=200000 VALUE_SIZE=1000 MOVE_SECS=60 BASELINE=20)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source scripts/bench-lib.sh
bench_setup
records="${RECORDS:-1000000}"
value_size="${VALUE_SIZE:-1000}"
move_secs="${MOVE_SECS:-60}"
baseline="${BASELINE:-20}"

initial="r1=127.0.0.1:7841,r2=127.0.0.1:7842,r3=127.0.0.1:7843"
start() { # n, extra args...
  local n=$1
  shift
  RUST_LOG=info "$bin/kvfleet-node" --node-id "r$n" --data-dir "$work/r$n" --listen "127.0.0.1:784$n" "$@" \
    >>"$work/r$n.log" 2>&1 &
  pids+=($!)
  wait_for "$work/r$n.log" "kvfleet-node ready" 10
}
for n in 1 2 3; do start "$n" --initial-replicas "$initial"; done
start 4
sleep 3 # the first election
endpoints=127.0.0.1:7841,127.0.0.1:7842,127.0.0.1:7843,127.0.0.1:7844
echo "== loading $records records of $value_size bytes"
"$bin/kvctl" bench --endpoints "$endpoints" --workload w --records "$records" --value-size "$value_size" \
  --concurrency 64 --duration 1 --quiet >/dev/null
echo "r1's data directory: $(du -sh "$work/r1" | cut -f1)"

echo "== workload a, 64 clients, $baseline s, no move"
"$bin/kvctl" bench --endpoints "$endpoints" --workload a --records "$records" --value-size "$value_size" \
  --concurrency 64 --duration "$baseline" --skip-load --quiet

echo "== workload a, 64 clients, $move_secs s; r1's replica moved to r4 from 2 s in"
"$bin/kvctl" bench --endpoints "$endpoints" --workload a --records "$records" --value-size "$value_size" \
  --concurrency 64 --duration "$move_secs" --skip-load --quiet >"$work/bench.txt" &
bench=$!
sleep 2
"$bin/kvctl" --endpoints "$endpoints" move-replica "" --from r1 --to r4
wait "$bench"
cat "$work/bench.txt"
grep -h "snapshot made\|installed a snapshot\|leadership transferred\|membership changed" "$work"/r*.log |
  sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220
