#!/usr/bin/env bash
# Benchmarks kvfleet against Redis (persistence off) and etcd on this machine, side by side, with
# the same harness (kvctl bench), the same concurrency and the same value size. Writes the results
# table to stdout and the raw JSON reports to $OUT (default: ./bench-results).
#
#   scripts/bench.sh                 # all scenarios, 20 s each
#   DURATION=5 scripts/bench.sh      # quicker
#   PIN=1 scripts/bench.sh           # servers on CPU 0, load generator on CPU 1 (one core each)
#
# Everything listens on 127.0.0.1 only and stops at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

DURATION="${DURATION:-20}"
CONCURRENCY="${CONCURRENCY:-64}"
RECORDS="${RECORDS:-100000}"
VALUE_SIZE="${VALUE_SIZE:-100}"
OUT="${OUT:-$PWD/bench-results}"
PIN="${PIN:-0}"
server_cpu=() client_cpu=() node_threads=()
if [[ "$PIN" == 1 ]]; then
  server_cpu=(taskset -c 0) client_cpu=(taskset -c 1) node_threads=(--worker-threads 1)
  export GOMAXPROCS=1 TOKIO_WORKER_THREADS=1
fi

source scripts/bench-lib.sh
bench_setup --bench
mkdir -p "$OUT"

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listening on port $1" >&2
  return 1
}

start_node() { # name port durability accounting
  "${server_cpu[@]}" "$bin/kvfleet-node" --node-id "$1" --data-dir "$work/$1" --listen "127.0.0.1:$2" \
    --bootstrap --durability "$3" --load-accounting "$4" "${node_threads[@]}" >/dev/null 2>"$work/$1.log" &
  pids+=($!)
  wait_port "$2"
}

start_node kv-sync 7801 sync true
start_node kv-async 7802 async true
start_node kv-async-noacct 7803 async false
"${server_cpu[@]}" redis-server --port 6399 --bind 127.0.0.1 --save "" --appendonly no --daemonize no >"$work/redis.log" 2>&1 &
pids+=($!)
wait_port 6399
"${server_cpu[@]}" etcd --name bench --data-dir "$work/etcd" \
  --listen-client-urls http://127.0.0.1:2399 --advertise-client-urls http://127.0.0.1:2399 \
  --listen-peer-urls http://127.0.0.1:2398 --initial-advertise-peer-urls http://127.0.0.1:2398 \
  --initial-cluster bench=http://127.0.0.1:2398 >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_port 2399

run() { # label target endpoints workload extra...
  local label=$1 target=$2 endpoints=$3 workload=$4
  shift 4
  echo "== $label" >&2
  "${client_cpu[@]}" "$bin/kvctl" --endpoints "$endpoints" --output json bench --quiet --target "$target" \
    --workload "$workload" --records "$RECORDS" --value-size "$VALUE_SIZE" \
    --concurrency "$CONCURRENCY" --duration "$DURATION" "$@" >"$OUT/$label.json"
}

# Each comparison runs twice: one connection per client (64 TCP connections, one request in
# flight on each: what redis-benchmark does) and 4 shared connections (requests multiplexed:
# HTTP/2 streams for kvfleet and etcd, pipelining for Redis' multiplexed connection).
for conns in 64 4; do
  # Point reads (YCSB C, uniform) and unbatched writes: kvfleet (async) vs Redis (no persistence).
  run "reads-kvfleet-c$conns" kvfleet 127.0.0.1:7802 c --connections "$conns"
  run "reads-redis-c$conns" redis://127.0.0.1:6399 127.0.0.1:7802 c --connections "$conns"
  run "writes-async-kvfleet-c$conns" kvfleet 127.0.0.1:7802 w --skip-load --key-prefix w --connections "$conns"
  run "writes-redis-c$conns" redis://127.0.0.1:6399 127.0.0.1:7802 w --skip-load --key-prefix w --connections "$conns"
  # Durable writes: kvfleet sync (fsync before OK) vs etcd (fsync before OK).
  run "writes-sync-kvfleet-c$conns" kvfleet 127.0.0.1:7801 w --skip-load --key-prefix w --connections "$conns"
  run "writes-etcd-c$conns" etcd://127.0.0.1:2399 127.0.0.1:7801 w --skip-load --key-prefix w --connections "$conns"
done
# The cost of load accounting: the same build with accounting off, alternated with it on.
for round in 1 2; do
  run "acct-on-reads-$round" kvfleet 127.0.0.1:7802 c --connections 4 --skip-load
  run "acct-off-reads-$round" kvfleet 127.0.0.1:7803 c --connections 4
  run "acct-on-writes-$round" kvfleet 127.0.0.1:7802 w --connections 4 --skip-load --key-prefix w
  run "acct-off-writes-$round" kvfleet 127.0.0.1:7803 w --connections 4 --skip-load --key-prefix w
done
# A mixed Zipfian workload, for reference.
run ycsb-a-zipfian-kvfleet-sync kvfleet 127.0.0.1:7801 a --distribution zipfian --key-prefix z --connections 4

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
rows = []
for name in sorted(os.listdir(out)):
    if not name.endswith(".json"):
        continue
    r = json.load(open(os.path.join(out, name)))
    a = r["all"]
    rows.append((name[:-5], r["target"], r["workload"], r["concurrency"], r["connections"], r["ops_per_sec"], a["p50_us"], a["p99_us"], a["p999_us"], r["errors"], r["verify_failures"]))
print("| scenario | target | workload | clients | connections | ops/s | p50 µs | p99 µs | p99.9 µs | errors | verify failures |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for row in rows:
    print("| %s | %s | %s | %d | %d | %.0f | %d | %d | %d | %d | %d |" % row)
PY
