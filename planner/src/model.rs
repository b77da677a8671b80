//! What the planner sees (nodes, ranges with their load, actions in flight) and what it decides
//! (actions, each with its reason, and the decisions not taken, each with its reason).

use std::fmt;

pub type Key = Vec<u8>;
pub type RangeId = u64;

/// A node, by its position in `ClusterView::nodes`. Not for people: they read `NodeView::name`
/// (hence no `Display`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub id: NodeId,
    /// The node's stable name (its node id: `n1`, a pod name), as every view prints it.
    pub name: String,
    /// May receive ranges (alive, not being drained).
    pub schedulable: bool,
    /// Being emptied (scale-in): every range on it should move away.
    pub draining: bool,
    /// Draining only to restart: replicated ranges keep their replica here and move only their
    /// leadership away; single copies move off as in any drain.
    pub restarting: bool,
    /// No longer a member of the fleet (gone from the platform's list: a StatefulSet shrunk by
    /// hand) yet still a voter of replicated ranges: never schedulable, taken to be down (no
    /// voluntary move on its ranges), and once `draining`, drained as a node that does not
    /// answer (its replicas are re-created on members by membership changes).
    pub departed: bool,
}

/// Per-second rates over the node's load window.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Load {
    pub reads: f64,
    pub writes: f64,
    pub read_bytes: f64,
    pub write_bytes: f64,
}

impl Load {
    pub fn ops(&self) -> f64 {
        self.reads + self.writes
    }
    pub fn bytes(&self) -> f64 {
        self.read_bytes + self.write_bytes
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RangeView {
    pub id: RangeId,
    pub start: Key,
    /// Exclusive; empty = end of the key space.
    pub end: Key,
    /// The node that serves the range: a single copy's node, a replicated range's leader.
    pub owner: NodeId,
    /// The nodes holding a voting replica, the owner among them. Empty for a single copy.
    pub replicas: Vec<NodeId>,
    /// All of the range's load, wherever it was served ...
    pub load: Load,
    /// ... of which these reads (ops/s) other replicas served (follower and stale reads), by
    /// node: that load stays on their nodes when leadership moves.
    pub follower_reads: Vec<(NodeId, f64)>,
    /// Voting replicas whose node answers but holds no copy (its disk was replaced): to be
    /// re-created, elsewhere if a node holds none, else on the same node.
    pub lost: Vec<NodeId>,
    /// How many voting replicas the range lacks for the fleet's replication factor (a replica
    /// removed and not added back): one is added on a node holding none.
    pub missing_voters: usize,
    pub size_bytes: u64,
    /// Keys sampled in proportion to load, with the operations each stands for.
    pub samples: Vec<(Key, f64)>,
    /// The hottest keys and their ops/s, hottest first.
    pub hot_keys: Vec<(Key, f64)>,
    /// A key near the middle of the range by size, if the node could tell.
    pub size_middle_key: Option<Key>,
    /// When (caller's clock, seconds) this range was created by a split, if it was.
    pub split_at: Option<u64>,
    /// When this range last moved between nodes.
    pub moved_at: Option<u64>,
}

impl RangeView {
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }

    /// Strictly inside: a valid split point.
    pub fn is_interior(&self, key: &[u8]) -> bool {
        key > self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }

    /// Every node holding a copy: the voting replicas, or the owner of a single copy.
    pub fn holders(&self) -> Vec<NodeId> {
        if self.replicas.is_empty() { vec![self.owner] } else { self.replicas.clone() }
    }

    /// A Raft group of several replicas (moves are membership changes, load follows the leader).
    pub fn is_replicated(&self) -> bool {
        self.replicas.len() > 1
    }

    /// The load the owner serves itself: all of it, less what other replicas served.
    pub fn owner_ops(&self) -> f64 {
        (self.load.ops() - self.follower_reads.iter().map(|(_, ops)| ops).sum::<f64>()).max(0.0)
    }

    /// True when the range holds exactly one key: `[k, k\0)`.
    pub fn is_single_key(&self) -> bool {
        self.end.len() == self.start.len() + 1 && self.end.starts_with(&self.start) && self.end.last() == Some(&0)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub nodes: Vec<NodeView>,
    /// Every range, in any order; together they tile the key space.
    pub ranges: Vec<RangeView>,
    /// Actions started and not yet finished.
    pub in_flight: Vec<Action>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SplitReason {
    /// Larger than `split_bytes`.
    Size { size_bytes: u64 },
    /// Above the load threshold for the sustain window; the key balances the two halves.
    Load { ops: f64, left_share: f64 },
    /// One key carries most of the range's load: cut it out into its own range.
    IsolateHotKey { share: f64 },
}

#[derive(Debug, Clone, PartialEq)]
pub enum MoveReason {
    /// Node loads differ by more than the tolerance.
    BalanceLoad { from_load: f64, to_load: f64 },
    /// Node sizes differ by more than the tolerance (load is balanced).
    BalanceSize { from_bytes: u64, to_bytes: u64 },
    /// Nodes hold replicas of replicated ranges in numbers more than one apart.
    BalanceReplicas { from_count: usize, to_count: usize },
    /// The owner is being drained.
    Drain,
    /// Put next to its cold neighbour so the two can merge.
    ColocateForMerge { neighbour: RangeId },
    /// The replica on `from` lost its copy; `to == from`: re-created on the same node.
    ReplaceLost,
    /// `from` is no longer a member of the fleet.
    LeftFleet,
}

/// Why two neighbours merge.
#[derive(Debug, Clone, PartialEq)]
pub enum MergeReason {
    /// Both stayed below the merge thresholds for the merge delay; together they still are.
    Cold { ops: f64, size_bytes: u64, cold_for: u64 },
    /// The right range is frozen for a merge already (one interrupted): it serves nothing until
    /// the merge is finished.
    Frozen,
}

impl fmt::Display for SplitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitReason::Size { size_bytes } => write!(f, "size {:.1} MiB", *size_bytes as f64 / 1048576.0),
            SplitReason::Load { ops, left_share } => {
                write!(f, "load {ops:.0} ops/s, {:.0}% left of the key", 100.0 * left_share)
            }
            SplitReason::IsolateHotKey { share } => {
                write!(f, "isolating a hot key with {:.0}% of the load", 100.0 * share)
            }
        }
    }
}

