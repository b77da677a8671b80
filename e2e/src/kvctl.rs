//! `kvctl` run as a user runs it, against the nodes a test started.

use std::process::{Command, Output};

/// What one `kvctl` run said.
#[derive(Debug)]
pub struct KvctlRun {
    pub succeeded: bool,
    pub stdout: String,
    pub stderr: String,
}

impl KvctlRun {
    fn from_output(output: Output) -> Self {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        KvctlRun { succeeded: output.status.success(), stdout: text(&output.stdout), stderr: text(&output.stderr) }
    }

    /// What a successful run with `--output json` printed; panics naming the failure otherwise.
    pub fn json(&self, what: &str) -> serde_json::Value {
        assert!(self.succeeded, "kvctl {what} failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("kvctl {what} printed no JSON ({e}): {}", self.stdout))
    }
}

/// `kvctl --endpoints <endpoints> <args>`. `KVFLEET_CONTROLLER` is unset, so only a controller
/// the arguments name (`--controller`) is asked.
pub fn command(endpoints: &[impl AsRef<str>], args: &[&str]) -> Command {
    let endpoints: Vec<&str> = endpoints.iter().map(AsRef::as_ref).collect();
    let mut command = Command::new(crate::binary("kvctl"));
    command.args(["--endpoints", &endpoints.join(",")]).args(args).env_remove("KVFLEET_CONTROLLER");
    command
}

/// Runs [`command`] to its end (blocking the thread).
pub fn run(endpoints: &[impl AsRef<str>], args: &[&str]) -> KvctlRun {
    KvctlRun::from_output(command(endpoints, args).output().expect("kvctl runs"))
}

/// Runs [`command`] to its end on the test's runtime.
pub async fn run_async(endpoints: &[impl AsRef<str>], args: &[&str]) -> KvctlRun {
    let output = tokio::process::Command::from(command(endpoints, args)).output().await.expect("kvctl runs");
    KvctlRun::from_output(output)
}
