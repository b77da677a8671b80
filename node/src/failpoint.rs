//! Crash points for tests: `KVFLEET_CRASH_AT=<name>` makes the node abort (like kill -9: no
//! destructors, no flush) when it reaches the named step, so tests can crash it mid-operation.

use std::sync::OnceLock;

static CRASH_AT: OnceLock<Option<String>> = OnceLock::new();

pub fn hit(name: &str) {
    let armed = CRASH_AT.get_or_init(|| std::env::var("KVFLEET_CRASH_AT").ok().filter(|v| !v.is_empty()));
    if armed.as_deref() == Some(name) {
        eprintln!("kvfleet-node: crash point {name} reached (KVFLEET_CRASH_AT), aborting");
        std::process::abort();
    }
}
