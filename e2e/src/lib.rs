//! Helpers for end-to-end tests on real processes: start, kill and restart `kvfleet-node`
//! binaries on loopback, each with its own data directory, and talk to them over gRPC; a
//! platform of nodes the test started, for running the controller in the test; the history
//! checker (`history`); `kvctl` run as a user runs it (`kvctl`); a real Kubernetes control plane
//! on loopback (`control_plane`) and a stand-in kubelet that runs its pods as node processes
//! (`kubelet`).

pub mod control_plane;
pub mod history;
pub mod kubelet;
pub mod kvctl;
pub mod partition;
pub mod replicated;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_client::{Client, ClientConfig};
use kvfleet_proto::v1::admin_client::AdminClient;
use kvfleet_proto::v1::kv_client::KvClient;
use kvfleet_proto::v1::{ListRangesRequest, RangeDescriptor, RangeState, SplitRangeRequest, SplitRangeResponse};
use tonic::transport::{Channel, Endpoint};

/// The directory holding the workspace's built binaries: `KVFLEET_BIN_DIR`, or the profile
/// directory of the running test (target/<profile>/deps/.. ).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KVFLEET_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps layout").to_path_buf()
}

pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` before the e2e tests (or set KVFLEET_BIN_DIR)",
        path.display()
    );
    path
}

/// The nodes' log filter in tests: warnings, and the replication layer's steps (elections,
/// membership changes, snapshots, hand-overs), which say what happened when a test fails. The
/// lines are named by node and captured with the test's output, so a passing test shows none.
const NODE_LOG: &str = "warn,raft=info,kvfleet_node::replica=info,kvfleet_node::membership=info";

/// A `kvfleet-node` process under test. Killed (SIGKILL) on drop.
pub struct NodeProcess {
    pub node_id: String,
    pub data_dir: PathBuf,
    pub address: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl NodeProcess {
    /// Starts a node on a kernel-chosen loopback port and waits until it serves.
    pub fn start(node_id: &str, data_dir: &Path, extra_args: &[&str]) -> Self {
        Self::start_with_env(node_id, data_dir, extra_args, &[])
    }

    /// Starts a node on `address` (a port chosen beforehand, when other nodes must know it).
    pub fn start_at(node_id: &str, data_dir: &Path, address: &str, extra_args: &[&str]) -> Self {
        let mut node = NodeProcess {
            node_id: node_id.to_string(),
            data_dir: data_dir.to_path_buf(),
            address: address.to_string(),
            args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            child: None,
        };
        node.spawn();
        node
    }

    /// Sends `signal` (e.g. "-STOP", "-CONT") to the running process.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the node runs").to_string();
        let sent = Command::new("kill").args([signal, &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill {signal} {pid} failed");
    }

    pub fn start_with_env(node_id: &str, data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut node = NodeProcess {
            node_id: node_id.to_string(),
            data_dir: data_dir.to_path_buf(),
            address: "127.0.0.1:0".to_string(),
            args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            child: None,
        };
        node.spawn();
        node
    }

    /// (Re)starts the process on the node's address (the same port after the first start).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.node_id);
        let mut command = Command::new(binary("kvfleet-node"));
        command
            .arg("--node-id")
            .arg(&self.node_id)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(&self.address)
            .args(&self.args)
            // `KVFLEET_TEST_NODE_LOG=info cargo test ...` shows more of what the nodes did.
            .env("RUST_LOG", std::env::var("KVFLEET_TEST_NODE_LOG").unwrap_or_else(|_| NODE_LOG.into()));
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        let (child, address) =
            spawn_until_ready(&mut command, &format!("node {}", self.node_id), Duration::from_secs(30), |line| {
                kvfleet_proto::parse_node_ready_line(line).map(str::to_string)
            });
        self.address = address;
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.as_ref().expect("node is running").id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.wait_for_exit(Duration::from_secs(30))
    }

    /// Waits (bounded) for the process to exit (after SIGTERM, or at a crash point).
    pub fn wait_for_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("node is running");
        wait_or_kill(&mut child, within, &format!("node {}", self.node_id))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Waits (bounded) until the process exits by itself (a crash point); whether it did.
    pub async fn exits_within(&mut self, within: Duration) -> bool {
        let started = std::time::Instant::now();
        while started.elapsed() < within {
            if !self.is_running() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    pub fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.address))
            .expect("valid address")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect_lazy()
    }

    pub fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel())
    }

    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel())
    }

    pub fn client(&self) -> Client {
        client_for(&[self])
    }

    /// Splits `range_id` at `key`: it keeps the left half, `right_id` (0: the node picks) takes
    /// the right one; panics on failure.
    pub async fn split(&self, range_id: u64, key: &str, right_id: u64) -> SplitRangeResponse {
        self.admin()
            .split_range(SplitRangeRequest {
                range_id,
                expected_generation: 0,
                split_key: Bytes::from(key.to_string()),
                right_id,
            })
            .await
            .unwrap_or_else(|status| panic!("split of range {range_id} at {key:?} failed: {status}"))
            .into_inner()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn client_for(nodes: &[&NodeProcess]) -> Client {
    let mut config = ClientConfig::new(nodes.iter().map(|n| n.address.clone()));
    config.deadline = Duration::from_secs(20);
    Client::new(config).expect("client config")
}

/// A `kvfleet-operator playground` process under test: a Local fleet of nodes plus the
/// controller, on kernel-chosen loopback ports, with no live view. Killed (SIGKILL) on drop,
/// together with its nodes.
pub struct Playground {
    pub dir: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The controller's status API.
    pub control: String,
    /// (node id, address).
    pub nodes: Vec<(String, String)>,
    child: Option<Child>,
}

impl Playground {
    pub fn start(dir: &Path, nodes: usize, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut args: Vec<String> = ["--nodes", &nodes.to_string(), "--base-port", "0", "--listen", "127.0.0.1:0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--view", "none"].iter().map(|s| s.to_string()));
        // Single copies (Raft groups of one voter) unless a test asks for replicas.
        if !extra_args.contains(&"--replicas") {
            args.extend(["--replicas", "1"].iter().map(|s| s.to_string()));
        }
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let mut playground = Playground {
            dir: dir.to_path_buf(),
            args,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            control: String::new(),
            nodes: Vec::new(),
            child: None,
        };
        playground.spawn();
        playground
    }

    /// (Re)starts the controller process; nodes still running from an earlier one are adopted.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the playground is already running");
        let mut command = Command::new(binary("kvfleet-operator"));
        command
            .arg("playground")
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .env("RUST_LOG", "warn,kvfleet_operator=info");
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        let (child, ready) = spawn_until_ready(&mut command, "the playground", Duration::from_secs(90), |line| {
            line.strip_prefix(kvfleet_operator::playground::READY_PREFIX).map(|rest| rest.trim().to_string())
        });
        for field in ready.split_whitespace() {
            if let Some(control) = field.strip_prefix("control=") {
                self.control = control.to_string();
            } else if let Some(nodes) = field.strip_prefix("nodes=") {
                self.nodes = nodes
                    .split(',')
                    .filter_map(|n| n.split_once('@'))
                    .map(|(id, address)| (id.to_string(), address.to_string()))
                    .collect();
            }
        }
        self.child = Some(child);
    }

    /// SIGKILL to the controller only: its nodes run on.
    pub fn kill9_controller(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits (bounded) for the controller to exit by itself (a crash point); true if it did.
    pub fn wait_for_controller_exit(&mut self, within: Duration) -> bool {
        let exited = self.child.as_mut().is_some_and(|child| wait_bounded(child, within).is_some());
        if exited {
            self.child = None;
        }
        exited
    }

    /// The pid of a node process, from the platform's pid file.
    pub fn node_pid(&self, node_id: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("nodes").join(node_id).join("pid")).ok()?.trim().parse().ok()
    }

    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|(_, address)| address.clone()).collect()
    }

    pub fn client(&self) -> Client {
        let mut config = ClientConfig::new(self.addresses());
        config.deadline = Duration::from_secs(40);
        Client::new(config).expect("client config")
    }

    pub async fn status(&self) -> kvfleet_proto::v1::ControllerStatus {
        let channel = Endpoint::from_shared(format!("http://{}", self.control))
            .expect("valid address")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        kvfleet_proto::v1::controller_client::ControllerClient::new(channel)
            .status(kvfleet_proto::v1::ControllerStatusRequest {})
            .await
            .expect("controller status")
            .into_inner()
    }

    /// SIGTERM to the controller and its nodes (what Ctrl-C does), bounded.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the playground is running");
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        wait_or_kill(&mut child, Duration::from_secs(60), "the playground (after SIGTERM)")
    }
}

impl Drop for Playground {
    fn drop(&mut self) {
        self.kill9_controller();
        for (node_id, _) in &self.nodes {
            let data_dir = self.dir.join("nodes").join(node_id).join("data");
            // Only a node of this fleet: a stale pid file must not kill a process that reused the pid.
            if let Some(pid) = self.node_pid(node_id)
                && kvfleet_operator::playground::local::is_node_process(pid, &data_dir)
            {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
    }
}

/// Spawns `command` with stdout piped and waits (bounded) for the first stdout line `ready`
/// accepts; returns the child and what `ready` made of the line. Panics, killing the child, if
/// none comes in time.
fn spawn_until_ready(
    command: &mut Command,
    what: &str,
    within: Duration,
    ready: fn(&str) -> Option<String>,
) -> (Child, String) {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap_or_else(|error| panic!("cannot spawn {what}: {error}"));
    let stdout = child.stdout.take().expect("piped stdout");
    // The process's log lines, each named by the process (several nodes write at once).
    let stderr = child.stderr.take().expect("piped stderr");
    let prefix = what.to_string();
    std::thread::spawn(move || {
        // Drained to the end whatever it holds: a closed pipe would fail the process's writes.
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|read| read > 0) {
            eprintln!("[{prefix}] {}", String::from_utf8_lossy(&line).trim_end());
            line.clear();
        }
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(found) = ready(&line) {
                let _ = ready_tx.send(found);
            }
        }
    });
    match ready_rx.recv_timeout(within) {
        Ok(found) => (child, found),
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().ok();
            panic!("{what} did not become ready within {within:?} (exit: {status:?})");
        }
    }
}

/// The child's exit status, if it exits within `within`.
fn wait_bounded(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child process") {
            return Some(status);
        }
        if Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like `wait_bounded`, but kills the child and panics if it does not exit in time.
fn wait_or_kill(child: &mut Child, within: Duration, what: &str) -> std::process::ExitStatus {
    wait_bounded(child, within).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("{what} was expected to exit within {within:?}");
    })
}

/// Reads every acknowledged write back and fails, with a few examples, on any lost or stale one.
pub async fn assert_all_acked_readable(client: &Client, acked: &std::collections::HashMap<Bytes, Bytes>) {
    let mut wrong = Vec::new();
    for (key, value) in acked {
        let found = client.get(key.clone()).await.expect("read back");
        if found.as_ref() != Some(value) {
            wrong.push((key.clone(), value.clone(), found));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} acknowledged writes lost or stale: {:?}",
        wrong.len(),
        acked.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// The test's platform for a controller run inside the test: the nodes it started (in a fixed
/// order), which of them drain (on Kubernetes: the pods above spec.replicas, and the pod a
/// DrainFirst update restarts next), and the controller's state in memory.
pub struct TestPlatform {
    members: std::sync::Mutex<Vec<kvfleet_resharding::platform::Member>>,
    state: std::sync::Mutex<Option<kvfleet_resharding::state::ReshardingState>>,
}

impl TestPlatform {
    pub fn new(nodes: &[&NodeProcess], state: Option<kvfleet_resharding::state::ReshardingState>) -> Self {
        let members = nodes.iter().map(|n| kvfleet_resharding::platform::Member::at(&n.node_id, &n.address)).collect();
        TestPlatform { members: std::sync::Mutex::new(members), state: std::sync::Mutex::new(state) }
    }

    pub fn set_draining(&self, node_id: &str, draining: bool) {
        let mut members = self.members.lock().expect("members lock");
        members.iter_mut().filter(|m| m.node_id == node_id).for_each(|m| m.draining = draining);
    }

    /// Takes `node_id` out of the members without a drain (a StatefulSet shrunk by hand).
    pub fn remove_member(&self, node_id: &str) {
        self.members.lock().expect("members lock").retain(|m| m.node_id != node_id);
    }

    /// Adds `node` back to the members (a StatefulSet scaled back up), after the others.
    pub fn add_member(&self, node: &NodeProcess) {
        let member = kvfleet_resharding::platform::Member::at(&node.node_id, &node.address);
        self.members.lock().expect("members lock").push(member);
    }

    /// The state the controller saved last.
    pub fn state(&self) -> Option<kvfleet_resharding::state::ReshardingState> {
        self.state.lock().expect("state lock").clone()
    }
}

impl kvfleet_resharding::platform::Platform for TestPlatform {
    async fn members(
        &self,
    ) -> Result<Vec<kvfleet_resharding::platform::Member>, kvfleet_resharding::platform::PlatformError> {
        Ok(self.members.lock().expect("members lock").clone())
    }
    async fn load_state(
        &self,
    ) -> Result<Option<kvfleet_resharding::state::ReshardingState>, kvfleet_resharding::platform::PlatformError> {
        Ok(self.state())
    }
    async fn save_state(
        &self,
        state: &kvfleet_resharding::state::ReshardingState,
    ) -> Result<(), kvfleet_resharding::platform::PlatformError> {
        *self.state.lock().expect("state lock") = Some(state.clone());
        Ok(())
    }
}

/// Whether `ranges`, sorted by start key, tile the key space: from the empty start key to the
/// empty end key, each ending where the next starts.
pub fn tile_the_key_space(ranges: &[RangeDescriptor]) -> bool {
    ranges.first().is_some_and(|d| d.start_key.is_empty())
        && ranges.last().is_some_and(|d| d.end_key.is_empty())
        && ranges.windows(2).all(|w| w[0].end_key == w[1].start_key)
}

/// The ranges every node at `addresses` reports holding (a range once per replica).
pub async fn reported_ranges(addresses: &[String]) -> Vec<RangeDescriptor> {
    let mut ranges = Vec::new();
    for address in addresses {
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .expect("valid address")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        let listed = AdminClient::new(channel).list_ranges(ListRangesRequest {}).await.expect("list ranges");
        ranges.extend(listed.into_inner().ranges);
    }
    ranges
}

/// Checks that the ranges the nodes at `addresses` hold are all active and tile the key space:
/// exactly one owner per key, no gap, no overlap. A range counts once, as its most recent
/// descriptor (highest generation, then membership version): every member reports it (both
/// nodes of a single copy's move, for a moment), and a member behind reports an older one.
pub async fn assert_one_owner_per_key(addresses: &[String]) {
    let mut groups: std::collections::BTreeMap<u64, RangeDescriptor> = std::collections::BTreeMap::new();
    for desc in reported_ranges(addresses).await {
        let newer =
            |kept: &RangeDescriptor| (desc.generation, desc.conf_version) > (kept.generation, kept.conf_version);
        if groups.get(&desc.range_id).is_none_or(newer) {
            groups.insert(desc.range_id, desc);
        }
    }
    let mut owned: Vec<RangeDescriptor> = groups.into_values().collect();
    assert!(owned.iter().all(|d| d.state() == RangeState::Active), "a range is left frozen: {owned:?}");
    owned.sort_by(|a, b| a.start_key.cmp(&b.start_key));
    let mut expected_start = Bytes::new();
    for (i, desc) in owned.iter().enumerate() {
        assert_eq!(desc.start_key, expected_start, "gap or overlap before range {} in {owned:?}", desc.range_id);
        if i + 1 < owned.len() {
            assert!(!desc.end_key.is_empty(), "range {} ends at +inf but is not last", desc.range_id);
        }
        expected_start = desc.end_key.clone();
    }
    assert!(expected_start.is_empty(), "the last range does not reach the end of the key space: {owned:?}");
}

/// Sends the log lines of code running in the test process (a resharding loop the test drives)
/// to the test's captured output, shown when it fails: `warn,kvfleet_resharding=info`, or
/// `KVFLEET_TEST_CONTROLLER_LOG`. Once per process; later calls do nothing.
pub fn log_in_process_controller() {
    let filter = std::env::var("KVFLEET_TEST_CONTROLLER_LOG").unwrap_or_else(|_| "warn,kvfleet_resharding=info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 200 ms until it answers `Ok`; after `within`, panics naming `what` and
/// the last reason `check` gave for not being done (what a failure on a slow machine needs).
pub async fn wait_until_explained(what: &str, within: Duration, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let until = Instant::now() + within;
    let mut last = String::from("not checked yet");
    while Instant::now() < until {
        match check().await {
            Ok(()) => return,
            Err(reason) => last = reason,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out after {within:?} waiting for {what}; last: {last}");
}

/// Polls `check` every 200 ms until it holds; panics naming `what` after `within`.
pub async fn wait_until(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out after {within:?} waiting for {what}");
}
