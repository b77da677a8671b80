//! Merging two adjacent replicated ranges through their logs, the node's side (CockroachDB's
//! subsume, TiKV's PrepareMerge/CommitMerge): on the node that leads both, freeze the right range
//! through its log, wait until every replica of it holds its log up to the freeze, then merge
//! it into the left range through the left range's log. The ranges' replicas must be on the same
//! nodes first (the caller moves them: `kvfleet-resharding`'s `replica_merges`), so every node
//! that applies the merge holds the right range's data already: nothing is copied.
//!
//! Once a freeze is applied, the right range serves nothing until the merge is finished by
//! asking again (whoever leads the ranges then). If it cannot finish (a replica of the right range
//! is on a node lost for good, and the merge needs every replica), `abort_merge` undoes it: the
//! left range refuses that merge for good through its log (`RaftMergeFence`, applied only if no
//! merge was ordered before it) unless its log can no longer take it, then the right range is
//! thawed through its own (`RaftThaw`).

use std::time::{Duration, Instant};

use kvfleet_proto::v1::{
    AbortMergeRequest, ListRangesRequest, MergeRangesRequest, NodeInfoRequest, RaftFreeze, RaftMerge, RaftMergeFence,
    RaftThaw, RangeDescriptor, RangeState, ReplicaMembership,
};

use crate::error::NodeError;
use crate::node::Node;
use crate::ranges::MergePlan;
use crate::replica::apply;
use crate::replica::peer_features::PeerSupport;

/// What this version can do that earlier ones could not (`NodeInfoResponse::features`).
pub const FEATURES: &[&str] = &[MERGE_ABORT_FEATURE];

/// The features this node tells its peers (with its Raft messages) and its callers (NodeInfo):
/// `FEATURES`, or, for fault tests that play an earlier version to the other nodes, the
/// comma-separated list in `KVFLEET_TEST_FEATURES` (what the node applies is unchanged).
pub fn advertised_features() -> &'static [String] {
    static ADVERTISED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    ADVERTISED.get_or_init(|| match std::env::var("KVFLEET_TEST_FEATURES") {
        Ok(list) => list.split(',').filter(|f| !f.is_empty()).map(str::to_string).collect(),
        Err(_) => FEATURES.iter().map(|f| f.to_string()).collect(),
    })
}

/// The feature of applying RaftMergeFence and RaftThaw entries: a node without it takes them for
/// empty entries, so its replica of a thawed range would stay frozen while the others take writes.
const MERGE_ABORT_FEATURE: &str = "merge-abort";

/// How long a merge waits for every replica of the right range to hold its log up to the freeze.
const FREEZE_REACH_WAIT: Duration = Duration::from_secs(10);

impl Node {
    /// Merges `request.right_id` into `request.left_id` through their logs (see the module).
    /// The left range keeps its id. Returns the merged range and the two as they were.
    pub async fn merge(&self, request: MergeRangesRequest) -> Result<MergePlan, NodeError> {
        let (left_id, right_id) = (request.left_id, request.right_id);
        let _claims = (self.key_changes.claim(left_id)?, self.key_changes.claim(right_id)?);
        let (left, right) = self.merge_pair(left_id, right_id)?;
        check_mergeable(&request, &left, &right)?;
        if right.is_frozen_for_merge() && right.merge_left_id != 0 && right.merge_left_id != left_id {
            return Err(NodeError::Move(format!(
                "range {right_id} is frozen to be merged into range {}, not {left_id}",
                right.merge_left_id
            )));
        }
        if self.table.read().frozen_into(right_id).is_some() {
            return Err(NodeError::Move(format!(
                "range {right_id}'s own right neighbour is frozen to be merged into it: merge that first; retry"
            )));
        }
        if !right.is_frozen_for_merge() {
            self.check_replicas_answer(&right).await?;
            // The left range's generation as its log stands (this node must lead it): everything
            // committed so far applied here, a split a previous leader left in the log included.
            // The freeze records it, and only that generation of the left range may merge it.
            let barrier = self.replication.read_barrier(left_id, false).await;
            barrier.map_err(|error| self.replica_error(&left, &left.start_key, error))?;
            let (left, _) = self.merge_pair(left_id, right_id)?;
            check_mergeable(&request, &left, &right)?;
            let freeze =
                RaftFreeze { expected_generation: right.generation, left_id, left_generation: left.generation };
            let frozen = self.replication.propose_freeze(right_id, freeze).await;
            frozen.map_err(|error| self.replica_error(&right, &right.start_key, error))?;
            kvfleet_proto::failpoint::hit("merge-after-freeze");
        }
        let right = self.stored_descriptor(right_id)?;
        if !right.is_frozen_for_merge() {
            return Err(NodeError::Move(format!("range {right_id} is not frozen after its freeze applied")));
        }
        self.wait_for_freeze_everywhere(&right).await?;
        // The left range as it is now: a split or membership change meanwhile is refused by
        // the merge entry itself, which expects this generation and membership version.
        let (left, _) = self.merge_pair(left_id, right_id)?;
        let merge = RaftMerge {
            expected_generation: left.generation,
            expected_conf_version: left.conf_version,
            right: Some(right.clone()),
        };
        let merged = self.replication.propose_merge(left_id, merge).await;
        merged.map_err(|error| self.replica_error(&left, &left.start_key, error))?;
        // Range metadata is durable before OK in every mode: a single copy's log entries may
        // not be fsynced yet (`--durability async`).
        self.storage.sync_wal().await?;
        let merged = self.stored_descriptor(left_id)?;
        tracing::info!(
            left_id,
            right_id,
            span = %merged.span(),
            generation = merged.generation,
            "merged replicated ranges through their logs"
        );
        Ok(MergePlan { merged: self.replication.with_roles(merged), retired: [left, right] })
    }