impl fmt::Display for MoveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MoveReason::BalanceLoad { from_load, to_load } => {
                write!(f, "balance load: {from_load:.0} vs {to_load:.0} ops/s")
            }
            MoveReason::BalanceSize { from_bytes, to_bytes } => write!(
                f,
                "balance size: {:.1} vs {:.1} MiB",
                *from_bytes as f64 / 1048576.0,
                *to_bytes as f64 / 1048576.0
            ),
            MoveReason::BalanceReplicas { from_count, to_count } => {
                write!(f, "balance replicas: {from_count} vs {to_count} per node")
            }
            MoveReason::Drain => write!(f, "drain"),
            MoveReason::ReplaceLost => write!(f, "replace a replica that lost its copy"),
            MoveReason::LeftFleet => write!(f, "replace a replica on a node that left the fleet"),
            MoveReason::ColocateForMerge { neighbour } => write!(f, "colocate with range {neighbour} to merge"),
        }
    }
}

impl fmt::Display for MergeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MergeReason::Frozen => write!(f, "finishing a merge: the right range is frozen for it"),
            MergeReason::Cold { ops, size_bytes, cold_for } => write!(
                f,
                "cold: {ops:.0} ops/s and {:.1} MiB together, cold for {cold_for}s",
                *size_bytes as f64 / 1048576.0
            ),
        }
    }
}

/// A planned change. On a replicated range, `Move` moves the replica on `from` to `to` (a
/// membership change; the leader's, if it leads, after handing leadership away) and
/// `TransferLeader` moves only the serving, and its load, to a node already holding a replica.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Split {
        range: RangeId,
        key: Key,
        reason: SplitReason,
    },
    Move {
        range: RangeId,
        from: NodeId,
        to: NodeId,
        reason: MoveReason,
    },
    /// Hand a replicated range's leadership from `from` to `to`, which holds a voting replica.
    TransferLeader {
        range: RangeId,
        from: NodeId,
        to: NodeId,
        reason: MoveReason,
    },
    Merge {
        left: RangeId,
        right: RangeId,
        reason: MergeReason,
    },
}

impl Action {
    /// The ranges this action works on.
    pub fn ranges(&self) -> Vec<RangeId> {
        match self {
            Action::Split { range, .. } | Action::Move { range, .. } | Action::TransferLeader { range, .. } => {
                vec![*range]
            }
            Action::Merge { left, right, .. } => vec![*left, *right],
        }
    }

