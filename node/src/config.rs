//! The node's command line and configuration: identity, addresses, durability, limits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// What an OK for a write to a single copy promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Durability {
    /// OK after the write (its log entry, for a Raft group of one voter) is fsynced to the WAL;
    /// concurrent writers share fsyncs.
    Sync,
    /// OK after the write is in the WAL (OS page cache); fsynced every --fsync-interval-ms.
    Async,
}

/// What an OK for a write to a replicated range promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReplicationDurability {
    /// OK after a majority of the range's replicas have fsynced the write's log entry (and the
    /// leader applied it). Survives the loss of any minority of replicas.
    Majority,
    /// OK after the leader alone has fsynced the write's log entry; the followers catch up in
    /// the background. Loses what the leader acknowledged and had not replicated yet if it is
    /// lost or deposed first (see `kvfleet_fast_ack_unreplicated_seconds`).
    Fast,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// kvfleet storage node: serves key ranges from RocksDB over gRPC.
#[derive(Debug, Clone, Parser)]
#[command(name = "kvfleet-node", version)]
pub struct NodeConfig {
    /// Stable identity of this node (the pod name on Kubernetes). Stored in the data directory;
    /// a data directory written by another node id is refused.
    #[arg(long, env = "KVFLEET_NODE_ID")]
    pub node_id: String,

    /// Where RocksDB keeps data and range descriptors.
    #[arg(long, env = "KVFLEET_DATA_DIR")]
    pub data_dir: PathBuf,

    /// gRPC listen address (data, admin, health, reflection).
    #[arg(long, env = "KVFLEET_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,

    /// A separate listen address for the admin changes (splits, merges, moves, routing): then
    /// only metadata reads, exports to peers and move outcomes are answered on --listen, so a
    /// NetworkPolicy can open this port to the operator alone. Unset: everything on --listen.
    #[arg(long, env = "KVFLEET_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// Address other nodes and clients use to reach this node; defaults to --listen.
    #[arg(long, env = "KVFLEET_ADVERTISE")]
    pub advertise: Option<String>,

    /// The local IP address this node's connections to the other nodes of its Raft groups come
    /// from (unset: the system picks): for hosts with several addresses, and for fault-injection
    /// tests that tell nodes apart by address.
    #[arg(long, env = "KVFLEET_PEER_SOURCE_IP")]
    pub peer_source_ip: Option<std::net::IpAddr>,

    /// Prometheus metrics listen address (HTTP, path /metrics). Omit to disable.
    #[arg(long, env = "KVFLEET_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// On a node with no ranges yet, create one range covering the whole key space as a single
    /// copy: a Raft group of this node alone (the same as --initial-replicas naming only this
    /// node). Ignored once the node holds or held any range.
    #[arg(long, env = "KVFLEET_BOOTSTRAP")]
    pub bootstrap: bool,

    /// Bootstraps range 1 as a Raft group on these nodes, like etcd's --initial-cluster:
    /// `node-a=host:port,node-b=host:port,node-c=host:port`, 1, 3 or 5 nodes (1: a single copy,
    /// a group of one voter), this node among them, and the same list on every one. Done once,
    /// on a node with no ranges yet; ignored afterwards.
    #[arg(long, env = "KVFLEET_INITIAL_REPLICAS", value_delimiter = ',', conflicts_with = "bootstrap")]
    pub initial_replicas: Vec<String>,

    /// Applied entries a replicated range keeps in its Raft log for followers that fall behind
    /// (a follower further behind gets a snapshot of the range instead). The log is compacted
    /// when it holds twice this many.
    #[arg(long, env = "KVFLEET_RAFT_LOG_KEEP_ENTRIES", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub raft_log_keep_entries: u64,

    /// The rate at which this node sends snapshot files to followers, all transfers together, in
    /// MiB/s (TiKV's snap-io-max-bytes-per-sec), so that a follower catching up does not take the
    /// disk and the network from foreground requests. 0: unlimited.
    #[arg(long, env = "KVFLEET_SNAPSHOT_SEND_MIB_PER_SEC", default_value_t = 64)]
    pub snapshot_send_mib_per_sec: u64,

    #[arg(long, value_enum, env = "KVFLEET_DURABILITY", default_value = "sync")]
    pub durability: Durability,

    /// What OK means for a write to a replicated range (single copies follow --durability).
    #[arg(long, value_enum, env = "KVFLEET_REPLICATION_DURABILITY", default_value = "majority")]
    pub replication_durability: ReplicationDurability,

    /// In async mode, how often the WAL is fsynced in the background.
    #[arg(long, env = "KVFLEET_FSYNC_INTERVAL_MS", default_value_t = 1000)]
    pub fsync_interval_ms: u64,

    #[arg(long, env = "KVFLEET_MAX_KEY_BYTES", default_value_t = 4 * 1024)]
    pub max_key_bytes: usize,

