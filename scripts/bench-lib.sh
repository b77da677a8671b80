# Sourced by the benchmark scripts: `bench_setup [install-deps flags]` installs what they need,
# builds the release binaries, and sets `bin` (their directory), `work` (a scratch directory) and
# `pids` (append each background process); on exit, every process in `pids` is stopped and
# `work` removed. `wait_for <file> <pattern> <seconds>` waits for a line in a server's log.

bench_setup() {
  scripts/install-deps.sh "$@"
  cargo build --release --workspace --bins --locked
  bin="$CARGO_TARGET_DIR/release"
  work="$(mktemp -d)"
  pids=()
  trap bench_cleanup EXIT
}

# wait_for <file> <pattern> <seconds>: until the pattern is in the file (a server's log), or exits.
wait_for() {
  for _ in $(seq 1 $(($3 * 10))); do grep -q "$2" "$1" && return 0; sleep 0.1; done
  echo "no '$2' in $1 after $3 s: $(tail -5 "$1")" >&2
  exit 1
}

bench_cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
