//! Driving online moves through the nodes' admin API, and finishing or rolling back the ones a
//! failure interrupted. The protocol and its recovery rules are in docs/architecture.md; what the
//! controller needs to know is that the nodes persist every step, so where a move stands can be
//! read off the source and the target alone.

use std::time::{Duration, Instant};

use kvfleet_proto::v1::{
    AbortExportRequest, AbortImportRequest, CompleteImportRequest, FreezeForMoveRequest, ImportRangeRequest,
    RangeDescriptor, RangeState, RetireMovedRequest,
};

use super::observe::{NodeClients, Observation, describe_status, frozen_for, leader_replica, with_timeout};
use super::state::InFlightMove;
use crate::platform::Member;

#[derive(Debug, Clone, Copy)]
pub struct MoveTimeouts {
    /// Copying the snapshot: grows with the range's size.
    pub import: Duration,
    /// Every other step.
    pub step: Duration,
}

/// A finished move, as measured by the controller.
#[derive(Debug, Clone)]
pub struct MoveReport {
    pub new_owner: RangeDescriptor,
    pub bytes_copied: u64,
    pub pairs_copied: u64,
    pub copy: Duration,
    /// From the freeze request to the source's retirement: writes to the range wait this long.
    pub freeze: Duration,
    pub total: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("move {move_id} of range {range_id} failed at {step}: {message}")]
pub struct MoveError {
    pub move_id: u64,
    pub range_id: u64,
    pub step: &'static str,
    pub message: String,
}

/// Runs one move from start to end: import on the target (snapshot + tail), freeze the source,
/// complete on the target (the handoff, at generation + 1), retire on the source. On error the
/// move is left for `recover`, which reads the nodes' state to finish or roll it back.
pub async fn drive(
    clients: NodeClients,
    mv: InFlightMove,
    desc: RangeDescriptor,
    source: Member,
    target: Member,
    timeouts: MoveTimeouts,
) -> Result<MoveReport, MoveError> {
    let fail = |step: &'static str| {
        let (move_id, range_id) = (mv.move_id, mv.range_id);
        move |message: String| MoveError { move_id, range_id, step, message }
    };
    let started = Instant::now();
    let mut source_admin = clients.admin(&source.address).map_err(fail("connecting to the source"))?;
    let mut target_admin = clients.admin(&target.address).map_err(fail("connecting to the target"))?;
    let new_generation = desc.generation + 1;

    let import =
        ImportRangeRequest { range: Some(desc.clone()), source_address: source.address.clone(), move_id: mv.move_id };
    let imported = target_admin
        .import_range(with_timeout(import, timeouts.import))
        .await
        .map_err(|s| fail("import")(describe_status(&s)))?
        .into_inner();
    let copy = started.elapsed();
    kvfleet_proto::failpoint::hit("controller-after-import");

    let frozen_at = Instant::now();
    let freeze = FreezeForMoveRequest {
        range_id: mv.range_id,
        move_id: mv.move_id,
        target: Some(leader_replica(&target)),
        new_generation,
    };
    let final_seq = source_admin
        .freeze_for_move(with_timeout(freeze, timeouts.step))
        .await
        .map_err(|s| fail("freeze")(describe_status(&s)))?
        .into_inner()
        .final_seq;
    kvfleet_proto::failpoint::hit("controller-after-freeze");
    let complete = CompleteImportRequest { range_id: mv.range_id, move_id: mv.move_id, final_seq, new_generation };
    let new_owner = target_admin
        .complete_import(with_timeout(complete, timeouts.step))
        .await
        .map_err(|s| fail("complete")(describe_status(&s)))?
        .into_inner()
        .range
        .ok_or_else(|| fail("complete")("the target returned no descriptor".into()))?;
    kvfleet_proto::failpoint::hit("controller-after-complete");
    let retire = RetireMovedRequest { range_id: mv.range_id, move_id: mv.move_id, new_owner: Some(new_owner.clone()) };
    source_admin
        .retire_moved(with_timeout(retire, timeouts.step))
        .await
        .map_err(|s| fail("retire")(describe_status(&s)))?;
    Ok(MoveReport {
        new_owner,
        bytes_copied: imported.bytes_copied,
        pairs_copied: imported.pairs_copied,
        copy,
        freeze: frozen_at.elapsed(),
        total: started.elapsed(),
    })
}

/// Where an interrupted move ended up.
#[derive(Debug, Clone, PartialEq)]
pub enum Recovery {
    /// The target owns the range and the source has retired it.
    Completed(Box<RangeDescriptor>),
    /// Both sides are back to before the move: the source owns the range, the target has no copy.
    RolledBack,
    /// Cannot decide safely yet (a node is unreachable); try again next round.
    Waiting(String),
}

