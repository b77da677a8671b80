//! Merging two adjacent replicated ranges through their logs, the node's side (CockroachDB's
//! subsume, TiKV's PrepareMerge/CommitMerge): on the node that leads both, freeze the right range
//! through its log, wait until every replica of it holds its log up to the freeze, then merge
//! it into the left range through the left range's log. The ranges' replicas must be on the same
//! nodes first (the caller moves them: `kvfleet-resharding`'s `replica_merges`), so every node
//! that applies the merge holds the right range's data already: nothing is copied.
//!
//! A freeze is never undone: once it is applied, the right range serves nothing and the merge is
//! finished by asking again (whoever leads the ranges then), never rolled back.

use std::time::{Duration, Instant};

use kvfleet_proto::v1::{
    ListRangesRequest, MergeRangesRequest, RaftFreeze, RaftMerge, RangeDescriptor, ReplicaMembership,
};

use crate::error::NodeError;
use crate::node::Node;
use crate::ranges::MergePlan;
use crate::replica::apply;

/// How long a merge waits for every replica of the right range to hold its log up to the freeze.
const FREEZE_REACH_WAIT: Duration = Duration::from_secs(10);

impl Node {
    /// Merges `request.right_id` into `request.left_id` through their logs (see the module).
    /// The left range keeps its id. Returns the merged range and the two as they were.
    pub async fn merge(&self, request: MergeRangesRequest) -> Result<MergePlan, NodeError> {
        let (left_id, right_id) = (request.left_id, request.right_id);
        let (left, right) = self.merge_pair(left_id, right_id)?;
        check_mergeable(&request, &left, &right)?;
        if !right.is_frozen_for_merge() {
            self.check_replicas_answer(&right).await?;
            let freeze = RaftFreeze { expected_generation: right.generation };
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

    /// The two ranges as this node's table has them.
    fn merge_pair(&self, left_id: u64, right_id: u64) -> Result<(RangeDescriptor, RangeDescriptor), NodeError> {
        let table = self.table.read();
        let desc = |id| table.by_id(id).map(|r| r.desc.clone()).ok_or(NodeError::UnknownRange(id));
        Ok((desc(left_id)?, desc(right_id)?))
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

impl Node {
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
