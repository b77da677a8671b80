//! Merging two adjacent replicated ranges whose replicas are on the same nodes (the caller moved
//! them there): one node must lead both, so the right range's leadership goes to the left
//! range's leader; then that node merges them through their logs (kvfleet-node's `merges`:
//! freeze the right range, wait until every replica has its log up to the freeze, merge). Every
//! step reads where the ranges stand first, so a merge interrupted anywhere (the caller, a leader
//! or any replica killed) is finished by running it again. Once the right range is frozen the
//! merge is finished, unless it cannot be (a replica of the frozen range on a node lost for
//! good): then `abort_frozen_merge` undoes the freeze, as the node leading both ranges.

use std::time::{Duration, Instant};

use kvfleet_proto::v1::{AbortMergeRequest, MergeRangesRequest, RangeDescriptor, TransferLeaderRequest};

use crate::observe::{NodeClients, describe_status, with_timeout};
use crate::replica_moves::{add_seeds, call, find_leader_of};

#[derive(Debug, Clone, thiserror::Error)]
#[error("merging range {right} into range {left}: {message}")]
pub struct ReplicaMergeError {
    pub left: u64,
    pub right: u64,
    /// The ranges' replicas are on different nodes and the right range is not frozen yet:
    /// nothing was done (move them first).
    pub not_aligned: bool,
    pub message: String,
}

/// Where a merge stands, read off the two ranges as their leaders have them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeStep {
    /// The left range holds the right one's keys: done.
    Done,
    /// The replicas are on different nodes and nothing is frozen: the caller moves them first.
    NotAligned,
    /// One node must lead both: the right range's leadership goes to this node.
    TransferRightLeader { to: String },
    /// Ask the node leading both to merge them.
    Merge,
}

/// The next step of merging `right` into `left` (each as its leader has it, with that leader).
pub fn next_merge_step(
    left: &RangeDescriptor,
    left_leader: &str,
    right: Option<(&RangeDescriptor, &str)>,
) -> MergeStep {
    let Some((right, right_leader)) = right else { return MergeStep::Done };
    if left.end_key.is_empty() || left.end_key > right.start_key {
        return MergeStep::Done;
    }
    let frozen = right.merge_freeze_index > 0;
    if !frozen && left.replica_nodes() != right.replica_nodes() {
        return MergeStep::NotAligned;
    }
    if left_leader != right_leader {
        return MergeStep::TransferRightLeader { to: left_leader.to_string() };
    }
    MergeStep::Merge
}

