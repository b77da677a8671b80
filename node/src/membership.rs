//! Adding and removing replicas of a replicated range, the node's side of a move as a
//! membership change: `create_replica` on the node that joins, `change_replicas` and
//! `transfer_leader` on the range's leader, and deleting the data of a replica removed here.
//! The order of the steps (and what to do after a crash between two) is the caller's:
//! `kvfleet-resharding`'s `replica_moves`.

use std::time::{Duration, Instant};

use kvfleet_proto::RangeBounds as _;
use kvfleet_proto::v1::{
    ChangeReplicasRequest, RaftMembershipChange, RangeDescriptor, Replica, ReplicaChange, ReplicaMembership,
    TransferLeaderRequest, replica_change::Kind as ChangeKind,
};
use kvfleet_replication::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2};
use rocksdb::{DB, WriteBatch};

use crate::error::NodeError;
use crate::node::Node;
use crate::replica::{ReplicaError, apply, raft_id_of};
use crate::storage::{CF_DATA, CF_META};

/// How long `transfer_leader` waits for the target to lead.
const TRANSFER_WAIT: Duration = Duration::from_secs(3);

impl Node {
    /// Creates this node's empty replica of `desc`'s range, to be added as a learner next: an
    /// uninitialized Raft group (no data, no membership) that the leader fills with a snapshot.
    /// Idempotent: a replica already here (empty or not) is left as it is.
    pub async fn create_replica(&self, mut desc: RangeDescriptor) -> Result<(), NodeError> {
        let range_id = desc.range_id;
        // Raft ids are derived from node ids, never taken from the caller.
        for replica in &mut desc.replicas {
            replica.raft_id = raft_id_of(&replica.node_id);
        }
        if range_id == 0 || desc.replicas.iter().all(|r| r.address.is_empty()) {
            return Err(NodeError::Invalid("CreateReplica needs the range's id and its replicas' addresses".into()));
        }
        let stale = {
            let table = self.table.read();
            match table.by_id(range_id) {
                // A replica that the range dropped while this node was down or cut off (it
                // missed its removal): it goes first, and the caller retries.
                Some(local)
                    if local.desc.conf_version < desc.conf_version
                        && !desc.replicas.iter().any(|r| r.node_id == self.config.node_id) =>
                {
                    Some(local.desc.conf_version)
                }
                Some(_) => return Ok(()),
                None => None,
            }
        };
        if let Some(version) = stale {
            self.replication
                .drop_stale(range_id, desc.conf_version)
                .map_err(|e| NodeError::Unavailable(e.to_string()))?;
            return Err(NodeError::Unavailable(format!(
                "node {} held a replica of range {range_id} that the range removed (membership version {version}, the range is at {}): it is being deleted; retry",
                self.config.node_id, desc.conf_version
            )));
        }
        if let Some(other) = self.table.read().owned_overlapping(&desc) {
            return Err(NodeError::Move(format!(
                "node {} holds range {} {}, which overlaps range {range_id} {}",
                self.config.node_id,
                other.desc.range_id,
                other.desc.span(),
                desc.span()
            )));
        }
        if let Some(removed) = self.removed_overlapping(&desc)? {
            return Err(NodeError::Unavailable(format!(
                "node {} is still deleting the data of its removed replica of range {} {}; retry",
                self.config.node_id,
                removed.range_id,
                removed.span()
            )));
        }
        let log = self.log_store()?;
        let existed = log.open_group(range_id).map_err(|e| NodeError::Corrupt(e.to_string()))?.is_some();
        let storage = log
            .create_uninitialized_group(range_id)
            .map_err(|e| NodeError::Corrupt(format!("creating the Raft log of range {range_id}: {e}")))?;
        // The replica is empty (its applied index 0: a removed replica's was deleted with it), or
        // already running (asked again while its first snapshot is in flight). A snapshot pending
        // here is the Raft thread's to install (the node installed those from before a restart
        // at start): installing it here too could ingest it again after the thread applied later
        // entries over it, taking those writes back.
        self.start_group(&desc, storage)?;
        if existed {
            tracing::debug!(range_id, "asked again to create a replica that exists here already");
        } else {
            tracing::info!(range_id, span = %desc.span(), "created an empty replica, to be added to the range");
        }
        Ok(())
    }

