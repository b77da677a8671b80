//! Crash points for tests, shared by the node and the controller: `KVFLEET_CRASH_AT=<name>`
//! makes the process abort (like kill -9: no destructors, no flush) when it reaches the named
//! step. With `KVFLEET_CRASH_ONCE=<file>`, only the first process to reach it aborts (it creates
//! the file first), so a supervisor's restart, or the other processes of a fleet sharing the
//! environment, run on. `KVFLEET_PAUSE_AT=<name>=<millis>` instead holds the thread that first
//! reaches the step that long (a slow disk at the worst moment), once per process, having created
//! the file `KVFLEET_PAUSE_MARK` if set (so a test knows the pause happened).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

static CRASH_AT: OnceLock<Option<String>> = OnceLock::new();
static PAUSE_AT: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PAUSED: AtomicBool = AtomicBool::new(false);

pub fn hit(name: &str) {
    let pause = PAUSE_AT.get_or_init(|| {
        let value = std::env::var("KVFLEET_PAUSE_AT").ok().filter(|v| !v.is_empty())?;
        let parsed = value.rsplit_once('=').and_then(|(point, millis)| Some((point.to_string(), millis.parse().ok()?)));
        assert!(parsed.is_some(), "KVFLEET_PAUSE_AT={value:?}: expected <point>=<milliseconds>");
        parsed
    });
    if let Some((point, millis)) = pause
        && point == name
        && !PAUSED.swap(true, Ordering::AcqRel)
    {
        if let Some(mark) = std::env::var_os("KVFLEET_PAUSE_MARK") {
            let _ = std::fs::write(mark, name);
        }
        eprintln!("pause point {name} reached (KVFLEET_PAUSE_AT), holding {millis} ms");
        std::thread::sleep(std::time::Duration::from_millis(*millis));
    }
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
