#!/usr/bin/env bash
# How long the playground takes to balance a hotspot: starts a 3-node release playground with
# its default (playground) policy, runs a Zipfian read/update load (hot keys sit together at the
# start of the key space, so they all land on one node's range first), and prints, once a second,
# the busiest node's load over the mean. Reports the time until it stays at or below 1.25 for 10 s.
#
#   scripts/bench-hotspot.sh                  # 180 s of load at most, single copies
#   DURATION=120 CONCURRENCY=32 scripts/bench-hotspot.sh
#   REPLICAS=3 scripts/bench-hotspot.sh       # every range on all 3 nodes: balanced by leaders
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

DURATION="${DURATION:-180}"
CONCURRENCY="${CONCURRENCY:-32}"
RECORDS="${RECORDS:-100000}"
REPLICAS="${REPLICAS:-1}"
source scripts/bench-lib.sh
bench_setup

"$bin/kvfleet-operator" playground --nodes 3 --replicas "$REPLICAS" --dir "$work/fleet" --base-port 0 --listen 127.0.0.1:0 --view none \
  >"$work/ready" 2>"$work/controller.log" &
pids+=($!)
for _ in $(seq 1 300); do grep -q "ready" "$work/ready" 2>/dev/null && break; sleep 0.1; done
control="$(sed -n 's/.*control=\([^ ]*\).*/\1/p' "$work/ready")"
endpoints="$(sed -n 's/.*nodes=\([^ ]*\).*/\1/p' "$work/ready" | tr ',' '\n' | cut -d@ -f2 | paste -sd,)"
echo "playground: control $control, nodes $endpoints"

"$bin/kvctl" --endpoints "$endpoints" bench --workload a --distribution zipfian --records "$RECORDS" \
  --concurrency "$CONCURRENCY" --duration "$DURATION" --output json >"$work/bench.json" 2>/dev/null &
bench_pid=$!
pids+=($bench_pid)

python3 - "$bin/kvctl" "$control" "$DURATION" <<'PY'
import json, subprocess, sys, time
kvctl, control, duration = sys.argv[1], sys.argv[2], float(sys.argv[3])
start, balanced_since, first_busy = time.time(), None, None
while time.time() - start < duration:
    time.sleep(1)
    out = subprocess.run([kvctl, "status", "--controller", control, "--output", "json"], capture_output=True, text=True)
    if out.returncode != 0:
        continue
    status = json.loads(out.stdout)
    loads = [n["opsPerSec"] for n in status["nodes"]]
    total = sum(loads)
    if total < 100:
        continue
    first_busy = first_busy or time.time()
    ratio = max(loads) / (total / len(loads))
    t = time.time() - first_busy
    print(f"{t:6.0f} s  {total:7.0f} ops/s  max/mean {ratio:4.2f}  ranges {len(status['ranges']):3d}  moves in flight {len(status['moves'])}", flush=True)
    if ratio <= 1.25:
        balanced_since = balanced_since or t
        if t - balanced_since >= 10:
            print(f"balanced: max/mean <= 1.25 from {balanced_since:.0f} s after the load started (held 10 s)")
            sys.exit(0)
    else:
        balanced_since = None
print("not balanced within the run")
sys.exit(1)
PY