    /// Changes the membership of a replicated range this node leads, through its log; answers
    /// once the change is applied here. Changes already in force are skipped (a caller that
    /// retries after a crash is answered at once); several changes enter a joint membership,
    /// which the leader then leaves.
    pub async fn change_replicas(&self, request: ChangeReplicasRequest) -> Result<RangeDescriptor, NodeError> {
        let range_id = request.range_id;
        let desc = self.replicated_range(range_id)?;
        if request.expected_conf_version != 0 && request.expected_conf_version != desc.conf_version {
            return Err(NodeError::Move(format!(
                "range {range_id}'s membership is at version {}, the request expected {}",
                desc.conf_version, request.expected_conf_version
            )));
        }
        let plan = plan_changes(&desc, &request.changes, self.replication.raft_id(), &self.config.node_id)?;
        let Some(plan) = plan else {
            return Ok(self.replication.with_roles(desc));
        };
        if desc.in_joint_membership() && !plan.leave_joint {
            return Err(NodeError::Unavailable(format!(
                "range {range_id} is in a joint membership, which its leader is leaving; retry"
            )));
        }
        let context = (!plan.leave_joint)
            .then(|| RaftMembershipChange { expected_conf_version: desc.conf_version, added: plan.added.clone() });
        let outcome = self.replication.change_membership(range_id, plan.change, context, plan.promotes).await;
        outcome.map_err(|error| match error {
            ReplicaError::MembershipRefused { .. } => NodeError::Move(error.to_string()),
            ReplicaError::MembershipBusy { .. } => NodeError::Unavailable(error.to_string()),
            other => self.replica_error(&desc, &desc.start_key, other),
        })?;
        let changed = self.replicated_range(range_id)?;
        tracing::info!(
            range_id,
            conf_version = changed.conf_version,
            replicas = %crate::replica::driver::describe_replicas(&changed),
            "membership changed"
        );
        Ok(self.replication.with_roles(changed))
    }

