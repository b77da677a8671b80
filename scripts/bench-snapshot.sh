#!/usr/bin/env bash
# How long a follower that missed a range's whole history takes to catch up by snapshot, and
# what clients see meanwhile: 3 nodes (N = 3, release build, loopback), the third killed before
# RECORDS records of VALUE_SIZE bytes are loaded, then restarted while 64 clients run workload a
# (50% reads, 50% updates) on the other two. Prints the catch-up time (restart to "installed a
# snapshot" in the follower's log, and the leader's "snapshot made" / the follower's "snapshot
# fetched" lines) and kvctl's table for the run.
# Run: cargo build --release --bins && scripts/bench-snapshot.sh   (RECORDS=200000 VALUE_SIZE=1000)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bin="$CARGO_TARGET_DIR/release"
records="${RECORDS:-200000}"
value_size="${VALUE_SIZE:-1000}"
dir="$(mktemp -d)"
pids=()
cleanup() { kill -9 "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

wait_for() { # file pattern seconds
  for _ in $(seq 1 $(($3 * 10))); do grep -q "$2" "$1" && return 0; sleep 0.1; done
  echo "no '$2' in $1 after $3 s: $(tail -5 "$1")" >&2; exit 1
}

initial="r1=127.0.0.1:7831,r2=127.0.0.1:7832,r3=127.0.0.1:7833"
start() { # n
  "$bin/kvfleet-node" --node-id "r$1" --data-dir "$dir/r$1" --listen "127.0.0.1:783$1" \
    --initial-replicas "$initial" >>"$dir/r$1.log" 2>&1 &
  pids[$1]=$!
  disown
  wait_for "$dir/r$1.log" "kvfleet-node ready" 10
}
for n in 1 2 3; do start "$n"; done
sleep 3 # the first election
kill -9 "${pids[3]}"
endpoints=127.0.0.1:7831,127.0.0.1:7832
echo "== loading $records records of $value_size bytes with r3 down"
"$bin/kvctl" bench --endpoints "$endpoints" --workload w --records "$records" --value-size "$value_size" \
  --concurrency 64 --duration 1 --quiet >/dev/null
echo "r1's data directory: $(du -sh "$dir/r1" | cut -f1)"
echo "== r3 restarted 2 s into 20 s of workload a (64 clients) on r1 and r2"
"$bin/kvctl" bench --endpoints "$endpoints" --workload a --records "$records" --value-size "$value_size" \
  --concurrency 64 --duration 20 --skip-load --quiet >"$dir/bench.txt" &
bench=$!
sleep 2
restarted=$(date +%s.%N)
start 3
wait_for "$dir/r3.log" "installed a snapshot from the leader" 120
caught_up=$(date +%s.%N)
wait "$bench"
echo "r3 restarted -> snapshot installed: $(awk "BEGIN { printf \"%.1f\", $caught_up - $restarted }") s (polled every 0.1 s)"
grep -h "snapshot made\|snapshot fetched\|installed a snapshot" "$dir"/r*.log | sed 's/\x1b\[[0-9;]*m//g'
cat "$dir/bench.txt"
