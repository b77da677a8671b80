#!/usr/bin/env bash
# Where a replicated put's CPU goes: three kvfleet-nodes (N = 3, `majority`) on loopback and
# `kvctl bench` puts at 64 clients (as scripts/bench-etcd-cluster.sh runs them, without etcd).
# Over a MEASURE-second window in the middle of the run, prints the machine's CPU split (user,
# system, idle, from /proc/stat), each process's CPU in microseconds per acknowledged put (from
# /proc/<pid>/stat, the leader marked), and, if `perf` is installed (Debian's linux-perf), the
# nodes' syscalls and context switches per put. The numbers in docs/benchmarks.md ("Where N = 3's
# put time goes") come from this script.
# Run: scripts/profile-replicated-puts.sh   (DURATION=15 MEASURE=5 CONCURRENCY=64 NODES=3; NODES=1
# for a single copy, a Raft group of one voter, `sync`)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source scripts/bench-lib.sh
bench_setup
duration="${DURATION:-15}"
measure="${MEASURE:-5}"
concurrency="${CONCURRENCY:-64}"
count="${NODES:-3}"
((duration >= measure + 6)) || { echo "DURATION must be at least MEASURE + 6 s" >&2; exit 1; }
[[ $count == 1 || $count == 3 ]] || { echo "NODES must be 1 or 3" >&2; exit 1; }

initial=""
endpoints=""
for n in $(seq 1 "$count"); do
  initial+="${initial:+,}r$n=127.0.0.1:786$n"
  endpoints+="${endpoints:+,}127.0.0.1:786$n"
done
for n in $(seq 1 "$count"); do
  "$bin/kvfleet-node" --node-id "r$n" --data-dir "$work/r$n" --listen "127.0.0.1:786$n" \
    --initial-replicas "$initial" >"$work/r$n.log" 2>&1 &
  pids+=($!)
done
nodes=("${pids[@]}")
for n in $(seq 1 "$count"); do wait_for "$work/r$n.log" "kvfleet-node ready" 10; done
sleep 3 # the first election
"$bin/kvctl" bench --endpoints "$endpoints" --target kvfleet --workload w \
  --records 10000 --value-size 100 --concurrency "$concurrency" --duration "$duration" --quiet >"$work/bench.out" 2>&1 &
bench_pid=$!
pids+=("$bench_pid")
sleep 4 # past the load phase

process_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
machine_ticks() { awk '/^cpu / {print $2 + $3, $4 + $7 + $8, $5 + $6}' /proc/stat; } # user system idle+iowait
declare -A before after
for pid in "${nodes[@]}" "$bench_pid"; do before[$pid]=$(process_ticks "$pid"); done
read -r user0 system0 idle0 <<<"$(machine_ticks)"
if command -v perf >/dev/null; then
  events=""
  for call in fdatasync write writev recvfrom futex epoll_wait; do events+="syscalls:sys_enter_$call,"; done
  # Beside the window, not as it: a perf that cannot attach must not shorten it.
  perf stat -x, -e "${events}context-switches" -p "$(IFS=,; echo "${nodes[*]}")" -- sleep "$measure" 2>"$work/perf.csv" &
  perf_pid=$!
fi
sleep "$measure"
if [[ -n "${perf_pid:-}" ]]; then wait "$perf_pid" || echo "perf could not count the syscalls: $(head -3 "$work/perf.csv")" >&2; fi
for pid in "${nodes[@]}" "$bench_pid"; do after[$pid]=$(process_ticks "$pid"); done
read -r user1 system1 idle1 <<<"$(machine_ticks)"
wait "$bench_pid"
ops=$(awk '/^run:/ {print $4}' "$work/bench.out")
[[ -n "$ops" ]] || { echo "the bench printed no result: $(tail -5 "$work/bench.out")" >&2; exit 1; }
puts=$((ops * measure)) # at the run's average rate
hz=$(getconf CLK_TCK)
total=$(((user1 - user0) + (system1 - system0) + (idle1 - idle0)))

echo "== $ops puts/s at $concurrency clients ($duration s run; measured over $measure s: about $puts puts)"
awk -v u=$((user1 - user0)) -v s=$((system1 - system0)) -v i=$((idle1 - idle0)) -v t="$total" \
  'BEGIN {printf "machine: user %.0f%%, system %.0f%%, idle %.0f%%\n", 100 * u / t, 100 * s / t, 100 * i / t}'
for n in $(seq 1 "$count"); do
  pid=${nodes[$((n - 1))]}
  # The one node whose log tells of an election won; with several (leadership moved), unknown.
  role=follower
  if [[ $(grep -l "became leader" "$work"/r*.log | wc -l) -ne 1 ]]; then
    role="leader?"
  elif grep -q "became leader" "$work/r$n.log"; then
    role=leader
  fi
  awk -v name="r$n ($role)" -v t=$((after[$pid] - before[$pid])) -v hz="$hz" -v m="$measure" -v p="$puts" \
    'BEGIN {printf "%-16s %5.0f%% of a core, %5.1f us per put\n", name, 100 * t / hz / m, 1e6 * t / hz / p}'
done
awk -v t=$((after[$bench_pid] - before[$bench_pid])) -v hz="$hz" -v m="$measure" -v p="$puts" \
  'BEGIN {printf "%-16s %5.0f%% of a core, %5.1f us per put\n", "kvctl bench", 100 * t / hz / m, 1e6 * t / hz / p}'
if [[ -s "$work/perf.csv" ]]; then
  echo "the nodes together, per put:"
  awk -F, -v p="$puts" '$1 ~ /^[0-9]+$/ {sub("syscalls:sys_enter_", "", $3); printf "  %-18s %.2f\n", $3, $1 / p}' "$work/perf.csv"
fi