    /// A stable label for metrics and events.
    pub fn kind(&self) -> ActionKind {
        match self {
            Action::Split { .. } => ActionKind::Split,
            Action::Move { .. } => ActionKind::Move,
            Action::TransferLeader { .. } => ActionKind::TransferLeader,
            Action::Merge { .. } => ActionKind::Merge,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActionKind {
    Split,
    Move,
    TransferLeader,
    Merge,
}

impl ActionKind {
    /// The metrics label: `split`, `move`, `transfer_leader`, `merge`.
    pub fn label(self) -> &'static str {
        match self {
            ActionKind::Split => "split",
            ActionKind::Move => "move",
            ActionKind::TransferLeader => "transfer_leader",
            ActionKind::Merge => "merge",
        }
    }

    /// The Kubernetes Event reason: `Split`, `Move`, `TransferLeader`, `Merge`.
    pub fn event_reason(self) -> &'static str {
        match self {
            ActionKind::Split => "Split",
            ActionKind::Move => "Move",
            ActionKind::TransferLeader => "TransferLeader",
            ActionKind::Merge => "Merge",
        }
    }
}

/// What a balancing pass evens out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceMetric {
    /// Ops/s.
    Load,
    /// Bytes stored (moving cold ranges only).
    Size,
    /// Replicas of replicated ranges held.
    Replicas,
}

/// A decision not taken, and why. Counted by `kind()` in metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Skip {
    /// Hot, but not yet for the whole sustain window.
    SplitNotSustained { range: RangeId, hot_for: u64, needed: u64 },
    /// No sampled key divides the load evenly enough.
    NoBalancedSplitKey { range: RangeId, best_left_share: Option<f64> },
    /// The range is a single hot key: it cannot be split further.
    SingleKeyRange { range: RangeId, ops: f64 },
    /// Splitting would create a range smaller than allowed.
    TooSmallToSplit { range: RangeId },
    /// The range moved too recently.
    Cooldown { range: RangeId, seconds_left: u64 },
    /// Node loads are within the tolerance band.
    Balanced { max_over_mean: f64 },
    /// More moves were wanted than `max_concurrent_moves` allows.
    MoveBudgetExhausted { wanted: usize },
    /// No range on the busiest node (by `metric`) can move without making another node the
    /// busiest.
    NoBeneficialMove { node: String, metric: BalanceMetric, value: f64 },
    /// No node can receive ranges.
    NoTargetNode,
    /// Cold neighbours, but one was split too recently to merge.
    MergeDelay { left: RangeId, right: RangeId, seconds_left: u64 },
    /// Cold neighbours, replicated, that cannot merge or align their replicas now.
    ReplicatedMergeHeld { left: RangeId, right: RangeId, reason: MergeHeld },
    /// A replica must leave a draining node, but every schedulable node already holds one.
    NoNodeForReplica { range: RangeId, node: String },
    /// A leadership must leave a node about to restart, but no other replica is on a
    /// schedulable node.
    NoNodeForLeader { range: RangeId, node: String },
}

/// Why two cold replicated neighbours are not merged (or aligned for it) this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeHeld {
    /// One of them has a single copy, the other replicas (fleets are one or the other).
    SingleCopyNeighbour,
    /// A replica of one of them is down, lost or missing: a merge needs every replica.
    ReplicaDown,
    /// Their replicas are on different nodes and none of the larger one's nodes can take a
    /// replica of the smaller one (draining, or not answering).
    NoNodeToAlign,
}

impl fmt::Display for MergeHeld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MergeHeld::SingleCopyNeighbour => "one has a single copy, the other replicas",
            MergeHeld::ReplicaDown => "a replica of one of them is down, lost or missing (a merge needs every replica)",
            MergeHeld::NoNodeToAlign => "their replicas are on different nodes, and no node can take one to align them",
        })
    }
}

impl Skip {
    /// The range the decision was about, if it was about one range (for merges, the left one).
    pub fn range(&self) -> Option<RangeId> {
        match self {
            Skip::SplitNotSustained { range, .. }
            | Skip::NoBalancedSplitKey { range, .. }
            | Skip::SingleKeyRange { range, .. }
            | Skip::TooSmallToSplit { range }
            | Skip::Cooldown { range, .. } => Some(*range),
            Skip::MergeDelay { left, .. } | Skip::ReplicatedMergeHeld { left, .. } => Some(*left),
            Skip::NoNodeForReplica { range, .. } | Skip::NoNodeForLeader { range, .. } => Some(*range),
            Skip::Balanced { .. }
            | Skip::MoveBudgetExhausted { .. }
            | Skip::NoBeneficialMove { .. }
            | Skip::NoTargetNode => None,
        }
    }

