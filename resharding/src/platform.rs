//! Where the fleet runs. The resharding loop asks its `Platform` which nodes exist and where to
//! keep its state; the playground's Local platform (node processes on loopback) and the
//! Kubernetes platform (pods of a StatefulSet, state in a ConfigMap) implement it, in the
//! operator crate.

use std::future::Future;

use crate::state::ReshardingState;

/// A storage node as the platform knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node_id: String,
    /// host:port of the node's gRPC endpoint (data, metadata, and what peers read).
    pub address: String,
    /// host:port of the node's admin port, where it takes changes, if it has its own
    /// (`--admin-listen`; Kubernetes); None: `address`.
    pub admin_address: Option<String>,
    /// Being emptied before it goes away: ranges move off it, none move onto it.
    pub draining: bool,
    /// Draining only to restart (a DrainFirst update), not to go away: a replicated range keeps
    /// its replica here and only its leadership leaves (the other replicas serve meanwhile);
    /// single copies still move off.
    pub restarting: bool,
    /// Times the platform restarted the node's process.
    pub restarts: u32,
}

impl Member {
    /// A member at `address`, not draining, never restarted, with no admin port of its own.
    pub fn at(node_id: &str, address: &str) -> Self {
        Member {
            node_id: node_id.to_string(),
            address: address.to_string(),
            admin_address: None,
            draining: false,
            restarting: false,
            restarts: 0,
        }
    }

    /// Where the controller sends its admin calls.
    pub fn admin_address(&self) -> &str {
        self.admin_address.as_deref().unwrap_or(&self.address)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("the controller state in {path} is unreadable: {source}")]
    CorruptState { path: String, source: serde_json::Error },
    #[error("{0}")]
    Nodes(String),
    #[error("Kubernetes API: {0}")]
    Api(String),
    /// The fleet no longer exists (its custom resource was deleted): the controller stops.
    #[error("{0}")]
    Gone(String),
    /// The saved state changed since this controller read it (another operator wrote it), or
    /// this controller no longer leads: it must stop, and start again from the saved state.
    #[error("{0}")]
    Superseded(String),
}

pub trait Platform: Send + Sync + 'static {
    /// The nodes of the fleet now, in a stable order.
    fn members(&self) -> impl Future<Output = Result<Vec<Member>, PlatformError>> + Send;
    /// The state saved by `save_state`, if any.
    fn load_state(&self) -> impl Future<Output = Result<Option<ReshardingState>, PlatformError>> + Send;
    /// Durably replaces the saved state.
    fn save_state(&self, state: &ReshardingState) -> impl Future<Output = Result<(), PlatformError>> + Send;
}