    /// Undoes the freeze of `request.right_id` (see the module): on the node leading both ranges
    /// (or the right one, if the left one was merged away here). Returns the right range, active
    /// again, and the left one as it stands here, if it still does. Asking again is answered alike.
    ///
    /// The thaw is safe once the left range's log, applied here up to now, can never apply the
    /// merge of this freeze and has not (this node's replica of the right range is still frozen,
    /// where the merge would have retired it): the left range refused it for good (a fence), or
    /// is at another generation than the freeze recorded (a split or fence since: every merge of
    /// the freeze expects that generation), or is frozen itself or merged away (its log takes no
    /// merge after its own freeze). Otherwise it is fenced first.
    pub async fn abort_merge(
        &self,
        request: AbortMergeRequest,
    ) -> Result<(RangeDescriptor, Option<RangeDescriptor>), NodeError> {
        let (left_id, right_id) = (request.left_id, request.right_id);
        if request.freeze_index == 0 {
            return Err(NodeError::Invalid(format!(
                "name the index of range {right_id}'s freeze to undo (freeze_index): a retry must not undo a later one"
            )));
        }
        let _claims = (self.key_changes.claim(left_id)?, self.key_changes.claim(right_id)?);
        let right = self.owned_descriptor(right_id).ok_or(NodeError::UnknownRange(right_id))?;
        if !right.is_frozen_for_merge() {
            return Ok((right, self.owned_descriptor(left_id)));
        }
        let frozen_at = right.merge_freeze_index;
        if request.freeze_index != frozen_at {
            return Err(NodeError::Invalid(format!(
                "range {right_id} is frozen at index {frozen_at}, not {}",
                request.freeze_index
            )));
        }
        if right.merge_left_id == 0 {
            return Err(NodeError::Move(format!(
                "range {right_id} was frozen by an earlier version, which did not record the range it merges into: \
                 its freeze cannot be undone, only its merge finished"
            )));
        }
        if right.merge_left_id != left_id {
            return Err(NodeError::Invalid(format!(
                "range {right_id} is frozen to be merged into range {}, not {left_id}",
                right.merge_left_id
            )));
        }
        let left = self.owned_descriptor(left_id);
        let silent = SilentNodes { lost: &request.lost_node_ids, decommissioned: &request.decommissioned_node_ids };
        self.check_replicas_can_thaw(left.as_ref(), &right, silent).await?;
        // Retired here by a merge of its own freeze: its log took no merge after that freeze. (A
        // range retired because a snapshot of another overlapped it has successors too, but its
        // log may go on elsewhere; one retired by a removal has none.)
        let merged_away_here = || {
            self.stored_descriptor(left_id)
                .is_ok_and(|d| d.state() == RangeState::Retired && !d.successors.is_empty() && d.merge_freeze_index > 0)
        };
        let can_never_merge = match left {
            None if merged_away_here() => true,
            None => return Err(NodeError::UnknownRange(left_id)),
            Some(left) => {
                // The left range's log as it stands, applied here (this node must lead it).
                let barrier = self.replication.read_barrier(left_id, false).await;
                barrier.map_err(|error| self.replica_error(&left, &left.start_key, error))?;
                match self.owned_descriptor(left_id) {
                    None => merged_away_here(),
                    Some(left) => {
                        left.is_frozen_for_merge()
                            || left.generation != right.merge_left_generation
                            || (left.merge_fenced_range_id, left.merge_fenced_freeze_index) == (right_id, frozen_at)
                    }
                }
            }
        };
        let still_frozen = self.stored_descriptor(right_id)?;
        if !still_frozen.is_frozen_for_merge() || still_frozen.merge_freeze_index != frozen_at {
            return Err(NodeError::Move(format!(
                "range {right_id} was merged (or thawed) meanwhile: it is {:?}",
                still_frozen.state()
            )));
        }
        if !can_never_merge {
            let fence =
                RaftMergeFence { right_id, freeze_index: frozen_at, expected_generation: right.merge_left_generation };
            let fenced = self.replication.propose_merge_fence(left_id, fence).await;
            let left = self.stored_descriptor(left_id)?;
            fenced.map_err(|error| self.replica_error(&left, &left.start_key, error))?;
            kvfleet_proto::failpoint::hit("merge-abort-after-fence");
        }
        let thawed = self.replication.propose_thaw(right_id, RaftThaw { freeze_index: frozen_at }).await;
        thawed.map_err(|error| self.replica_error(&right, &right.start_key, error))?;
        self.storage.sync_wal().await?;
        let right = self.stored_descriptor(right_id)?;
        let left = self.owned_descriptor(left_id).map(|desc| self.replication.with_roles(desc));
        tracing::warn!(
            left_id,
            right_id,
            frozen_at,
            fenced = !can_never_merge,
            "merge aborted: the right range is thawed"
        );
        Ok((self.replication.with_roles(right), left))
    }