    #[arg(long, env = "KVFLEET_MAX_VALUE_BYTES", default_value_t = 1024 * 1024)]
    pub max_value_bytes: usize,

    /// Sum of key and value bytes in one Batch request.
    #[arg(long, env = "KVFLEET_MAX_BATCH_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_batch_bytes: usize,

    /// Largest page a Scan returns, in pairs.
    #[arg(long, env = "KVFLEET_MAX_SCAN_LIMIT", default_value_t = 10_000)]
    pub max_scan_limit: u32,

    /// Per-range load accounting (rates, key samples, hot keys). Off only to measure its cost.
    #[arg(long, env = "KVFLEET_LOAD_ACCOUNTING", default_value_t = true, action = clap::ArgAction::Set)]
    pub load_accounting: bool,

    /// Sliding window over which load rates are reported.
    #[arg(long, env = "KVFLEET_LOAD_WINDOW_SECS", default_value_t = 10)]
    pub load_window_secs: u64,

    #[arg(long, value_enum, env = "KVFLEET_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Threads serving requests (the tokio runtime's workers); default: the CPUs this process
    /// may use (cgroup quotas included).
    #[arg(long, env = "KVFLEET_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// How long a graceful shutdown waits for in-flight requests before giving up.
    #[arg(long, env = "KVFLEET_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// The cluster's admin token: admin calls (splits, moves, routing, exports) without it are
    /// refused, and this node sends it on its own admin calls to peers. Unset: admin calls are
    /// open (the playground). On Kubernetes the operator sets it from a per-cluster Secret.
    #[arg(long, env = "KVFLEET_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

impl NodeConfig {
    pub fn advertise_address(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    pub fn fsync_interval(&self) -> Duration {
        Duration::from_millis(self.fsync_interval_ms.max(1))
    }

    /// The largest gRPC message the node decodes: room for a full batch plus framing, so that
    /// over-limit requests reach the node's own checks and get its precise error.
    pub fn max_message_bytes(&self) -> usize {
        let largest_payload = self.max_batch_bytes.max(self.max_key_bytes + self.max_value_bytes);
        largest_payload * 2 + (1 << 20)
    }

    /// `--initial-replicas` as (node id, address) pairs, checked: 1, 3 or 5 distinct nodes, this
    /// node among them, every address host:port.
    pub fn initial_members(&self) -> Result<Vec<(String, String)>, String> {
        let mut members: Vec<(String, String)> = Vec::new();
        for entry in &self.initial_replicas {
            let Some((node_id, address)) = entry.trim().split_once('=') else {
                return Err(format!("--initial-replicas: {entry:?} is not node-id=host:port"));
            };
            members.push((node_id.trim().to_string(), address.trim().to_string()));
        }
        check_members("--initial-replicas", &members, &self.node_id)?;
        Ok(members)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.node_id.is_empty() || self.node_id.len() > 253 {
            return Err(format!("--node-id must be 1 to 253 characters, got {}", self.node_id.len()));
        }
        if self.max_key_bytes == 0 || self.max_value_bytes == 0 || self.max_batch_bytes == 0 {
            return Err("--max-key-bytes, --max-value-bytes and --max-batch-bytes must be positive".into());
        }
        if self.max_key_bytes > 64 * 1024 {
            return Err(format!("--max-key-bytes is at most 65536, got {}", self.max_key_bytes));
        }
        if self.worker_threads == Some(0) {
            return Err("--worker-threads must be at least 1".into());
        }
        if self.load_window_secs == 0 || self.load_window_secs > 600 {
            return Err(format!("--load-window-secs must be 1 to 600, got {}", self.load_window_secs));
        }
        if !self.initial_replicas.is_empty() {
            self.initial_members()?;
        }
        if self.admin_listen == Some(self.listen) {
            return Err(format!("--admin-listen must differ from --listen ({})", self.listen));
        }
        Ok(())
    }
}

/// Checks the nodes a range is first replicated on (`what` names where they came from): each
/// `node-id` and `host:port`, distinct, 1, 3 or 5 of them, `this_node` among them.
pub fn check_members(what: &str, members: &[(String, String)], this_node: &str) -> Result<(), String> {
    for (index, (node_id, address)) in members.iter().enumerate() {
        let port = address.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
        if node_id.is_empty() || port.is_none_or(|p| p.parse::<u16>().is_err()) {
            return Err(format!("{what}: {node_id}={address} is not node-id=host:port"));
        }
        if members[..index].iter().any(|(id, _)| id == node_id) {
            return Err(format!("{what}: node {node_id:?} is listed twice"));
        }
    }
    if ![1, 3, 5].contains(&members.len()) {
        return Err(format!(
            "{what} lists {} nodes; a range has 1, 3 or 5 replicas (a majority of an even count tolerates no more failures than one fewer)",
            members.len()
        ));
    }
    if !members.iter().any(|(id, _)| id == this_node) {
        return Err(format!("{what} does not list this node ({this_node:?})"));
    }
    Ok(())
}
