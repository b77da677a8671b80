#!/usr/bin/env bash
# `majority` against `fast` durability on a 3-replica range, same harness (`kvctl bench`: updates
# only, then half linearizable reads), release build, on loopback; then the loss window of `fast`: how long each write stayed
# acknowledged but held by the leader alone (kvfleet_fast_ack_unreplicated_seconds, from the
# acknowledgement to the leader applying it, by which time a majority held it), as quantiles over
# every write of the run.
# Run: scripts/bench-fast-ack.sh   (DURATION=10 CONCURRENCY=64; builds the release binaries first)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source scripts/bench-lib.sh
bench_setup
duration="${DURATION:-10}"
concurrency="${CONCURRENCY:-64}"
dir="$work"

port=785 # each mode on ports of its own: a killed node's may not be free at once
for mode in majority fast; do
  initial="r1=127.0.0.1:${port}1,r2=127.0.0.1:${port}2,r3=127.0.0.1:${port}3"
  for n in 1 2 3; do
    "$bin/kvfleet-node" --node-id "r$n" --data-dir "$dir/$mode-r$n" --listen "127.0.0.1:$port$n" \
      --metrics-listen "127.0.0.1:$((port + 1))$n" --initial-replicas "$initial" --replication-durability "$mode" \
      >"$dir/$mode-r$n.log" 2>&1 &
    pids+=($!); disown
  done
  for n in 1 2 3; do wait_for "$dir/$mode-r$n.log" "kvfleet-node ready" 10; done
  sleep 3 # the first election
  for workload in w a; do
    echo "== N = 3, $mode durability, workload $workload (w: updates only, a: 50% linearizable reads), $concurrency clients, ${duration}s"
    "$bin/kvctl" bench --endpoints "127.0.0.1:${port}1,127.0.0.1:${port}2,127.0.0.1:${port}3" --workload "$workload" \
      --concurrency "$concurrency" --duration "$duration" --records 10000 --quiet
  done
  if [ "$mode" = fast ]; then
    for n in 1 2 3; do
      exec 3<>"/dev/tcp/127.0.0.1/$((port + 1))$n"
      printf 'GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
      cat <&3 >"$dir/metrics-$n.txt"
      exec 3<&-
    done
    python3 - "$dir"/metrics-*.txt <<'PY'
import re, sys
buckets, count, lost = {}, 0.0, 0.0
for path in sys.argv[1:]:
    for line in open(path):
        m = re.match(r'kvfleet_fast_ack_unreplicated_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            le = float('inf') if m.group(1) == '+Inf' else float(m.group(1))
            buckets[le] = buckets.get(le, 0.0) + float(m.group(2))
        elif line.startswith('kvfleet_fast_ack_unreplicated_seconds_count'):
            count += float(line.split()[-1])
        elif line.startswith('kvfleet_fast_ack_lost_total'):
            lost += float(line.split()[-1])
def quantile(q):
    for le in sorted(buckets):
        if buckets[le] >= q * count:
            return le
print(f"loss window (acknowledged, held by the leader alone) over {count:.0f} writes acknowledged early:")
for q in (0.5, 0.9, 0.99, 0.999, 1.0):
    print(f"  p{q * 100:g}: at most {quantile(q) * 1e3:.3f} ms (histogram bucket bound)")
print(f"  lost (replaced by another leader's entries): {lost:.0f}")
PY
  fi
  kill -9 "${pids[@]}"; pids=()
  port=$((port + 2))
done
