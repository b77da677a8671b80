#!/usr/bin/env bash
# Reads and writes on one range, N = 1 against N = 3 (majority, linearizable reads), with the
# same harness (`kvctl bench`), release build, on loopback; then one hot key read by each read
# consistency (linearizable, follower, stale) on N = 3. Prints kvctl's tables. N = 1 (a Raft
# group of one voter) in `sync` and in `async`.
# Run: cargo build --release --bins && scripts/bench-replication.sh   (DURATION=10 CONCURRENCY=64)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bin="$CARGO_TARGET_DIR/release"
duration="${DURATION:-10}"
concurrency="${CONCURRENCY:-64}"
dir="$(mktemp -d)"
pids=()
cleanup() { kill -9 "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

wait_ready() { # log file
  for _ in $(seq 1 100); do grep -q "kvfleet-node ready" "$1" && return 0; sleep 0.1; done
  echo "a node did not start: $(cat "$1")" >&2; exit 1
}

bench() { # label endpoints
  for workload in w c; do
    echo "== $1, workload $workload (w: updates only, c: reads only), $concurrency clients, ${duration}s"
    "$bin/kvctl" bench --endpoints "$2" --workload "$workload" --concurrency "$concurrency" \
      --duration "$duration" --records 10000 --quiet
  done
}

port=7812
for durability in sync async; do
  "$bin/kvfleet-node" --node-id "solo-$durability" --data-dir "$dir/solo-$durability" --listen "127.0.0.1:$port" \
    --initial-replicas "solo-$durability=127.0.0.1:$port" --durability "$durability" >"$dir/solo-$durability.log" 2>&1 &
  pids+=($!); disown
  wait_ready "$dir/solo-$durability.log"
  bench "N = 1, a Raft group of one voter ($durability)" "127.0.0.1:$port"
  kill -9 "${pids[@]}"; pids=()
  port=$((port + 1))
done

initial="r1=127.0.0.1:7821,r2=127.0.0.1:7822,r3=127.0.0.1:7823"
for n in 1 2 3; do
  "$bin/kvfleet-node" --node-id "r$n" --data-dir "$dir/r$n" --listen "127.0.0.1:782$n" \
    --initial-replicas "$initial" >"$dir/r$n.log" 2>&1 &
  pids+=($!); disown
done
for n in 1 2 3; do wait_ready "$dir/r$n.log"; done
sleep 3 # the first election
bench "N = 3 (majority, linearizable reads)" 127.0.0.1:7821,127.0.0.1:7822,127.0.0.1:7823

# One hot key (a single record), reads only, by each read consistency: linearizable reads go to
# the leader; follower reads to any replica after a read index; stale reads to any replica,
# with no round trip while it was current within the bound.
for consistency in linearizable follower stale; do
  echo "== N = 3, one hot key, reads only ($consistency), $concurrency clients, ${duration}s"
  "$bin/kvctl" bench --endpoints 127.0.0.1:7821,127.0.0.1:7822,127.0.0.1:7823 --workload c --records 1 \
    --concurrency "$concurrency" --duration "$duration" --read-consistency "$consistency" \
    --max-staleness-ms 1000 --quiet
done