    /// A stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Skip::SplitNotSustained { .. } => "split_not_sustained",
            Skip::NoBalancedSplitKey { .. } => "no_balanced_split_key",
            Skip::SingleKeyRange { .. } => "single_key_range",
            Skip::TooSmallToSplit { .. } => "too_small_to_split",
            Skip::Cooldown { .. } => "cooldown",
            Skip::Balanced { .. } => "balanced",
            Skip::MoveBudgetExhausted { .. } => "move_budget_exhausted",
            Skip::NoBeneficialMove { .. } => "no_beneficial_move",
            Skip::NoTargetNode => "no_target_node",
            Skip::MergeDelay { .. } => "merge_delay",
            Skip::ReplicatedMergeHeld { reason: MergeHeld::SingleCopyNeighbour, .. } => "merge_single_copy_neighbour",
            Skip::ReplicatedMergeHeld { reason: MergeHeld::ReplicaDown, .. } => "merge_replica_down",
            Skip::ReplicatedMergeHeld { reason: MergeHeld::NoNodeToAlign, .. } => "merge_no_node_to_align",
            Skip::NoNodeForReplica { .. } => "no_node_for_replica",
            Skip::NoNodeForLeader { .. } => "no_node_for_leader",
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::SplitNotSustained { range, hot_for, needed } => {
                write!(f, "range {range}: hot for {hot_for}s, splits after {needed}s")
            }
            Skip::NoBalancedSplitKey { range, best_left_share: Some(share) } => write!(
                f,
                "range {range}: no split key: the best candidate leaves {:.0}% of the load on one side",
                100.0 * share.max(1.0 - share)
            ),
            Skip::NoBalancedSplitKey { range, best_left_share: None } => {
                write!(f, "range {range}: no split key: no sampled key inside the range")
            }
            Skip::SingleKeyRange { range, ops } => {
                write!(f, "range {range}: a single hot key ({ops:.0} ops/s) cannot be split further")
            }
            Skip::TooSmallToSplit { range } => write!(f, "range {range}: too small to split"),
            Skip::Cooldown { range, seconds_left } => {
                write!(f, "range {range}: moved recently, cooldown {seconds_left}s left")
            }
            Skip::Balanced { max_over_mean } => {
                write!(f, "balanced: busiest node at {max_over_mean:.2}x the mean, within tolerance")
            }
            Skip::MoveBudgetExhausted { wanted } => {
                write!(f, "move budget exhausted: {wanted} more moves wanted")
            }
            Skip::NoBeneficialMove { node, metric: BalanceMetric::Load, value } => {
                write!(f, "{node} ({value:.0} ops/s): no range moves without overloading the target")
            }
            Skip::NoBeneficialMove { node, metric: BalanceMetric::Size, value } => {
                write!(f, "{node} ({:.0} MiB): no cold range moves without making the target larger", value / 1048576.0)
            }
            Skip::NoBeneficialMove { node, metric: BalanceMetric::Replicas, value } => {
                write!(f, "{node} ({value:.0} replicas): no replica can move to the node holding fewest")
            }
            Skip::NoTargetNode => write!(f, "no schedulable node to move ranges to"),
            Skip::MergeDelay { left, right, seconds_left } => {
                write!(f, "ranges {left} and {right}: cold, merge waits {seconds_left}s after their split")
            }
            Skip::ReplicatedMergeHeld { left, right, reason } => {
                write!(f, "ranges {left} and {right}: cold, but not merged now: {reason}")
            }
            Skip::NoNodeForReplica { range, node } => write!(
                f,
                "range {range}: its replica on draining {node} has nowhere to go: every schedulable node holds one"
            ),
            Skip::NoNodeForLeader { range, node } => write!(
                f,
                "range {range}: its leadership cannot leave {node} before it restarts: no other replica is on a schedulable node"
            ),
        }
    }
}

/// The outcome of one round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub skipped: Vec<Skip>,
    /// Keys found carrying most of their range's load: (range, key, ops/s).
    pub hot_keys: Vec<(RangeId, Key, f64)>,
}
