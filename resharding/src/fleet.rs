//! The fleet as the resharding loop last saw it, typed: what a platform decides on (the
//! Kubernetes reconciler's scale-in and rollouts, its status conditions) and what the status API,
//! Events and the live view render. Nothing here is text meant for people, except `Display`.

use std::fmt;

use kvfleet_planner::MoveReason;
use kvfleet_proto::v1::{self as wire, RangeDescriptor};

/// What the last round knew of a node.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeState {
    /// It answered, and may receive ranges.
    Up,
    /// It answered, and is being emptied: its ranges move off, none move onto it.
    Draining,
    /// It did not answer; what it holds is unknown this round.
    Down { error: String },
}

impl NodeState {
    pub fn is_down(&self) -> bool {
        matches!(self, NodeState::Down { .. })
    }

    pub fn to_wire(&self) -> wire::NodeState {
        match self {
            NodeState::Up => wire::NodeState::Up,
            NodeState::Draining => wire::NodeState::Draining,
            NodeState::Down { .. } => wire::NodeState::Down,
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeState::Up => write!(f, "up"),
            NodeState::Draining => write!(f, "draining"),
            NodeState::Down { error } => write!(f, "down: {error}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FleetNode {
    /// The node's stable name (`n1`, a pod name).
    pub name: String,
    pub address: String,
    pub state: NodeState,
    /// Everything it holds, conflicting and superseded copies included: a node that holds
    /// anything must not look empty to a scale-in.
    pub ranges: u32,
    /// Of those, replicas of replicated ranges it does not lead: they may restart with the node
    /// (the other replicas serve meanwhile).
    pub following: u32,
    pub ops_per_sec: f64,
    pub size_bytes: u64,
    /// Times the platform restarted its process.
    pub restarts: u32,
}

/// Why a move in flight started.
#[derive(Debug, Clone, PartialEq)]
pub enum MoveCause {
    /// This loop planned it.
    Planned(MoveReason),
    /// Recorded before a restart of the loop (or found frozen on its source), as it was written then.
    Recorded(String),
}

impl fmt::Display for MoveCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MoveCause::Planned(reason) => reason.fmt(f),
            MoveCause::Recorded(text) => f.write_str(text),
        }
    }
}

/// Where a move in flight is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MovePhase {
    /// Its task runs: copying, catching up, handing off.
    Moving,
    /// Started before a restart or failed: recovery finishes or rolls it back.
    Recovering,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FleetMove {
    pub move_id: u64,
    pub range_id: u64,
    /// Node names.
    pub from: String,
    pub to: String,
    pub phase: MovePhase,
    pub cause: MoveCause,
    pub started_unix_ms: u64,
}

impl FleetMove {
    pub fn touches(&self, node: &str) -> bool {
        self.from == node || self.to == node
    }
}

/// Two active copies overlapping on different nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// (node name, descriptor).
    pub older: (String, RangeDescriptor),
    pub newer: (String, RangeDescriptor),
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |(node, d): &(String, RangeDescriptor)| {
            format!("range {} {} (generation {}) on {node}", d.range_id, d.span(), d.generation)
        };
        write!(f, "{} overlaps {}", side(&self.older), side(&self.newer))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HotKey {
    pub range_id: u64,
    pub key: Vec<u8>,
    pub ops_per_sec: f64,
}

/// The fleet after the last round (`round` 0: no round yet, nothing is known).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetView {
    pub round: u64,
    pub nodes: Vec<FleetNode>,
    /// Serving ranges.
    pub ranges: usize,
    pub moves: Vec<FleetMove>,
    pub conflicts: Vec<Conflict>,
    /// Hottest first.
    pub hot_keys: Vec<HotKey>,
    /// Replicas of every range the fleet was created with (1: single copies).
    pub replication_factor: usize,
    /// Ranges with fewer voting replicas on answering nodes than `replication_factor`.
    pub under_replicated: Vec<u64>,
    /// Replicated ranges no answering node leads.
    pub leaderless: Vec<u64>,
}

impl FleetView {
    pub fn node(&self, name: &str) -> Option<&FleetNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Moves in flight from or to `node`.
    pub fn moves_touching(&self, node: &str) -> usize {
        self.moves.iter().filter(|m| m.touches(node)).count()
    }
}
