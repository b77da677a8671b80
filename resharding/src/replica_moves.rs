//! Moving a replica of a replicated range from one node to another as membership changes, with
//! no write freeze (TiKV PD's move-peer operator): create the replica on the target, add it as a
//! learner (the leader sends it a snapshot, then the log), promote it and remove the source in
//! one joint change once it has caught up (after handing leadership away if the source leads),
//! and leave the joint membership. Every step reads the range's membership first and does only
//! what is not in force yet, so a move interrupted anywhere (the caller, the leader or any
//! replica killed) is finished by running it again; between two steps the membership is always
//! a valid one.

use std::time::{Duration, Instant};

use kvfleet_proto::v1::{
    ChangeReplicasRequest, CreateReplicaRequest, ListRangesRequest, RangeDescriptor, Replica, ReplicaChange,
    ReplicaMembership, ReplicaRole, TransferLeaderRequest, replica_change::Kind,
};

use crate::observe::{NodeClients, describe_status, with_timeout};

/// A node as a move names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub node_id: String,
    pub address: String,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("moving range {range_id}'s replica from {from} to {to}: {message}")]
pub struct ReplicaMoveError {
    pub range_id: u64,
    pub from: String,
    pub to: String,
    pub message: String,
}

/// Where a move stands, read off the range's membership (see `next_step`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The target holds no replica: create it and add it as a learner.
    AddLearner,
    /// The source leads and must not: hand leadership to this voter first.
    TransferLeader { to: String },
    /// The target is a learner: promote it and remove the source, in one joint change.
    PromoteAndRemove,
    /// The target is a voter and the source still a member (a promotion done alone, or the
    /// source demoted to a learner by the joint change, which its leader removes by itself
    /// too): remove it.
    Remove,
    /// The membership is joint and its leader joins it: leave it.
    LeaveJoint,
    /// The target holds a demoted replica (a move off it ended a moment ago), which its leader
    /// removes by itself: wait, then add it afresh.
    AwaitRemoval,
    /// The target is a voter and the source is gone.
    Done,
}

impl Step {
    /// The crash point (`kvfleet_proto::failpoint`) right after this step was done.
    fn crash_point(&self) -> &'static str {
        match self {
            Step::AddLearner => "replica-move-after-add-learner",
            Step::TransferLeader { .. } => "replica-move-after-transfer-leader",
            Step::PromoteAndRemove => "replica-move-after-promote-and-remove",
            Step::Remove => "replica-move-after-remove",
            Step::LeaveJoint => "replica-move-after-leave-joint",
            Step::AwaitRemoval => "replica-move-after-await-removal",
            Step::Done => "replica-move-done",
        }
    }
}

/// The next step of moving `from`'s replica of `desc` to `to`, given who leads it.
pub fn next_step(desc: &RangeDescriptor, leader: &str, from: &str, to: &str) -> Step {
    let membership = |node: &str| desc.replicas.iter().find(|r| r.node_id == node).map(Replica::membership);
    if desc.in_joint_membership() {
        // A single copy's move enters the joint membership led by the source, which leaves:
        // the joining voter leads before the membership is left (a leader must not remove
        // itself). A crash can also hand the lead back to a leaving voter.
        if membership(leader) == Some(ReplicaMembership::Leaving) {
            let joining = desc.replicas.iter().filter(|r| r.membership() == ReplicaMembership::Joining);
            if let Some(next) = joining.min_by_key(|r| (r.node_id != to, r.behind_entries.unwrap_or(u64::MAX))) {
                return Step::TransferLeader { to: next.node_id.clone() };
            }
        }
        return Step::LeaveJoint;
    }
    let source_leads = leader == from;
    // The voter to hand leadership to: the target if it votes, else the voter least behind.
    let other_voter = || {
        desc.replicas
            .iter()
            .filter(|r| r.node_id != from && r.membership() == ReplicaMembership::Voter)
            .min_by_key(|r| (r.node_id != to, r.behind_entries.unwrap_or(u64::MAX)))
            .map(|r| r.node_id.clone())
    };
    match (membership(to), membership(from)) {
        (None, _) => Step::AddLearner,
        (Some(ReplicaMembership::Demoted), _) => Step::AwaitRemoval,
        (Some(ReplicaMembership::Voter), None) => Step::Done,
        (Some(ReplicaMembership::Learner), _) | (Some(ReplicaMembership::Voter), Some(_)) if source_leads => {
            match (other_voter(), membership(to)) {
                (Some(to), _) => Step::TransferLeader { to },
                // The source is the only voter (a single copy): it promotes the target and
                // leaves in one joint change, and hands over the lead inside it.
                (None, Some(ReplicaMembership::Learner)) => Step::PromoteAndRemove,
                (None, _) => Step::AddLearner,
            }
        }
        (Some(ReplicaMembership::Learner), Some(_)) => Step::PromoteAndRemove,
        (Some(ReplicaMembership::Learner), None) => Step::PromoteAndRemove,
        (Some(_), Some(_)) => Step::Remove,
        (Some(_), None) => Step::Done,
    }
}