    /// The two ranges as this node's table has them.
    fn merge_pair(&self, left_id: u64, right_id: u64) -> Result<(RangeDescriptor, RangeDescriptor), NodeError> {
        let desc = |id| self.owned_descriptor(id).ok_or(NodeError::UnknownRange(id));
        Ok((desc(left_id)?, desc(right_id)?))
    }

    /// Range `range_id`'s descriptor as this node's table has it, if it holds the range.
    fn owned_descriptor(&self, range_id: u64) -> Option<RangeDescriptor> {
        self.table.read().by_id(range_id).map(|r| r.desc.clone())
    }

    fn stored_descriptor(&self, range_id: u64) -> Result<RangeDescriptor, NodeError> {
        apply::stored_descriptor(&self.storage.db(), range_id).map_err(NodeError::Corrupt)
    }

    /// Before a freeze, which leaves the range serving nothing until every replica has it: this
    /// node must lead the range and have heard from every replica lately.
    /// (raft-rs forgets who answered at every election timeout: a replica that does not answer
    /// within one and a half is taken to be down.)
    async fn check_replicas_answer(&self, right: &RangeDescriptor) -> Result<(), NodeError> {
        let range_id = right.range_id;
        let deadline = Instant::now() + crate::replica::ELECTION_TIMEOUT.mul_f32(1.5);
        loop {
            let answer = self.replication.lowest_match(range_id).await;
            match answer.map_err(|error| self.replica_error(right, &right.start_key, error))? {
                Some((_, true)) => return Ok(()),
                Some((_, false)) if Instant::now() < deadline => {}
                Some((_, false)) => {
                    return Err(NodeError::Unavailable(format!(
                        "a replica of range {range_id} has not been heard from lately (down or cut off?): it is not \
                         frozen to be merged until every replica answers; retry"
                    )));
                }
                None => {
                    let leader = self.replication.leader_of(range_id);
                    let error = crate::replica::ReplicaError::NotLeader { range_id, leader };
                    return Err(self.replica_error(right, &right.start_key, error));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every replica of the frozen `right` range has applied the freeze: first until
    /// each holds the log up to it (this node must lead it: only the leader knows), then until
    /// each node reports the range frozen at that index. Every node applying the merge then has
    /// the range's data as of the freeze. (One that lost its applied state in a power loss
    /// applies its own log up to the freeze as it merges.)
    async fn wait_for_freeze_everywhere(&self, right: &RangeDescriptor) -> Result<(), NodeError> {
        let (range_id, frozen_at) = (right.range_id, right.merge_freeze_index);
        let deadline = Instant::now() + FREEZE_REACH_WAIT;
        loop {
            let lowest = self.replication.lowest_match(range_id).await;
            match lowest.map_err(|error| self.replica_error(right, &right.start_key, error))? {
                Some((held, _)) if held >= frozen_at && self.every_replica_frozen(right).await => return Ok(()),
                Some(_) => {}
                None => {
                    let error = crate::replica::ReplicaError::NotLeader {
                        range_id,
                        leader: self.replication.leader_of(range_id),
                    };
                    return Err(self.replica_error(right, &right.start_key, error));
                }
            }
            if Instant::now() >= deadline {
                return Err(NodeError::Unavailable(format!(
                    "range {range_id} is frozen to be merged, but a replica of it has not received its log up to \
                     the freeze (index {frozen_at}) within {} s (down or cut off?); the merge finishes when it has: retry",
                    FREEZE_REACH_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The replicas' nodes an undo's caller names as not expected to answer.
#[derive(Clone, Copy)]
struct SilentNodes<'a> {
    /// Down for good, being replaced.
    lost: &'a [String],
    /// Lost for good with their disks.
    decommissioned: &'a [String],
}

impl Node {
    /// Before a fence and a thaw: every other replica's node must answer that it knows how to
    /// apply them. One the caller names lost (down for good, being replaced) may stay silent,
    /// but only if it was last heard running a version that applies them: when it comes back,
    /// it must thaw its copy from the log as the others did. One named decommissioned (its disk
    /// destroyed, as the caller states) may stay silent whatever it ran.
    async fn check_replicas_can_thaw(
        &self,
        left: Option<&RangeDescriptor>,
        right: &RangeDescriptor,
        silent: SilentNodes<'_>,
    ) -> Result<(), NodeError> {
        let mut asked: Vec<&str> = vec![self.config.node_id.as_str()];
        let replicas = left.into_iter().flat_map(|l| &l.replicas).chain(&right.replicas);
        for replica in replicas {
            if asked.contains(&replica.node_id.as_str()) {
                continue;
            }
            asked.push(&replica.node_id);
            let raft_id = crate::replica::raft_id_of(&replica.node_id);
            let decommissioned = silent.decommissioned.contains(&replica.node_id);
            let is_lost = decommissioned || silent.lost.contains(&replica.node_id);
            let unanswered = |why: String| {
                NodeError::Unavailable(format!(
                    "node {} holds a replica of range {} or its left neighbour and did not say whether it can apply \
                     the undoing of a freeze ({why}); retry, or name it lost",
                    replica.node_id, right.range_id
                ))
            };
            // Asked even if named lost: it may be back, on another version.
            let wait = if is_lost { Duration::from_secs(1) } else { Duration::from_secs(2) };
            let mut admin = self.peers.admin(&replica.address).map_err(|e| unanswered(e.to_string()))?;
            let mut request = tonic::Request::new(NodeInfoRequest {});
            request.set_timeout(wait);
            let answer = match admin.node_info(request).await {
                Ok(answer) => answer.into_inner(),
                Err(_) if decommissioned => {
                    tracing::warn!(
                        node = %replica.node_id,
                        right = right.range_id,
                        "a silent node named decommissioned: not held to the version it was last heard running"
                    );
                    continue;
                }
                Err(_) if is_lost => {
                    self.check_silent_can_thaw(&replica.node_id, raft_id, right.range_id)?;
                    continue;
                }
                Err(status) => return Err(unanswered(status.message().to_string())),
            };
            self.replication.peer_features.heard(raft_id, &answer.features);
            if !answer.features.iter().any(|f| f == MERGE_ABORT_FEATURE) {
                return Err(NodeError::Move(format!(
                    "node {} (version {}) cannot apply the undoing of a freeze (feature \"{MERGE_ABORT_FEATURE}\"): \
                     upgrade it first, or let the merge finish",
                    replica.node_id, answer.version
                )));
            }
            // A copy of the freeze stored by an earlier version records no left neighbour: a merge
            // carrying it is not held to the recorded one, so the freeze is only merged.
            let mut request = tonic::Request::new(ListRangesRequest {});
            request.set_timeout(Duration::from_secs(2));
            let ranges = admin.list_ranges(request).await.map_err(|status| unanswered(status.message().to_string()))?;
            let unrecorded = ranges
                .into_inner()
                .ranges
                .into_iter()
                .find(|d| d.range_id == right.range_id && d.is_frozen_for_merge() && d.merge_left_id == 0);
            if unrecorded.is_some() {
                return Err(NodeError::Move(format!(
                    "node {} stored range {}'s freeze without its left neighbour (applied by an earlier version): \
                     the freeze cannot be undone, only its merge finished",
                    replica.node_id, right.range_id
                )));
            }
        }
        Ok(())
    }

    /// Whether silent node `node_id` (Raft id `raft_id`) was last heard with the feature the undo
    /// needs.
    fn check_silent_can_thaw(&self, node_id: &str, raft_id: u64, right_id: u64) -> Result<(), NodeError> {
        let last_heard = match self.replication.peer_features.support(raft_id, MERGE_ABORT_FEATURE) {
            PeerSupport::Has => return Ok(()),
            PeerSupport::Lacks => "was last heard running a version without it",
            PeerSupport::NeverHeard => "was never heard from by this node, so its version is unknown",
        };
        Err(NodeError::Move(format!(
            "node {node_id} does not answer and {last_heard} (feature \"{MERGE_ABORT_FEATURE}\"): back on such a version, \
             it would take the undoing of range {right_id}'s freeze for empty entries and keep its copy frozen; the \
             freeze waits for it to answer (then the merge finishes), or for it to be named decommissioned (its disk \
             destroyed: kvctl abort-merge {right_id} --decommissioned {node_id})",
        )))
    }

    /// Whether every other replica's node lists `right` frozen at its freeze index (it applied
    /// the freeze).
    async fn every_replica_frozen(&self, right: &RangeDescriptor) -> bool {
        for replica in right.replicas.iter().filter(|r| r.node_id != self.config.node_id) {
            let Ok(mut admin) = self.peers.admin(&replica.address) else { return false };
            let mut request = tonic::Request::new(ListRangesRequest {});
            request.set_timeout(Duration::from_secs(2));
            let Ok(answer) = admin.list_ranges(request).await else { return false };
            let frozen = answer.into_inner().ranges.iter().any(|d| {
                d.range_id == right.range_id
                    && d.is_frozen_for_merge()
                    && d.merge_freeze_index == right.merge_freeze_index
            });
            if !frozen {
                return false;
            }
        }
        true
    }
}

/// What the node checks before it freezes anything: both ranges adjacent, at the
/// generations asked, with only voters, on the same nodes. The log entries check again (what
/// the logs made may have changed since).
fn check_mergeable(
    request: &MergeRangesRequest,
    left: &RangeDescriptor,
    right: &RangeDescriptor,
) -> Result<(), NodeError> {
    let (left_id, right_id) = (left.range_id, right.range_id);
    if left.end_key != right.start_key || left.end_key.is_empty() {
        return Err(NodeError::Invalid(format!(
            "ranges {left_id} {} and {right_id} {} are not adjacent (left first)",
            left.span(),
            right.span()
        )));
    }
    for (desc, expected) in [(left, request.expected_left_generation), (right, request.expected_right_generation)] {
        if expected != 0 && expected != desc.generation {
            return Err(NodeError::GenerationMismatch { range_id: desc.range_id, expected, actual: desc.generation });
        }
    }
    if left.is_frozen_for_merge() {
        return Err(NodeError::Move(format!("range {left_id} is frozen to be merged into its own left neighbour")));
    }
    if left.replicas.iter().chain(&right.replicas).any(|r| r.membership() != ReplicaMembership::Voter) {
        return Err(NodeError::Move(format!(
            "range {left_id} or {right_id} is changing its membership (a learner, or a joint membership); retry once it is done"
        )));
    }
    if left.replica_nodes() != right.replica_nodes() {
        return Err(NodeError::Move(format!(
            "range {left_id}'s replicas are on nodes {} and range {right_id}'s on {}: ranges merge only with replicas \
             on the same nodes (move them first; the resharding loop does)",
            left.replica_nodes().join(", "),
            right.replica_nodes().join(", ")
        )));
    }
    Ok(())
}