/// Merges range `right_id` into its left neighbour (see the module), step by step until done or
/// `deadline`: into whichever range ends where it starts (`left_id` is the one the caller saw, for
/// messages). `seeds`: addresses of nodes holding the ranges. Returns the merged range as its
/// leader has it (also when another merger finished it).
pub async fn merge_replicated(
    clients: &NodeClients,
    left_id: u64,
    right_id: u64,
    seeds: &[String],
    deadline: Duration,
) -> Result<RangeDescriptor, ReplicaMergeError> {
    let fail =
        |message: String, not_aligned| ReplicaMergeError { left: left_id, right: right_id, not_aligned, message };
    let started = Instant::now();
    let mut seeds = seeds.to_vec();
    let mut last_problem = String::from("no step was tried");
    // Where the right range starts, once seen: its left neighbour is the range ending there.
    let mut right_start = None;
    while started.elapsed() < deadline {
        let Some((right, right_leader)) = find_leader_of(clients, &seeds, |d| d.range_id == right_id).await else {
            // Gone: merged (by this call before, or by another merger, into whichever range
            // ended where it starts), if another range holds its first key now.
            if let Some(start) = &right_start {
                let holds = |d: &RangeDescriptor| {
                    d.range_id != right_id && d.start_key <= *start && (d.end_key.is_empty() || d.end_key > *start)
                };
                if let Some((holder, _)) = find_leader_of(clients, &seeds, holds).await {
                    return Ok(holder);
                }
            }
            last_problem =
                format!("no replica of range {right_id} knows its leader (an election, or the merge is applying)");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        right_start = Some(right.start_key.clone());
        add_seeds(&mut seeds, right.replicas.iter().map(|r| &r.address));
        // Its left neighbour: whichever range ends where it starts (a split of the left range
        // since makes another one the neighbour).
        let Some((left, left_leader)) = find_leader_of(clients, &seeds, |d| d.end_key == right.start_key).await else {
            last_problem = format!("no replica of the range before range {right_id} knows its leader");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let step = next_merge_step(&left, &left_leader.node_id, Some((&right, &right_leader.node_id)));
        tracing::info!(
            left = left.range_id,
            right = right_id,
            ?step,
            frozen = right.merge_freeze_index > 0,
            "replica merge step"
        );
        let outcome = match &step {
            MergeStep::Done => return Ok(left),
            MergeStep::NotAligned => {
                return Err(fail(
                    format!(
                        "range {}'s replicas are on {} and range {right_id}'s on {}: move them onto the same nodes first",
                        left.range_id,
                        left.replica_nodes().join(", "),
                        right.replica_nodes().join(", ")
                    ),
                    true,
                ));
            }
            MergeStep::TransferRightLeader { to } => {
                let request = TransferLeaderRequest { range_id: right_id, to_node_id: to.clone() };
                call(clients, &right_leader.address, |mut admin| async move {
                    admin.transfer_leader(with_timeout(request, STEP_TIMEOUT)).await.map(|_| ())
                })
                .await
            }
            MergeStep::Merge => {
                let request = MergeRangesRequest {
                    left_id: left.range_id,
                    right_id,
                    expected_left_generation: left.generation,
                    expected_right_generation: right.generation,
                };
                let admin = clients.admin(&left_leader.address);
                match admin {
                    Ok(mut admin) => match admin.merge_ranges(with_timeout(request, STEP_TIMEOUT)).await {
                        Ok(answer) => match answer.into_inner().merged {
                            Some(merged) => return Ok(merged),
                            None => Err(format!("{}: the merge answered no range", left_leader.address)),
                        },
                        Err(status) => Err(format!("{}: {}", left_leader.address, describe_status(&status))),
                    },
                    Err(error) => Err(error),
                }
            }
        };
        if let Err(problem) = outcome {
            tracing::info!(left = left.range_id, right = right_id, ?step, %problem, "replica merge step not done; retrying");
            last_problem = problem;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Err(fail(format!("not done within {} s; last: {last_problem}", deadline.as_secs()), false))
}

/// Undoes the freeze of range `right_id` (its merge cannot finish: see the module), step by step
/// until done or `deadline`: the node leading the left range the freeze names must lead the
/// frozen range too (its leadership moves there, or the left range's comes to its leader), then
/// that node fences the left range and thaws the right one (kvfleet-node's `abort_merge`).
/// `lost_node_ids`: the nodes lost for good (the others must answer that they can apply it);
/// `decommissioned_node_ids`: those whose disks are destroyed too, as an operator states (not
/// held to the version they were last heard running).
/// Returns the right range, active again, as its leader has it.
pub async fn abort_frozen_merge(
    clients: &NodeClients,
    right_id: u64,
    lost_node_ids: &[String],
    decommissioned_node_ids: &[String],
    seeds: &[String],
    deadline: Duration,
) -> Result<Thawed, String> {
    let started = Instant::now();
    let mut seeds = seeds.to_vec();
    let mut last_problem = String::from("no step was tried");
    let mut asked = false;
    while started.elapsed() < deadline {
        let Some((right, right_leader)) = find_leader_of(clients, &seeds, |d| d.range_id == right_id).await else {
            last_problem = format!("no replica of range {right_id} knows its leader (or it was merged meanwhile)");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if right.merge_freeze_index == 0 {
            return Ok(Thawed { range: right, by_this_call: asked });
        }
        let left_id = right.merge_left_id;
        if left_id == 0 {
            return Err(format!(
                "range {right_id} was frozen by an earlier version, which did not record the range it merges into: \
                 it can only be merged"
            ));
        }
        add_seeds(&mut seeds, right.replicas.iter().map(|r| &r.address));
        // No leader of the left range: merged away (the right range's leader decides: its own
        // copy tells), or an election.
        let left = find_leader_of(clients, &seeds, |d| d.range_id == left_id).await;
        let left_leader = left.map_or_else(|| right_leader.clone(), |(_, leader)| leader);
        let outcome = if left_leader.node_id != right_leader.node_id {
            // One node must lead both: whichever leader is a voter of the other range.
            let (range_id, leader, to) = if right.replica_nodes().contains(&left_leader.node_id.as_str()) {
                (right_id, &right_leader.address, left_leader.node_id.clone())
            } else {
                (left_id, &left_leader.address, right_leader.node_id.clone())
            };
            let request = TransferLeaderRequest { range_id, to_node_id: to };
            call(clients, leader, |mut admin| async move {
                admin.transfer_leader(with_timeout(request, STEP_TIMEOUT)).await.map(|_| ())
            })
            .await
        } else {
            let request = AbortMergeRequest {
                left_id,
                right_id,
                freeze_index: right.merge_freeze_index,
                lost_node_ids: lost_node_ids.to_vec(),
                decommissioned_node_ids: decommissioned_node_ids.to_vec(),
            };
            asked = true;
            match clients.admin(&left_leader.address) {
                Ok(mut admin) => match admin.abort_merge(with_timeout(request, STEP_TIMEOUT)).await {
                    Ok(answer) => match answer.into_inner().right {
                        Some(thawed) => return Ok(Thawed { range: thawed, by_this_call: true }),
                        None => Err(format!("{}: the abort answered no range", left_leader.address)),
                    },
                    Err(status) => {
                        let problem = format!("{}: {}", left_leader.address, describe_status(&status));
                        // Refused for what the fleet is (a replica's node that cannot apply it,
                        // or last heard on a version that cannot): not worth retrying within this
                        // call; the caller asks again later.
                        if status.code() == tonic::Code::FailedPrecondition {
                            return Err(problem);
                        }
                        Err(problem)
                    }
                },
                Err(error) => Err(error),
            }
        };
        if let Err(problem) = outcome {
            tracing::info!(left = left_id, right = right_id, %problem, "undoing a freeze: step not done; retrying");
            last_problem = problem;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Err(format!("undoing range {right_id}'s freeze: not done within {} s; last: {last_problem}", deadline.as_secs()))
}

/// What `abort_frozen_merge` found at the end.
#[derive(Debug, Clone)]
pub struct Thawed {
    /// The right range, active again, as its leader has it.
    pub range: RangeDescriptor,
    /// Whether this call asked for an undo (false: the range was not frozen when first looked at).
    pub by_this_call: bool,
}

/// Every step's deadline.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_proto::v1::Replica;

    fn range(id: u64, span: (&str, &str), nodes: &[&str], frozen_at: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start_key: span.0.as_bytes().to_vec().into(),
            end_key: span.1.as_bytes().to_vec().into(),
            replicas: nodes.iter().map(|n| Replica { node_id: n.to_string(), ..Default::default() }).collect(),
            merge_freeze_index: frozen_at,
            ..Default::default()
        }
    }

    #[test]
    fn each_state_of_a_merge_has_one_next_step() {
        let left = range(1, ("", "m"), &["a", "b", "c"], 0);
        let right = range(2, ("m", ""), &["c", "b", "a"], 0);
        assert_eq!(next_merge_step(&left, "a", Some((&right, "a"))), MergeStep::Merge);
        assert_eq!(next_merge_step(&left, "a", Some((&right, "b"))), MergeStep::TransferRightLeader { to: "a".into() });
        let elsewhere = range(2, ("m", ""), &["a", "b", "d"], 0);
        assert_eq!(next_merge_step(&left, "a", Some((&elsewhere, "a"))), MergeStep::NotAligned);
        // Frozen: never "not aligned" (the merge must finish; the node checks the replicas).
        let frozen_elsewhere = range(2, ("m", ""), &["a", "b", "d"], 7);
        assert_eq!(next_merge_step(&left, "a", Some((&frozen_elsewhere, "a"))), MergeStep::Merge);
        let merged = range(1, ("", ""), &["a", "b", "c"], 0);
        assert_eq!(next_merge_step(&merged, "a", Some((&right, "a"))), MergeStep::Done);
        assert_eq!(next_merge_step(&left, "a", None), MergeStep::Done);
    }
}