/// Moves `from`'s replica of range `range_id` to `to`, step by step until done or `deadline`.
/// `seeds`: addresses of nodes holding the range (any replica: the leader is found through
/// them). Returns the range as its leader has it at the end.
pub async fn move_replica(
    clients: &NodeClients,
    range_id: u64,
    seeds: &[String],
    from: &Endpoint,
    to: &Endpoint,
    deadline: Duration,
) -> Result<RangeDescriptor, ReplicaMoveError> {
    let fail =
        |message: String| ReplicaMoveError { range_id, from: from.node_id.clone(), to: to.node_id.clone(), message };
    let started = Instant::now();
    let mut last_problem = String::from("no step was tried");
    let mut seeds: Vec<String> = seeds.to_vec();
    add_seeds(&mut seeds, [&from.address, &to.address]);
    // The voters the range had when the move began (the target aside): no step leaves it fewer
    // (another change made meanwhile, e.g. a second move to the same target, must not make this
    // one remove a replica that is no longer replaced).
    let mut voters_floor: Option<usize> = None;
    let mut first_look = true;
    let mut failed_transfers: Vec<String> = Vec::new();
    while started.elapsed() < deadline {
        let Some((desc, leader)) = find_leader(clients, range_id, &seeds).await else {
            last_problem = format!("no replica of range {range_id} knows its leader");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        add_seeds(&mut seeds, desc.replicas.iter().map(|r| &r.address));
        let voters = desc.replicas.iter().filter(|r| r.membership() == ReplicaMembership::Voter).count();
        let floor = *voters_floor.get_or_insert_with(|| {
            desc.replicas
                .iter()
                .filter(|r| r.membership() == ReplicaMembership::Voter && r.node_id != to.node_id)
                .count()
        });
        let mut step = next_step(&desc, &leader.node_id, &from.node_id, &to.node_id);
        let member = |node: &str| desc.replicas.iter().any(|r| r.node_id == node);
        if first_look && !member(&from.node_id) && !member(&to.node_id) {
            return Err(fail(format!("node {} holds no replica of range {range_id}", from.node_id)));
        }
        first_look = false;
        // A transfer to the voter least behind failed last time (it may be down): try another.
        if let Step::TransferLeader { to: new_leader } = &step
            && failed_transfers.contains(new_leader)
            && let Some(other) = desc
                .replicas
                .iter()
                .filter(|r| r.node_id != from.node_id && r.membership() == ReplicaMembership::Voter)
                .find(|r| !failed_transfers.contains(&r.node_id))
        {
            step = Step::TransferLeader { to: other.node_id.clone() };
        }
        let source_votes =
            desc.replicas.iter().any(|r| r.node_id == from.node_id && r.membership() == ReplicaMembership::Voter);
        if step == Step::Remove && source_votes && voters - 1 < floor {
            return Err(fail(format!(
                "removing {} would leave the range {} voters, fewer than the {floor} it had when the move began (another change was made meanwhile)",
                from.node_id,
                voters - 1
            )));
        }
        tracing::info!(range_id, ?step, leader = %leader.node_id, conf_version = desc.conf_version, "replica move step");
        let outcome = match &step {
            Step::Done => return Ok(desc),
            Step::AddLearner => {
                let created = call(clients, &to.address, |mut admin| {
                    let request = CreateReplicaRequest { range: Some(desc.clone()) };
                    async move { admin.create_replica(with_timeout(request, STEP_TIMEOUT)).await.map(|_| ()) }
                })
                .await;
                kvfleet_proto::failpoint::hit("replica-move-after-create");
                match created {
                    Ok(()) => change(clients, &leader.address, &desc, vec![(Kind::AddLearner, to)]).await,
                    Err(error) => Err(error),
                }
            }
            Step::TransferLeader { to: new_leader } => {
                let request = TransferLeaderRequest { range_id, to_node_id: new_leader.clone() };
                let outcome = call(clients, &leader.address, |mut admin| async move {
                    admin.transfer_leader(with_timeout(request, STEP_TIMEOUT)).await.map(|_| ())
                })
                .await;
                if outcome.is_err() {
                    failed_transfers.retain(|node| node != new_leader);
                    failed_transfers.push(new_leader.clone());
                    failed_transfers.truncate(desc.replicas.len().saturating_sub(2).max(1));
                }
                outcome
            }
            Step::PromoteAndRemove => {
                // The target may have restarted before its first snapshot: its empty replica
                // starts again (a no-op where it runs).
                let created = call(clients, &to.address, |mut admin| {
                    let request = CreateReplicaRequest { range: Some(desc.clone()) };
                    async move { admin.create_replica(with_timeout(request, STEP_TIMEOUT)).await.map(|_| ()) }
                })
                .await;
                match created {
                    Ok(()) => {
                        change(clients, &leader.address, &desc, vec![(Kind::Promote, to), (Kind::Remove, from)]).await
                    }
                    Err(error) => Err(error),
                }
            }
            Step::Remove => change(clients, &leader.address, &desc, vec![(Kind::Remove, from)]).await,
            Step::AwaitRemoval => Err(format!(
                "node {} holds a demoted replica of range {range_id}, which its leader removes first; retrying",
                to.node_id
            )),
            Step::LeaveJoint => change(clients, &leader.address, &desc, vec![(Kind::LeaveJoint, to)]).await,
        };
        if outcome.is_ok() {
            kvfleet_proto::failpoint::hit(step.crash_point());
        }
        if let Err(problem) = outcome {
            tracing::info!(range_id, ?step, %problem, "replica move step not done; retrying");
            last_problem = problem;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Err(fail(format!("not done within {} s; last: {last_problem}", deadline.as_secs())))
}

/// Where re-creating a lost replica on its own node stands (see `readd_replica`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaddStep {
    /// The node is still a voter but holds no copy: remove it from the membership first.
    RemoveLost,
    /// The node is not a member: create its empty replica and add it as a learner.
    AddLearner,
    /// The node is a learner: promote it (refused until it has caught up).
    Promote,
    /// The membership is joint: leave it.
    LeaveJoint,
    /// The node votes and holds its copy.
    Done,
}

/// The next step of re-creating `node`'s replica of `desc`, given whether `node` holds a copy.
pub fn next_readd_step(desc: &RangeDescriptor, node: &str, holds_copy: bool) -> ReaddStep {
    if desc.in_joint_membership() {
        return ReaddStep::LeaveJoint;
    }
    match desc.replicas.iter().find(|r| r.node_id == node).map(Replica::membership) {
        None => ReaddStep::AddLearner,
        Some(ReplicaMembership::Learner) => ReaddStep::Promote,
        // On its way out (its leader removes it too): not a copy that counts.
        Some(ReplicaMembership::Demoted) => ReaddStep::RemoveLost,
        Some(_) if holds_copy => ReaddStep::Done,
        Some(_) => ReaddStep::RemoveLost,
    }
}

/// Re-creates the replica of range `range_id` on `node`, which is listed as a voter but lost
/// its copy (its disk was replaced): removes it from the membership, then adds it back as a
/// learner (caught up by a snapshot) and promotes it. Used when no other node can take the copy
/// (every schedulable node holds one). Like `move_replica`, each step reads the membership (and
/// asks `node` whether it holds a copy) and does only what is not done, so running it again
/// finishes it. The range has one voter fewer between the removal and the promotion.
pub async fn readd_replica(
    clients: &NodeClients,
    range_id: u64,
    seeds: &[String],
    node: &Endpoint,
    deadline: Duration,
) -> Result<RangeDescriptor, ReplicaMoveError> {
    let fail =
        |message: String| ReplicaMoveError { range_id, from: node.node_id.clone(), to: node.node_id.clone(), message };
    let started = Instant::now();
    let mut last_problem = String::from("no step was tried");
    let mut seeds: Vec<String> = seeds.to_vec();
    add_seeds(&mut seeds, [&node.address]);
    // Once the lost replica is out of the membership, a voter on `node` is the one this run
    // added back: never removed again.
    let mut removed = false;
    while started.elapsed() < deadline {
        let Some((desc, leader)) = find_leader(clients, range_id, &seeds).await else {
            last_problem = format!("no replica of range {range_id} knows its leader");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if leader.node_id == node.node_id {
            // It leads: it holds its copy (a node without one has no group to campaign with).
            return Ok(desc);
        }
        let member = desc.replicas.iter().any(|r| r.node_id == node.node_id);
        removed |= !member;
        let Some(holds_copy) = holds(clients, &node.address, range_id).await else {
            // Whether it holds a copy is unknown: a healthy voter must not be taken for lost.
            last_problem = format!("node {} does not answer", node.node_id);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let step = next_readd_step(&desc, &node.node_id, holds_copy || removed);
        tracing::info!(range_id, ?step, node = %node.node_id, conf_version = desc.conf_version, "replica re-creation step");
        let create = || async {
            call(clients, &node.address, |mut admin| {
                let request = CreateReplicaRequest { range: Some(desc.clone()) };
                async move { admin.create_replica(with_timeout(request, STEP_TIMEOUT)).await.map(|_| ()) }
            })
            .await
        };
        let outcome = match step {
            ReaddStep::Done => return Ok(desc),
            ReaddStep::RemoveLost => change(clients, &leader.address, &desc, vec![(Kind::Remove, node)]).await,
            ReaddStep::AddLearner => match create().await {
                Ok(()) => change(clients, &leader.address, &desc, vec![(Kind::AddLearner, node)]).await,
                Err(error) => Err(error),
            },
            ReaddStep::Promote => match create().await {
                Ok(()) => change(clients, &leader.address, &desc, vec![(Kind::Promote, node)]).await,
                Err(error) => Err(error),
            },
            ReaddStep::LeaveJoint => change(clients, &leader.address, &desc, vec![(Kind::LeaveJoint, node)]).await,
        };
        if let Err(problem) = outcome {
            tracing::info!(range_id, ?step, %problem, "replica re-creation step not done; retrying");
            last_problem = problem;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Err(fail(format!("not done within {} s; last: {last_problem}", deadline.as_secs())))
}

/// Whether the node at `address` reports holding range `range_id`; None if it does not answer.
async fn holds(clients: &NodeClients, address: &str, range_id: u64) -> Option<bool> {
    let mut admin = clients.admin(address).ok()?;
    let answer = admin.list_ranges(with_timeout(ListRangesRequest {}, Duration::from_secs(2))).await.ok()?;
    Some(answer.into_inner().ranges.iter().any(|d| d.range_id == range_id))
}

/// Adds the addresses `seeds` lacks (and that are not empty) to it.
pub(crate) fn add_seeds<'a>(seeds: &mut Vec<String>, addresses: impl IntoIterator<Item = &'a String>) {
    for address in addresses {
        if !address.is_empty() && !seeds.contains(address) {
            seeds.push(address.clone());
        }
    }
}

/// Every step's deadline.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

async fn change(
    clients: &NodeClients,
    leader: &str,
    desc: &RangeDescriptor,
    changes: Vec<(Kind, &Endpoint)>,
) -> Result<(), String> {
    let changes = changes
        .into_iter()
        .map(|(kind, node)| ReplicaChange {
            kind: kind as i32,
            replica: Some(Replica {
                node_id: node.node_id.clone(),
                address: node.address.clone(),
                ..Default::default()
            }),
        })
        .collect();
    let request = ChangeReplicasRequest { range_id: desc.range_id, expected_conf_version: desc.conf_version, changes };
    call(clients, leader, |mut admin| async move {
        admin.change_replicas(with_timeout(request, STEP_TIMEOUT)).await.map(|_| ())
    })
    .await
}

pub(crate) async fn call<F, Fut>(clients: &NodeClients, address: &str, rpc: F) -> Result<(), String>
where
    F: FnOnce(crate::observe::Admin) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let admin = clients.admin(address)?;
    rpc(admin).await.map_err(|status| format!("{address}: {}", describe_status(&status)))
}

/// The range as its leader has it, and the leader, asking the seeds: the answer of a node that
/// reports itself the leader, at the highest membership version.
async fn find_leader(clients: &NodeClients, range_id: u64, seeds: &[String]) -> Option<(RangeDescriptor, Replica)> {
    find_leader_of(clients, seeds, |d| d.range_id == range_id).await
}

/// Like `find_leader`, for the range `wanted` picks (the first a node lists).
pub(crate) async fn find_leader_of(
    clients: &NodeClients,
    seeds: &[String],
    wanted: impl Fn(&RangeDescriptor) -> bool,
) -> Option<(RangeDescriptor, Replica)> {
    let mut best: Option<(RangeDescriptor, Replica)> = None;
    for address in seeds {
        let Ok(mut admin) = clients.admin(address) else { continue };
        let Ok(answer) = admin.list_ranges(with_timeout(ListRangesRequest {}, Duration::from_secs(2))).await else {
            continue;
        };
        let answer = answer.into_inner();
        let Some(desc) = answer.ranges.into_iter().find(&wanted) else { continue };
        let Some(leader) = desc.replicas.iter().find(|r| r.role() == ReplicaRole::Leader).cloned() else { continue };
        if leader.node_id != answer.node_id {
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(known, _)| (desc.generation, desc.conf_version) > (known.generation, known.conf_version))
        {
            best = Some((desc, leader));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(replicas: &[(&str, ReplicaMembership)]) -> RangeDescriptor {
        RangeDescriptor {
            range_id: 3,
            replicas: replicas
                .iter()
                .map(|(node, membership)| Replica {
                    node_id: node.to_string(),
                    membership: *membership as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn each_membership_on_the_way_has_one_next_step() {
        use ReplicaMembership::*;
        let start = range(&[("n1", Voter), ("n2", Voter), ("n3", Voter)]);
        assert_eq!(next_step(&start, "n2", "n1", "n4"), Step::AddLearner);
        let learner = range(&[("n1", Voter), ("n2", Voter), ("n3", Voter), ("n4", Learner)]);
        assert_eq!(next_step(&learner, "n2", "n1", "n4"), Step::PromoteAndRemove);
        assert_eq!(next_step(&learner, "n1", "n1", "n4"), Step::TransferLeader { to: "n2".into() });
        let joint = range(&[("n1", Leaving), ("n2", Voter), ("n3", Voter), ("n4", Joining)]);
        assert_eq!(next_step(&joint, "n2", "n1", "n4"), Step::LeaveJoint);
        let promoted = range(&[("n1", Voter), ("n2", Voter), ("n3", Voter), ("n4", Voter)]);
        assert_eq!(next_step(&promoted, "n2", "n1", "n4"), Step::Remove);
        assert_eq!(
            next_step(&promoted, "n1", "n1", "n4"),
            Step::TransferLeader { to: "n4".into() },
            "the target first"
        );
        // Otherwise the voter least behind.
        let mut behind = learner.clone();
        behind.replicas[1].behind_entries = Some(40);
        behind.replicas[2].behind_entries = Some(3);
        assert_eq!(next_step(&behind, "n1", "n1", "n4"), Step::TransferLeader { to: "n3".into() });
        let done = range(&[("n2", Voter), ("n3", Voter), ("n4", Voter)]);
        assert_eq!(next_step(&done, "n4", "n1", "n4"), Step::Done);
    }

    #[test]
    fn a_single_copy_moves_through_a_joint_membership_it_hands_the_lead_in() {
        use ReplicaMembership::*;
        let start = range(&[("n1", Voter)]);
        assert_eq!(next_step(&start, "n1", "n1", "n2"), Step::AddLearner);
        let learner = range(&[("n1", Voter), ("n2", Learner)]);
        assert_eq!(next_step(&learner, "n1", "n1", "n2"), Step::PromoteAndRemove, "no other voter to lead first");
        let joint = range(&[("n1", Leaving), ("n2", Joining)]);
        assert_eq!(next_step(&joint, "n1", "n1", "n2"), Step::TransferLeader { to: "n2".into() });
        assert_eq!(next_step(&joint, "n2", "n1", "n2"), Step::LeaveJoint);
        let done = range(&[("n2", Voter)]);
        assert_eq!(next_step(&done, "n2", "n1", "n2"), Step::Done);
    }

    #[test]
    fn a_demoted_source_is_removed_and_a_demoted_target_waits() {
        use ReplicaMembership::*;
        // Out of the joint membership the source is a demoted learner: removed (by the mover,
        // or by its leader first); if it still leads, it hands the lead over first.
        let demoted = range(&[("n1", Demoted), ("n2", Voter)]);
        assert_eq!(next_step(&demoted, "n2", "n1", "n2"), Step::Remove);
        assert_eq!(next_step(&demoted, "n1", "n1", "n2"), Step::TransferLeader { to: "n2".into() });
        // A target still holding a demoted replica (moved off it a moment ago) is not a member
        // that counts: neither done nor removed from, until its leader removed it.
        let back = range(&[("n1", Voter), ("n2", Demoted)]);
        assert_eq!(next_step(&back, "n1", "n1", "n2"), Step::AwaitRemoval);
        assert_eq!(next_step(&range(&[("n2", Demoted), ("n3", Voter)]), "n3", "n1", "n2"), Step::AwaitRemoval);
        assert_eq!(next_readd_step(&back, "n2", true), ReaddStep::RemoveLost);
    }

    #[test]
    fn a_lost_replica_is_removed_then_added_back_and_promoted() {
        use ReplicaMembership::*;
        let listed = range(&[("n1", Voter), ("n2", Voter), ("n3", Voter)]);
        assert_eq!(next_readd_step(&listed, "n3", false), ReaddStep::RemoveLost);
        assert_eq!(next_readd_step(&listed, "n3", true), ReaddStep::Done);
        let removed = range(&[("n1", Voter), ("n2", Voter)]);
        assert_eq!(next_readd_step(&removed, "n3", false), ReaddStep::AddLearner);
        let learner = range(&[("n1", Voter), ("n2", Voter), ("n3", Learner)]);
        assert_eq!(next_readd_step(&learner, "n3", false), ReaddStep::Promote);
        assert_eq!(next_readd_step(&learner, "n3", true), ReaddStep::Promote);
        let joint = range(&[("n1", Voter), ("n2", Voter), ("n3", Joining)]);
        assert_eq!(next_readd_step(&joint, "n3", true), ReaddStep::LeaveJoint);
    }
}
