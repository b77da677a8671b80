# Shared settings for the scripts: one warm target directory for builds, tests and CI.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kvfleet-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
