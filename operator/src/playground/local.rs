//! The Local platform: `kvfleet-node` processes on loopback, each with its own directory under
//! the fleet directory, restarted when they exit, and adopted again (not restarted) when a
//! controller that was killed comes back while they still run.
//!
//! Layout of the fleet directory: `controller-state.json`, and per node `nodes/<id>/` with
//! `data/` (RocksDB), `address` (host:port, kept across restarts), `pid` and `node.log`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use kvfleet_resharding::{Member, Platform, PlatformError, ReshardingState};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(5);
/// A node that ran this long before exiting restarts without backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub dir: PathBuf,
    pub nodes: usize,
    /// Node i (from 1) listens on `base_port + i - 1`; 0 = ports chosen by the kernel on first
    /// start, then kept.
    pub base_port: u16,
    pub node_binary: PathBuf,
    /// Extra `kvfleet-node` flags for every node (durability, load window, ...).
    pub node_args: Vec<String>,
}

pub struct LocalPlatform {
    dir: PathBuf,
    nodes: Vec<Arc<LocalNode>>,
    shutdown: watch::Sender<bool>,
    supervisors: parking_lot::Mutex<Vec<JoinHandle<()>>>,
}

struct LocalNode {
    id: String,
    dir: PathBuf,
    /// The address to listen on at the next start; the real one once known.
    address: parking_lot::Mutex<String>,
    running: parking_lot::Mutex<bool>,
    pid: AtomicU32,
    restarts: AtomicU32,
}