/// What to do about a move that no task is driving. Decided from what the nodes report alone:
/// - the target owns the range at a newer generation: the handoff happened; retire the source
///   (if it still holds the range);
/// - otherwise roll back: abort the target's import if it answers (it can then never take
///   over), then the source's export (which unfreezes it);
/// - but if the target is unreachable and the source is frozen for this move: wait. The target
///   may have completed just before it went away, and only one node may acknowledge writes.
#[derive(Debug, Clone, PartialEq)]
pub enum RecoveryPlan {
    Finish { new_owner: Box<RangeDescriptor>, retire_on: Option<String> },
    RollBack { abort_import_on: Option<String>, abort_export_on: Option<String> },
    Wait(String),
}

pub fn recovery_plan(observation: &Observation, mv: &InFlightMove) -> RecoveryPlan {
    let source_up = observation.node(&mv.from).filter(|n| n.report.is_ok());
    let target_up = observation.node(&mv.to).filter(|n| n.report.is_ok());
    let taken_over = target_up
        .and_then(|t| t.holds(mv.range_id))
        .filter(|d| d.generation > mv.generation && d.state() == RangeState::Active);
    if let Some(owned) = taken_over {
        let Some(source) = source_up else {
            return RecoveryPlan::Wait(format!("the target owns range {}; source {} is down", mv.range_id, mv.from));
        };
        return RecoveryPlan::Finish {
            new_owner: Box::new(owned.clone()),
            retire_on: source.holds(mv.range_id).map(|_| source.member.address.clone()),
        };
    }
    let source_frozen = source_up.and_then(|s| s.holds(mv.range_id)).is_some_and(|d| frozen_for(d, mv.move_id));
    if target_up.is_none() && source_frozen {
        return RecoveryPlan::Wait(format!(
            "source {} is frozen for move {} and target {} is down: waiting to learn whether it took over",
            mv.from, mv.move_id, mv.to
        ));
    }
    RecoveryPlan::RollBack {
        abort_import_on: target_up.map(|t| t.member.address.clone()),
        abort_export_on: source_up.map(|s| s.member.address.clone()),
    }
}

/// Carries out `recovery_plan` for a move no task drives.
pub async fn recover(
    clients: &NodeClients,
    observation: &Observation,
    mv: &InFlightMove,
    timeout: Duration,
) -> Result<Recovery, String> {
    match recovery_plan(observation, mv) {
        RecoveryPlan::Wait(why) => Ok(Recovery::Waiting(why)),
        RecoveryPlan::Finish { new_owner, retire_on } => {
            if let Some(address) = retire_on {
                let retire = RetireMovedRequest {
                    range_id: mv.range_id,
                    move_id: mv.move_id,
                    new_owner: Some((*new_owner).clone()),
                };
                clients
                    .admin(&address)?
                    .retire_moved(with_timeout(retire, timeout))
                    .await
                    .map_err(|s| format!("retire on {}: {}", mv.from, describe_status(&s)))?;
            }
            Ok(Recovery::Completed(new_owner))
        }
        RecoveryPlan::RollBack { abort_import_on, abort_export_on } => {
            if let Some(address) = abort_import_on {
                let abort = AbortImportRequest { range_id: mv.range_id, move_id: mv.move_id };
                clients
                    .admin(&address)?
                    .abort_import(with_timeout(abort, timeout))
                    .await
                    .map_err(|s| format!("abort import on {}: {}", mv.to, describe_status(&s)))?;
            }
            let Some(address) = abort_export_on else {
                return Ok(Recovery::Waiting(format!("source {} is down", mv.from)));
            };
            let abort = AbortExportRequest { range_id: mv.range_id, move_id: mv.move_id };
            clients
                .admin(&address)?
                .abort_export(with_timeout(abort, timeout))
                .await
                .map_err(|s| format!("abort export on {}: {}", mv.from, describe_status(&s)))?;
            Ok(Recovery::RolledBack)
        }
    }
}

/// Moves the nodes know of that the controller's state does not (its state file is older than
/// the nodes, or was lost): sources frozen for a move. Each becomes an in-flight move to recover.
pub fn discover_orphans(observation: &Observation, known: &[InFlightMove]) -> Vec<InFlightMove> {
    let mut found = Vec::new();
    for node in &observation.nodes {
        for desc in node.owned() {
            let Some(intent) = desc.move_intent.as_ref().filter(|_| desc.state() == RangeState::Frozen) else {
                continue;
            };
            if known.iter().chain(&found).any(|m| m.move_id == intent.move_id) {
                continue;
            }
            found.push(InFlightMove {
                move_id: intent.move_id,
                range_id: desc.range_id,
                generation: desc.generation,
                from: node.member.node_id.clone(),
                to: intent.target.as_ref().map(|t| t.node_id.clone()).unwrap_or_default(),
                reason: "found frozen on its source after a controller restart".into(),
                started_unix_ms: 0,
            });
        }
    }
    found
}

