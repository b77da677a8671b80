//! Helpers for end-to-end tests on real processes: start, kill and restart `kvfleet-node`
//! binaries on loopback, each with its own data directory, and talk to them over gRPC.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_client::{Client, ClientConfig};
use kvfleet_proto::v1::admin_client::AdminClient;
use kvfleet_proto::v1::kv_client::KvClient;
use kvfleet_proto::v1::{SplitRangeRequest, SplitRangeResponse};
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
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn kvfleet-node");
        let stdout = child.stdout.take().expect("piped stdout");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(address) = kvfleet_proto::parse_node_ready_line(&line) {
                    let _ = ready_tx.send(address.to_string());
                }
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(address) => self.address = address,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!("node {} did not become ready within 30 s (exit: {status:?})", self.node_id);
            }
        }
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
        let until = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait for node") {
                return status;
            }
            if Instant::now() > until {
                let _ = child.kill();
                panic!("node {} was expected to exit within {within:?}", self.node_id);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
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

    /// Splits `range_id` at `key` into ranges `left_id` and `right_id`; panics on failure.
    pub async fn split(&self, range_id: u64, key: &str, left_id: u64, right_id: u64) -> SplitRangeResponse {
        self.admin()
            .split_range(SplitRangeRequest {
                range_id,
                expected_generation: 0,
                split_key: Bytes::from(key.to_string()),
                left_id,
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