enum RunEnd {
    Exited(String),
    Shutdown,
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PlatformError {
    let path = path.display().to_string();
    move |source| PlatformError::Io { what, path, source }
}

impl LocalPlatform {
    /// Starts (or adopts) every node and waits until each serves.
    pub async fn start(config: LocalConfig) -> Result<Self, PlatformError> {
        let nodes_dir = config.dir.join("nodes");
        std::fs::create_dir_all(&nodes_dir).map_err(io_error("creating", &nodes_dir))?;
        let existing = std::fs::read_dir(&nodes_dir).map_err(io_error("reading", &nodes_dir))?.count();
        if existing > config.nodes {
            return Err(PlatformError::Nodes(format!(
                "{} holds {existing} nodes but {} were asked for; removing nodes (draining them) is not supported by \
                 the Local platform yet: start with --nodes {existing}, or use a new directory",
                config.dir.display(),
                config.nodes
            )));
        }
        if !config.node_binary.exists() {
            return Err(PlatformError::Nodes(format!(
                "kvfleet-node not found at {} (build it with `cargo build --bins`, or pass --node-binary)",
                config.node_binary.display()
            )));
        }
        let (shutdown, _) = watch::channel(false);
        let mut platform = LocalPlatform {
            dir: config.dir.clone(),
            nodes: Vec::new(),
            shutdown,
            supervisors: parking_lot::Mutex::new(Vec::new()),
        };
        for index in 1..=config.nodes {
            let id = format!("n{index}");
            let dir = nodes_dir.join(&id);
            std::fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
            let address = match std::fs::read_to_string(dir.join("address")) {
                Ok(address) if !address.trim().is_empty() => address.trim().to_string(),
                _ if config.base_port == 0 => "127.0.0.1:0".to_string(),
                _ => format!("127.0.0.1:{}", u32::from(config.base_port) + index as u32 - 1),
            };
            let node = Arc::new(LocalNode {
                id,
                dir,
                address: parking_lot::Mutex::new(address),
                running: parking_lot::Mutex::new(false),
                pid: AtomicU32::new(0),
                restarts: AtomicU32::new(0),
            });
            let task = tokio::spawn(supervise(
                node.clone(),
                config.node_binary.clone(),
                config.node_args.clone(),
                platform.shutdown.subscribe(),
            ));
            platform.supervisors.lock().push(task);
            platform.nodes.push(node);
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for node in &platform.nodes {
            while !*node.running.lock() {
                if Instant::now() > deadline {
                    platform.stop().await;
                    return Err(PlatformError::Nodes(format!(
                        "node {} did not start within {READY_TIMEOUT:?}; see {}",
                        node.id,
                        node.dir.join("node.log").display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(platform)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id of a node, if it runs.
    pub fn pid(&self, node_id: &str) -> Option<u32> {
        let node = self.nodes.iter().find(|n| n.id == node_id)?;
        Some(node.pid.load(Ordering::Relaxed)).filter(|&pid| pid != 0)
    }

    /// Stops every node (SIGTERM, then SIGKILL after a grace period) and the supervisors.
    pub async fn stop(&self) {
        let _ = self.shutdown.send(true);
        let tasks: Vec<_> = self.supervisors.lock().drain(..).collect();
        for task in tasks {
            let _ = tokio::time::timeout(STOP_TIMEOUT + Duration::from_secs(5), task).await;
        }
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("controller-state.json")
    }
}

impl Platform for LocalPlatform {
    async fn members(&self) -> Result<Vec<Member>, PlatformError> {
        Ok(self
            .nodes
            .iter()
            .map(|node| Member {
                node_id: node.id.clone(),
                address: node.address.lock().clone(),
                admin_address: None,
                draining: false,
                restarting: false,
                restarts: node.restarts.load(Ordering::Relaxed),
            })
            .collect())
    }

    async fn load_state(&self) -> Result<Option<ReshardingState>, PlatformError> {
        let path = self.state_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| PlatformError::CorruptState { path: path.display().to_string(), source }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error("reading", &path)(error)),
        }
    }

    async fn save_state(&self, state: &ReshardingState) -> Result<(), PlatformError> {
        let bytes = serde_json::to_vec_pretty(state).expect("the state serializes");
        let (path, dir) = (self.state_path(), self.dir.clone());
        tokio::task::spawn_blocking(move || write_durably(&dir, &path, &bytes))
            .await
            .map_err(|e| PlatformError::Nodes(format!("saving the controller state: {e}")))?
    }
}

/// Write to a temporary file, fsync, rename over, fsync the directory: the state file is always
/// either the old or the new version.
fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), PlatformError> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io_error("creating", &tmp))?;
    file.write_all(bytes).map_err(io_error("writing", &tmp))?;
    file.sync_all().map_err(io_error("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error("renaming", path))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("syncing", dir))
}

async fn supervise(node: Arc<LocalNode>, binary: PathBuf, args: Vec<String>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        let end = match node.adoptable_pid() {
            Some(pid) => node.watch_adopted(pid, &mut shutdown).await,
            None => node.run_child(&binary, &args, &mut shutdown).await,
        };
        *node.running.lock() = false;
        node.pid.store(0, Ordering::Relaxed);
        match end {
            RunEnd::Shutdown => return,
            RunEnd::Exited(why) => {
                node.restarts.fetch_add(1, Ordering::Relaxed);
                if started.elapsed() > HEALTHY_RUN {
                    backoff = Duration::from_millis(200);
                }
                tracing::warn!(node = %node.id, %why, restart_in = ?backoff, "node exited; restarting it");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_RESTART_BACKOFF);
            }
        }
    }
}

impl LocalNode {
    fn set_running(&self, pid: u32, address: &str) {
        // Best effort: the files let a restarted controller adopt this process.
        let _ = std::fs::write(self.dir.join("address"), address);
        let _ = std::fs::write(self.dir.join("pid"), pid.to_string());
        *self.address.lock() = address.to_string();
        self.pid.store(pid, Ordering::Relaxed);
        *self.running.lock() = true;
    }

    /// A `kvfleet-node` still running on this node's data directory, left by an earlier
    /// controller process.
    fn adoptable_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.dir.join("pid")).ok()?.trim().parse().ok()?;
        let address = std::fs::read_to_string(self.dir.join("address")).ok()?;
        is_node_process(pid, &self.dir.join("data")).then(|| {
            *self.address.lock() = address.trim().to_string();
            pid
        })
    }

    async fn watch_adopted(&self, pid: u32, shutdown: &mut watch::Receiver<bool>) -> RunEnd {
        let address = self.address.lock().clone();
        self.set_running(pid, &address);
        tracing::info!(node = %self.id, pid, %address, "adopted a running node");
        let data = self.dir.join("data");
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if !is_node_process(pid, &data) {
                        return RunEnd::Exited(format!("adopted process {pid} is gone"));
                    }
                }
                _ = shutdown.changed() => {
                    signal(pid, libc::SIGTERM);
                    let deadline = Instant::now() + STOP_TIMEOUT;
                    while is_node_process(pid, &data) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    if is_node_process(pid, &data) {
                        signal(pid, libc::SIGKILL);
                    }
                    return RunEnd::Shutdown;
                }
            }
        }
    }

    async fn run_child(&self, binary: &Path, args: &[String], shutdown: &mut watch::Receiver<bool>) -> RunEnd {
        let log_path = self.dir.join("node.log");
        let log = match std::fs::OpenOptions::new().create(true).append(true).open(&log_path) {
            Ok(log) => log,
            Err(error) => return RunEnd::Exited(format!("cannot open {}: {error}", log_path.display())),
        };
        let listen = self.address.lock().clone();
        let mut command = tokio::process::Command::new(binary);
        command
            .arg("--node-id")
            .arg(&self.id)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--listen")
            .arg(&listen)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            // Its own process group: a Ctrl-C in the terminal reaches the controller, which
            // stops the nodes in order, instead of every node at once.
            .process_group(0);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => return RunEnd::Exited(format!("cannot start {}: {error}", binary.display())),
        };
        let pid = child.id().unwrap_or_default();
        let Some(stdout) = child.stdout.take() else {
            return RunEnd::Exited("no stdout pipe".into());
        };
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(address) = kvfleet_proto::parse_node_ready_line(&line) {
                    return Some(address.to_string());
                }
            }
            None
        })
        .await;
        match ready {
            Ok(Some(address)) => self.set_running(pid, &address),
            Ok(None) | Err(_) => {
                let _ = child.start_kill();
                let status = child.wait().await;
                return RunEnd::Exited(format!("did not report ready ({status:?}); see {}", log_path.display()));
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        tokio::select! {
            status = child.wait() => RunEnd::Exited(match status {
                Ok(status) => status.to_string(),
                Err(error) => error.to_string(),
            }),
            _ = shutdown.changed() => {
                signal(pid, libc::SIGTERM);
                if tokio::time::timeout(STOP_TIMEOUT, child.wait()).await.is_err() {
                    tracing::warn!(node = %self.id, "did not stop within {STOP_TIMEOUT:?}; killing it");
                    let _ = child.kill().await;
                }
                RunEnd::Shutdown
            }
        }
    }
}

/// True when `pid` is a live `kvfleet-node` serving `data_dir` (guards against pid reuse).
pub fn is_node_process(pid: u32, data_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let is_node = args.first().is_some_and(|arg0| arg0.ends_with(b"kvfleet-node"));
    let data = data_dir.as_os_str().as_encoded_bytes();
    is_node && args.contains(&data) && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill(2) has no memory-safety preconditions; a stale pid only yields ESRCH.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}