    /// Hands leadership of a replicated range this node leads to another voter, ending this
    /// node's read lease first; answers once the target leads.
    pub async fn transfer_leader(&self, request: TransferLeaderRequest) -> Result<RangeDescriptor, NodeError> {
        let range_id = request.range_id;
        let desc = self.replicated_range(range_id)?;
        let target = desc.replicas.iter().find(|r| r.node_id == request.to_node_id).ok_or_else(|| {
            NodeError::Invalid(format!("node {:?} holds no replica of range {range_id}", request.to_node_id))
        })?;
        if !matches!(target.membership(), ReplicaMembership::Voter | ReplicaMembership::Joining) {
            return Err(NodeError::Move(format!(
                "node {} is not a voter of range {range_id} (it is {:?}): only a voter can lead",
                target.node_id,
                target.membership()
            )));
        }
        let to = target.raft_id;
        if self.replication.leader_of(range_id) != Some(to) {
            let outcome = self.replication.transfer_leader(range_id, to).await;
            outcome.map_err(|error| match error {
                ReplicaError::MembershipRefused { .. } => NodeError::Move(error.to_string()),
                other => self.replica_error(&desc, &desc.start_key, other),
            })?;
            let started = Instant::now();
            while self.replication.leader_of(range_id) != Some(to) {
                if started.elapsed() > TRANSFER_WAIT {
                    return Err(NodeError::Unavailable(format!(
                        "leadership of range {range_id} did not move to node {} within {} s; retry",
                        request.to_node_id,
                        TRANSFER_WAIT.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::info!(range_id, to = %request.to_node_id, "leadership transferred");
        }
        Ok(self.replication.with_roles(self.replicated_range(range_id)?))
    }

    /// A range this node holds.
    fn replicated_range(&self, range_id: u64) -> Result<RangeDescriptor, NodeError> {
        let desc = self.table.read().by_id(range_id).map(|range| range.desc.clone());
        desc.ok_or(NodeError::UnknownRange(range_id))
    }

    /// The replicas removed here whose data is still to delete.
    fn removed_replicas(&self) -> Result<Vec<RangeDescriptor>, NodeError> {
        let entries = self.storage.meta_entries(apply::removed_prefix())?;
        entries.iter().map(|(key, value)| crate::ranges::decode_descriptor(key, value)).collect()
    }

    /// The removed replica whose data is still to delete here that overlaps `desc`, if any.
    fn removed_overlapping(&self, desc: &RangeDescriptor) -> Result<Option<RangeDescriptor>, NodeError> {
        let removed = self.removed_replicas()?;
        Ok(removed.into_iter().find(|removed| removed.range_id == desc.range_id || removed.overlaps(desc)))
    }

    /// Deletes the data of every replica removed here before the last stop (at start, before
    /// anything is served).
    pub(crate) fn delete_removed_replicas(&self) -> Result<(), NodeError> {
        for removed in self.removed_replicas()? {
            delete_removed_data(&self.storage.db(), self.storage.key_space_end(), &removed)
                .map_err(NodeError::WriteFailed)?;
            tracing::info!(range_id = removed.range_id, "deleted the data of a replica removed before the restart");
        }
        Ok(())
    }
}

/// What `change_replicas` proposes: one ConfChangeV2.
struct PlannedChange {
    change: ConfChangeV2,
    added: Vec<Replica>,
    promotes: Vec<u64>,
    leave_joint: bool,
}

/// The changes of a request that are not in force yet, as one membership change (`None`: all
/// are in force). `self_raft_id`/`self_node`: the leader's, which cannot remove itself.
fn plan_changes(
    desc: &RangeDescriptor,
    changes: &[ReplicaChange],
    self_raft_id: u64,
    self_node: &str,
) -> Result<Option<PlannedChange>, NodeError> {
    let range_id = desc.range_id;
    if changes.is_empty() {
        return Err(NodeError::Invalid("ChangeReplicas needs at least one change".into()));
    }
    let mut plan =
        PlannedChange { change: ConfChangeV2::default(), added: Vec::new(), promotes: Vec::new(), leave_joint: false };
    let mut singles: Vec<ConfChangeSingle> = Vec::new();
    let mut removes_self = false;
    for change in changes {
        let kind = change.kind();
        if kind == ChangeKind::LeaveJoint {
            if changes.len() > 1 {
                return Err(NodeError::Invalid("LEAVE_JOINT goes alone in a ChangeReplicas request".into()));
            }
            if !desc.in_joint_membership() {
                return Ok(None);
            }
            let leader = desc.replicas.iter().find(|r| r.raft_id == self_raft_id);
            if leader.is_some_and(|r| r.membership() == ReplicaMembership::Leaving) {
                return Err(NodeError::Unavailable(format!(
                    "node {self_node} leads range {range_id} and the joint membership removes it: it hands its leadership to a joining voter before the membership is left; retry"
                )));
            }
            plan.leave_joint = true;
            return Ok(Some(plan));
        }
        let replica = change
            .replica
            .as_ref()
            .filter(|r| !r.node_id.is_empty())
            .ok_or_else(|| NodeError::Invalid(format!("a {kind:?} change needs the replica's node id")))?;
        let raft_id = raft_id_of(&replica.node_id);
        let member = desc.replicas.iter().find(|r| r.raft_id == raft_id);
        let single =
            |change_type: ConfChangeType| ConfChangeSingle { change_type, node_id: raft_id, ..Default::default() };
        match (kind, member.map(|m| m.membership())) {
            (ChangeKind::AddLearner, Some(_)) => {}
            (ChangeKind::AddLearner, None) => {
                if replica.address.is_empty() {
                    return Err(NodeError::Invalid(format!("adding node {} needs its address", replica.node_id)));
                }
                singles.push(single(ConfChangeType::AddLearnerNode));
                plan.added.push(Replica {
                    node_id: replica.node_id.clone(),
                    address: replica.address.clone(),
                    raft_id,
                    membership: ReplicaMembership::Learner as i32,
                    ..Default::default()
                });
            }
            (ChangeKind::Promote, Some(ReplicaMembership::Voter | ReplicaMembership::Joining)) => {}
            (ChangeKind::Promote, Some(ReplicaMembership::Learner)) => {
                singles.push(single(ConfChangeType::AddNode));
                plan.promotes.push(raft_id);
            }
            (ChangeKind::Promote, other) => {
                return Err(NodeError::Move(format!(
                    "node {} cannot be promoted in range {range_id}: it is {}",
                    replica.node_id,
                    other.map_or("not a member".to_string(), |m| format!("{m:?}"))
                )));
            }
            (ChangeKind::Remove, None) => {}
            (ChangeKind::Remove, Some(_)) if raft_id == self_raft_id => {
                removes_self = true;
                singles.push(single(ConfChangeType::RemoveNode));
            }
            (ChangeKind::Remove, Some(_)) => singles.push(single(ConfChangeType::RemoveNode)),
            (ChangeKind::Unspecified | ChangeKind::LeaveJoint, _) => {
                return Err(NodeError::Invalid("a change's kind is not set".into()));
            }
        }
    }
    if singles.is_empty() {
        return Ok(None);
    }
    if removes_self && plan.promotes.is_empty() {
        // Only a joint membership keeps it a voter (of the outgoing half) while it hands the
        // lead to the promoted one, as a single copy's move needs; otherwise, first hand it over.
        return Err(NodeError::Move(format!(
            "node {self_node} leads range {range_id} and cannot remove itself unless the same change promotes another replica: transfer its leadership first"
        )));
    }
    if singles.len() > 1 {
        // Joint consensus, left by the leader on its own (explicitly: raft-rs's automatic leave
        // is lost if the leader changes first).
        plan.change.set_transition(ConfChangeTransition::Explicit);
        // A voter the joint change replaces is demoted to a learner, not removed: it applies the
        // end of the joint membership and stays in the group until the leader removes it alone.
        // Removed outright, it would stop as it applied that end, and a new voter that missed
        // the commit (a crash, a lost message) would be left in the joint membership needing
        // the stopped replica's vote for good.
        for single in singles.iter_mut().filter(|s| s.change_type == ConfChangeType::RemoveNode) {
            let voter =
                desc.replicas.iter().any(|r| r.raft_id == single.node_id && r.membership() == ReplicaMembership::Voter);
            if voter {
                single.change_type = ConfChangeType::AddLearnerNode;
            }
        }
    }
    plan.change.set_changes(singles.into());
    Ok(Some(plan))
}

/// Deletes a removed replica's data (its keys) and its deletion mark, in one write. Only the
/// removed range's keys: no other range of this node overlaps them (`create_replica` waits).
pub(crate) fn delete_removed_data(db: &DB, key_space_end: &[u8], removed: &RangeDescriptor) -> Result<(), String> {
    let (Some(data), Some(meta)) = (db.cf_handle(CF_DATA), db.cf_handle(CF_META)) else {
        return Err("a column family is missing".into());
    };
    let end = if removed.end_key.is_empty() { key_space_end } else { removed.end_key.as_ref() };
    let mut batch = WriteBatch::default();
    batch.delete_range_cf(data, removed.start_key.as_ref(), end);
    batch.delete_cf(meta, apply::removed_key(removed.range_id));
    db.write(batch).map_err(|e| format!("deleting the data of removed range {}: {e}", removed.range_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(node: &str, membership: ReplicaMembership) -> Replica {
        Replica {
            node_id: node.into(),
            address: format!("127.0.0.1:{}", node.len()),
            raft_id: raft_id_of(node),
            membership: membership as i32,
            ..Default::default()
        }
    }

    fn change(kind: ChangeKind, node: &str) -> ReplicaChange {
        ReplicaChange { kind: kind as i32, replica: Some(replica(node, ReplicaMembership::Voter)) }
    }

    fn range(replicas: Vec<Replica>) -> RangeDescriptor {
        RangeDescriptor { range_id: 4, replicas, conf_version: 2, ..Default::default() }
    }

    #[test]
    fn changes_in_force_are_skipped_and_a_move_is_one_joint_change() {
        use ReplicaMembership::*;
        let desc =
            range(vec![replica("n1", Voter), replica("n2", Voter), replica("n3", Voter), replica("n4", Learner)]);
        let me = raft_id_of("n1");
        // Adding a member again, promoting a voter, removing a non-member: nothing to do.
        let redone =
            [change(ChangeKind::AddLearner, "n4"), change(ChangeKind::Promote, "n2"), change(ChangeKind::Remove, "n9")];
        assert!(plan_changes(&desc, &redone, me, "n1").unwrap().is_none());

        let plan =
            plan_changes(&desc, &[change(ChangeKind::Promote, "n4"), change(ChangeKind::Remove, "n3")], me, "n1")
                .unwrap()
                .expect("a change");
        assert_eq!(plan.change.get_transition(), ConfChangeTransition::Explicit);
        let kinds: Vec<_> = plan.change.get_changes().iter().map(|c| (c.get_change_type(), c.node_id)).collect();
        assert_eq!(
            kinds,
            [(ConfChangeType::AddNode, raft_id_of("n4")), (ConfChangeType::AddLearnerNode, raft_id_of("n3"))],
            "the replaced voter is demoted to a learner, not removed, by the joint change"
        );
        assert_eq!(plan.promotes, [raft_id_of("n4")]);

        // Out of the joint membership, the demoted learner is removed in a change of its own.
        let demoted =
            range(vec![replica("n1", Voter), replica("n2", Voter), replica("n4", Voter), replica("n3", Demoted)]);
        let plan = plan_changes(&demoted, &[change(ChangeKind::Remove, "n3")], me, "n1").unwrap().expect("a change");
        let kinds: Vec<_> = plan.change.get_changes().iter().map(|c| (c.get_change_type(), c.node_id)).collect();
        assert_eq!(kinds, [(ConfChangeType::RemoveNode, raft_id_of("n3"))]);
        assert_eq!(plan.change.get_transition(), ConfChangeTransition::Auto);

        let add = plan_changes(&desc, &[change(ChangeKind::AddLearner, "n5")], me, "n1").unwrap().expect("a change");
        assert_eq!(add.added.len(), 1);
        assert_eq!(add.change.get_transition(), ConfChangeTransition::Auto, "one change is applied as it is");
    }

    #[test]
    fn refused_changes_name_the_problem() {
        use ReplicaMembership::*;
        let desc = range(vec![replica("n1", Voter), replica("n2", Voter), replica("n3", Voter)]);
        let me = raft_id_of("n1");
        let error = plan_changes(&desc, &[change(ChangeKind::Remove, "n1")], me, "n1").err().unwrap();
        assert!(error.to_string().contains("transfer its leadership first"), "{error}");
        let error = plan_changes(&desc, &[change(ChangeKind::Promote, "n7")], me, "n1").err().unwrap();
        assert!(error.to_string().contains("not a member"), "{error}");
        let error = plan_changes(&desc, &[], me, "n1").err().unwrap();
        assert!(error.to_string().contains("at least one change"), "{error}");
        let leave = [change(ChangeKind::LeaveJoint, "n2"), change(ChangeKind::Remove, "n2")];
        assert!(plan_changes(&desc, &leave, me, "n1").err().unwrap().to_string().contains("alone"));
        // Not joint: leaving is a no-op.
        assert!(plan_changes(&desc, &[change(ChangeKind::LeaveJoint, "n2")], me, "n1").unwrap().is_none());
    }

    #[test]
    fn a_single_copy_leader_leaves_through_a_joint_membership_it_does_not_leave_itself() {
        use ReplicaMembership::*;
        let me = raft_id_of("n1");
        let learner = range(vec![replica("n1", Voter), replica("n2", Learner)]);
        let swap = [change(ChangeKind::Promote, "n2"), change(ChangeKind::Remove, "n1")];
        let plan = plan_changes(&learner, &swap, me, "n1").unwrap().expect("a change");
        assert_eq!(plan.change.get_transition(), ConfChangeTransition::Explicit, "a joint membership");
        let joint = range(vec![replica("n1", Leaving), replica("n2", Joining)]);
        let error = plan_changes(&joint, &[change(ChangeKind::LeaveJoint, "n2")], me, "n1").err().unwrap();
        assert!(error.to_string().contains("hands its leadership to a joining voter"), "{error}");
        let by_the_joining_leader =
            plan_changes(&joint, &[change(ChangeKind::LeaveJoint, "n2")], raft_id_of("n2"), "n2");
        assert!(by_the_joining_leader.unwrap().is_some_and(|plan| plan.leave_joint));
    }
}
