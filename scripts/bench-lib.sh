# Sourced by the benchmark scripts: `bench_setup [install-deps flags]` installs what they need,
# builds the release binaries, and sets `bin` (their directory), `work` (a scratch directory) and
# `pids` (append each background process); on exit, every process in `pids` is stopped and
# `work` removed.

bench_setup() {
  scripts/install-deps.sh "$@"
  cargo build --release --workspace --bins --locked
  bin="$CARGO_TARGET_DIR/release"
  work="$(mktemp -d)"
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
