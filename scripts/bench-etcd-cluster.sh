#!/usr/bin/env bash
# Replicated writes and reads against etcd: kvfleet N = 3 (`majority`: OK once a majority fsynced
# the entry) and a 3-member etcd cluster (Debian's etcd 3.4: OK once a majority fsynced it), all
# six processes on loopback, the same harness (`kvctl bench`) and load for both: 64 clients,
# RECORDS records of VALUE_SIZE bytes, puts only (workload w), then reads only (workload c:
# kvfleet linearizable, under its leader's lease; etcd linearizable, ReadIndex). etcd's clients
# all talk to one member, which forwards to its leader. kvfleet runs twice: with its client's
# bundling (concurrent requests to one node share a call, the default) and without it. Prints
# kvctl's tables.
# With SWEEP set (e.g. SWEEP="1 8 64 256 512"), runs instead only puts, kvfleet then etcd at each
# of those client counts, and prints one line per run: puts/s and how busy the machine's CPU was
# (from /proc/stat, over the run). Where the target lies against each system's ceiling.
# Run: scripts/bench-etcd-cluster.sh   (DURATION=10 CONCURRENCY=64 RECORDS=10000 VALUE_SIZE=100
# SWEEP=)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source scripts/bench-lib.sh
bench_setup --bench
duration="${DURATION:-10}"
concurrency="${CONCURRENCY:-64}"
records="${RECORDS:-10000}"
value_size="${VALUE_SIZE:-100}"

initial="r1=127.0.0.1:7851,r2=127.0.0.1:7852,r3=127.0.0.1:7853"
for n in 1 2 3; do
  "$bin/kvfleet-node" --node-id "r$n" --data-dir "$work/r$n" --listen "127.0.0.1:785$n" \
    --initial-replicas "$initial" >"$work/r$n.log" 2>&1 &
  pids+=($!)
done
cluster="e1=http://127.0.0.1:2481,e2=http://127.0.0.1:2483,e3=http://127.0.0.1:2485"
for n in 1 2 3; do
  peer=$((2479 + 2 * n))
  client=$((peer + 1))
  etcd --name "e$n" --data-dir "$work/e$n" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --initial-cluster "$cluster" --initial-cluster-state new >"$work/e$n.log" 2>&1 &
  pids+=($!)
done
for n in 1 2 3; do wait_for "$work/r$n.log" "kvfleet-node ready" 10; done
for n in 1 2 3; do wait_for "$work/e$n.log" "ready to serve client requests" 30; done
sleep 3 # the first elections
kvfleet=127.0.0.1:7851,127.0.0.1:7852,127.0.0.1:7853

bench() { # label target workload extra...
  local label=$1 target=$2 workload=$3
  shift 3
  echo "== $label, workload $workload (w: puts only, c: reads only), $concurrency clients, ${duration}s"
  "$bin/kvctl" bench --endpoints "$kvfleet" --target "$target" --workload "$workload" --records "$records" \
    --value-size "$value_size" --concurrency "$concurrency" --duration "$duration" --quiet "$@"
}

# sweep_line <label> <concurrency> <target>: one puts-only run, as one line with the CPU it took.
sweep_line() {
  local label=$1 clients=$2 target=$3 busy0 total0 busy1 total1 result
  read -r busy0 total0 <<<"$(machine_busy_ticks)"
  result=$("$bin/kvctl" bench --endpoints "$kvfleet" --target "$target" --workload w --records "$records" \
    --value-size "$value_size" --concurrency "$clients" --duration "$duration" --skip-load --quiet |
    awk '/^run:/ {print $4}')
  read -r busy1 total1 <<<"$(machine_busy_ticks)"
  awk -v l="$label" -v c="$clients" -v r="$result" -v b=$((busy1 - busy0)) -v t=$((total1 - total0)) \
    'BEGIN {printf "%-8s %4d clients: %7d puts/s, machine CPU %3.0f%% busy\n", l, c, r, 100 * b / t}'
}
# busy (user, nice, system, irq, softirq) and all ticks, from /proc/stat's first line
machine_busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8}' /proc/stat; }
if [[ -n "${SWEEP:-}" ]]; then
  echo "== puts only (workload w), ${duration}s each, kvfleet N = 3 (majority) and etcd 3 members"
  for clients in $SWEEP; do
    sweep_line kvfleet "$clients" kvfleet
    sweep_line etcd "$clients" etcd://127.0.0.1:2482
  done
  exit 0
fi

bench "kvfleet N = 3 (majority)" kvfleet w
bench "kvfleet N = 3 (majority), every request in its own call" kvfleet w --bundle-max-requests 1
bench "etcd, 3 members" etcd://127.0.0.1:2482 w
bench "kvfleet N = 3 (linearizable reads)" kvfleet c --skip-load
bench "kvfleet N = 3 (linearizable reads), every request in its own call" kvfleet c --skip-load --bundle-max-requests 1
bench "etcd, 3 members (linearizable reads)" etcd://127.0.0.1:2482 c --skip-load
echo "etcd's leader: $(grep -h "elected leader" "$work"/e*.log | tail -1 | sed 's/.*elected leader/elected leader/')"