/// Imports no known move accounts for: leftovers of a move the controller forgot. Safe to abort
/// (an importing copy never serves).
pub fn stray_imports(observation: &Observation, known: &[InFlightMove]) -> Vec<(Member, u64, u64)> {
    let mut stray = Vec::new();
    for node in &observation.nodes {
        let Ok(report) = &node.report else { continue };
        for desc in &report.importing {
            let move_id = desc.move_intent.as_ref().map_or(0, |i| i.move_id);
            if !known.iter().any(|m| m.move_id == move_id) {
                stray.push((node.member.clone(), desc.range_id, move_id));
            }
        }
    }
    stray
}

pub async fn abort_stray_import(
    clients: &NodeClients,
    node: &Member,
    range_id: u64,
    move_id: u64,
    timeout: Duration,
) -> Result<(), String> {
    clients
        .admin(&node.address)?
        .abort_import(with_timeout(AbortImportRequest { range_id, move_id }, timeout))
        .await
        .map(|_| ())
        .map_err(|s| format!("abort import of range {range_id} on {}: {}", node.node_id, describe_status(&s)))
}

#[cfg(test)]
mod tests {
    use kvfleet_proto::v1::{LoadReportResponse, MoveIntent, RangeLoad};

    use super::*;
    use crate::controller::observe::{NodeReport, ObservedNode};

    const MOVE: InFlightMove = InFlightMove {
        move_id: 9,
        range_id: 5,
        generation: 3,
        from: String::new(),
        to: String::new(),
        reason: String::new(),
        started_unix_ms: 0,
    };

    fn mv() -> InFlightMove {
        InFlightMove { from: "s".into(), to: "t".into(), ..MOVE }
    }

    fn range(generation: u64, state: RangeState, move_id: Option<u64>) -> RangeDescriptor {
        RangeDescriptor {
            range_id: 5,
            generation,
            state: state as i32,
            move_intent: move_id.map(|move_id| MoveIntent { move_id, ..Default::default() }),
            ..Default::default()
        }
    }

    /// A node that answered with these owned ranges, or (None) one that did not answer.
    fn node(id: &str, owned: Option<Vec<RangeDescriptor>>) -> ObservedNode {
        let member = Member { node_id: id.into(), address: format!("{id}:1"), draining: false, restarts: 0 };
        let report = match owned {
            Some(owned) => Ok(NodeReport {
                load: LoadReportResponse {
                    ranges: owned.into_iter().map(|d| RangeLoad { range: Some(d), ..Default::default() }).collect(),
                    ..Default::default()
                },
                importing: Vec::new(),
            }),
            None => Err("connection refused".into()),
        };
        ObservedNode { member, report }
    }

    fn plan(source: Option<Vec<RangeDescriptor>>, target: Option<Vec<RangeDescriptor>>) -> RecoveryPlan {
        let observation = Observation { nodes: vec![node("s", source), node("t", target)], ..Default::default() };
        recovery_plan(&observation, &mv())
    }

    #[test]
    fn a_target_owning_the_newer_generation_means_the_handoff_happened() {
        let frozen = range(3, RangeState::Frozen, Some(9));
        let owned = range(4, RangeState::Active, None);
        let finish = plan(Some(vec![frozen]), Some(vec![owned.clone()]));
        assert_eq!(finish, RecoveryPlan::Finish { new_owner: Box::new(owned.clone()), retire_on: Some("s:1".into()) });
        let already_retired = plan(Some(vec![]), Some(vec![owned.clone()]));
        assert_eq!(already_retired, RecoveryPlan::Finish { new_owner: Box::new(owned.clone()), retire_on: None });
        assert!(matches!(plan(None, Some(vec![owned])), RecoveryPlan::Wait(_)), "the source must be told");
    }

    #[test]
    fn without_a_takeover_both_sides_are_rolled_back() {
        let frozen = range(3, RangeState::Frozen, Some(9));
        let rollback = plan(Some(vec![frozen.clone()]), Some(vec![]));
        let both = RecoveryPlan::RollBack { abort_import_on: Some("t:1".into()), abort_export_on: Some("s:1".into()) };
        assert_eq!(rollback, both);
        // A target reporting the range at the old generation has not taken over.
        assert_eq!(plan(Some(vec![frozen]), Some(vec![range(3, RangeState::Active, None)])), both);
    }

    #[test]
    fn a_frozen_source_waits_while_the_target_cannot_be_asked() {
        let frozen = range(3, RangeState::Frozen, Some(9));
        assert!(matches!(plan(Some(vec![frozen]), None), RecoveryPlan::Wait(why) if why.contains("frozen")));
        // Frozen for another move: not this move's business; an active source never froze.
        let other_move = range(3, RangeState::Frozen, Some(8));
        let export_only = RecoveryPlan::RollBack { abort_import_on: None, abort_export_on: Some("s:1".into()) };
        assert_eq!(plan(Some(vec![other_move]), None), export_only);
        assert_eq!(plan(Some(vec![range(3, RangeState::Active, None)]), None), export_only);
    }
}
