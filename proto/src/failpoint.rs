//! Crash points for tests, shared by the node and the controller: `KVFLEET_CRASH_AT=<name>`
//! makes the process abort (like kill -9: no destructors, no flush) when it reaches the named
//! step. With `KVFLEET_CRASH_ONCE=<file>`, only the first process to reach it aborts (it creates
//! the file first), so a supervisor's restart, or the other processes of a fleet sharing the
//! environment, run on.

use std::sync::OnceLock;

static CRASH_AT: OnceLock<Option<String>> = OnceLock::new();

pub fn hit(name: &str) {
    let armed = CRASH_AT.get_or_init(|| std::env::var("KVFLEET_CRASH_AT").ok().filter(|v| !v.is_empty()));
    if armed.as_deref() != Some(name) {
        return;
    }
    if let Some(once) = std::env::var_os("KVFLEET_CRASH_ONCE") {
        // create_new: of several processes reaching the point, exactly one wins the file.
        if std::fs::OpenOptions::new().write(true).create_new(true).open(&once).is_err() {
            return;
        }
    }
    eprintln!("crash point {name} reached (KVFLEET_CRASH_AT), aborting");
    std::process::abort();
}
