//! Driving online moves through the nodes' admin API, and finishing or rolling back the ones a
//! failure interrupted. The protocol and its recovery rules are in docs/architecture.md; what the
//! controller needs to know is that the nodes persist every step, so where a move stands can be
//! read off the source and the target alone.

use std::time::{Duration, Instant};

use kvfleet_proto::v1::{
    AbortExportRequest, AbortImportRequest, CompleteImportRequest, FreezeForMoveRequest, ImportOutcomeRequest,
    ImportOutcomeResponse, ImportRangeRequest, MoveOutcome, RangeDescriptor, RangeState, RetireMovedRequest,
};

use crate::observe::{NodeClients, Observation, describe_status, leader_replica, with_timeout};
use crate::platform::Member;
use crate::state::InFlightMove;

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
    let mut source_admin = clients.admin(source.admin_address()).map_err(fail("connecting to the source"))?;
    let mut target_admin = clients.admin(target.admin_address()).map_err(fail("connecting to the target"))?;
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

/// What to do about a move that no task is driving. Decided from facts the nodes persisted,
/// never from whether a range id still exists (the new owner may have split, merged or moved
/// the range on since the handoff):
/// - the target's record says it completed the move: the handoff happened; retire the source's
///   copy if it still holds one (it is frozen for this move, and stale);
/// - the target aborted the move, or never completed it: roll back. Abort the import on the
///   target first (a persisted fence: it can then never complete the move), then the export on
///   the source (which unfreezes it only after checking that fence with the target itself);
/// - the target cannot be asked: wait, unless the source holds the range active (never frozen
///   for this move: the target cannot complete without that), where stopping the export is safe.
#[derive(Debug, Clone, PartialEq)]
pub enum RecoveryPlan {
    Finish { new_owner: Box<RangeDescriptor>, retire_on: Option<String> },
    RollBack { abort_import_on: Option<String>, abort_export_on: Option<String>, source_down: bool },
    Wait(String),
}

/// The target's answer to `ImportOutcome` for the move, or why it could not be asked.
pub type TargetAnswer = Result<ImportOutcomeResponse, String>;

pub fn recovery_plan(observation: &Observation, mv: &InFlightMove, target: &TargetAnswer) -> RecoveryPlan {
    let source = observation.node(&mv.from).filter(|n| n.report.is_ok());
    let source_copy = source.and_then(|s| s.holds(mv.range_id));
    let source_frozen = source_copy.is_some_and(|d| d.frozen_for(mv.move_id).is_some());
    let abort_export_on = source.filter(|_| source_copy.is_some()).map(|s| s.member.admin_address().to_string());
    let answer = match target {
        Ok(answer) => answer,
        Err(why) => {
            let active_source = source_copy.is_some_and(|d| d.state() == RangeState::Active);
            if active_source {
                return RecoveryPlan::RollBack { abort_import_on: None, abort_export_on, source_down: false };
            }
            return RecoveryPlan::Wait(format!(
                "target {} cannot be asked how move {} ended ({why}); the source {} {}",
                mv.to,
                mv.move_id,
                mv.from,
                if source.is_none() { "is down too" } else { "does not hold the range active" }
            ));
        }
    };
    match answer.outcome() {
        MoveOutcome::Completed => {
            let Some(new_owner) = answer.range.clone().filter(|r| r.range_id == mv.range_id) else {
                return RecoveryPlan::Wait(format!(
                    "target {} reports move {} completed for another range ({:?}): needs an operator",
                    mv.to,
                    mv.move_id,
                    answer.range.as_ref().map(|r| r.range_id)
                ));
            };
            // A source that left the fleet took its copy with it; one that is only down must
            // still be told.
            if source.is_none() && observation.node(&mv.from).is_some() {
                return RecoveryPlan::Wait(format!(
                    "the target owns range {} since move {}; source {} is down and still has to retire its copy",
                    mv.range_id, mv.move_id, mv.from
                ));
            }
            if source_copy.is_some() && !source_frozen {
                return RecoveryPlan::Wait(format!(
                    "target {} completed move {} but source {} holds range {} unfrozen: two owners; needs an operator",
                    mv.to, mv.move_id, mv.from, mv.range_id
                ));
            }
            RecoveryPlan::Finish { new_owner: Box::new(new_owner), retire_on: abort_export_on }
        }
        MoveOutcome::Aborted => {
            RecoveryPlan::RollBack { abort_import_on: None, abort_export_on, source_down: source.is_none() }
        }
        MoveOutcome::Importing | MoveOutcome::Unknown | MoveOutcome::Unspecified => {
            let target_address = observation.node(&mv.to).map(|t| t.member.admin_address().to_string());
            RecoveryPlan::RollBack { abort_import_on: target_address, abort_export_on, source_down: source.is_none() }
        }
    }
}

/// Asks the move's target what it persisted about the move.
async fn ask_target(
    clients: &NodeClients,
    observation: &Observation,
    mv: &InFlightMove,
    timeout: Duration,
) -> TargetAnswer {
    let Some(target) = observation.node(&mv.to) else {
        return Err(format!("{} is not a member of the fleet", mv.to));
    };
    if let Err(error) = &target.report {
        return Err(error.clone());
    }
    let request = with_timeout(ImportOutcomeRequest { move_id: mv.move_id }, timeout);
    let answer = clients
        .admin(target.member.admin_address())?
        .import_outcome(request)
        .await
        .map_err(|s| describe_status(&s))?
        .into_inner();
    if answer.node_id != mv.to {
        return Err(format!("{} answered as node {}", target.member.address, answer.node_id));
    }
    Ok(answer)
}

/// Carries out `recovery_plan` for a move no task drives.
pub async fn recover(
    clients: &NodeClients,
    observation: &Observation,
    mv: &InFlightMove,
    timeout: Duration,
) -> Result<Recovery, String> {
    let target = ask_target(clients, observation, mv, timeout).await;
    match recovery_plan(observation, mv, &target) {
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
        RecoveryPlan::RollBack { abort_import_on, abort_export_on, source_down } => {
            if let Some(address) = abort_import_on {
                let abort = AbortImportRequest { range_id: mv.range_id, move_id: mv.move_id };
                clients
                    .admin(&address)?
                    .abort_import(with_timeout(abort, timeout))
                    .await
                    .map_err(|s| format!("abort import on {}: {}", mv.to, describe_status(&s)))?;
            }
            if source_down {
                return Ok(Recovery::Waiting(format!(
                    "source {} is down; its export is aborted once it is back",
                    mv.from
                )));
            }
            if let Some(address) = abort_export_on {
                let target_address = observation.node(&mv.to).map(|t| t.member.address.clone()).unwrap_or_default();
                let abort = AbortExportRequest { range_id: mv.range_id, move_id: mv.move_id, target_address };
                clients
                    .admin(&address)?
                    .abort_export(with_timeout(abort, timeout))
                    .await
                    .map_err(|s| format!("abort export on {}: {}", mv.from, describe_status(&s)))?;
            }
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
                replica: false,
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
        .admin(node.admin_address())?
        .abort_import(with_timeout(AbortImportRequest { range_id, move_id }, timeout))
        .await
        .map(|_| ())
        .map_err(|s| format!("abort import of range {range_id} on {}: {}", node.node_id, describe_status(&s)))
}

#[cfg(test)]
mod tests {
    use kvfleet_proto::v1::{LoadReportResponse, MoveIntent, RangeLoad};

    use super::*;
    use crate::observe::{NodeReport, ObservedNode};

    const MOVE: InFlightMove = InFlightMove {
        move_id: 9,
        range_id: 5,
        generation: 3,
        from: String::new(),
        to: String::new(),
        reason: String::new(),
        started_unix_ms: 0,
        replica: false,
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
        let member = Member::at(id, &format!("{id}:1"));
        let report = match owned {
            Some(owned) => Ok(NodeReport {
                load: LoadReportResponse {
                    ranges: owned.into_iter().map(|d| RangeLoad { range: Some(d), ..Default::default() }).collect(),
                    ..Default::default()
                },
                ..Default::default()
            }),
            None => Err("connection refused".into()),
        };
        ObservedNode { member, report }
    }

    /// The plan for a source reporting `source` (None: unreachable), a target reporting `target`,
    /// and the target's answer about the move (None: it could not be asked).
    fn plan(
        source: Option<Vec<RangeDescriptor>>,
        target: Option<Vec<RangeDescriptor>>,
        outcome: Option<(MoveOutcome, Option<RangeDescriptor>)>,
    ) -> RecoveryPlan {
        let observation = Observation { nodes: vec![node("s", source), node("t", target)], ..Default::default() };
        let answer = match outcome {
            Some((outcome, range)) => Ok(ImportOutcomeResponse { node_id: "t".into(), outcome: outcome as i32, range }),
            None => Err("connection refused".to_string()),
        };
        recovery_plan(&observation, &mv(), &answer)
    }

    fn rollback(abort_import_on: Option<&str>, abort_export_on: Option<&str>, source_down: bool) -> RecoveryPlan {
        RecoveryPlan::RollBack {
            abort_import_on: abort_import_on.map(str::to_string),
            abort_export_on: abort_export_on.map(str::to_string),
            source_down,
        }
    }

    #[test]
    fn a_completed_import_means_the_handoff_happened_whatever_became_of_the_range() {
        let frozen = range(3, RangeState::Frozen, Some(9));
        let owned = range(4, RangeState::Active, None);
        let completed = Some((MoveOutcome::Completed, Some(owned.clone())));
        let finish = |retire_on: Option<&str>| RecoveryPlan::Finish {
            new_owner: Box::new(owned.clone()),
            retire_on: retire_on.map(str::to_string),
        };
        assert_eq!(plan(Some(vec![frozen.clone()]), Some(vec![owned.clone()]), completed.clone()), finish(Some("s:1")));
        // The target split (or merged, or moved on) the range since: the range id is gone from
        // it, its record of the move is not. The source's copy is stale: retire it.
        assert_eq!(plan(Some(vec![frozen.clone()]), Some(vec![]), completed.clone()), finish(Some("s:1")));
        assert_eq!(plan(Some(vec![]), Some(vec![]), completed.clone()), finish(None));
        assert!(
            matches!(plan(None, Some(vec![]), completed.clone()), RecoveryPlan::Wait(_)),
            "the source must be told"
        );
        let observation = Observation { nodes: vec![node("t", Some(vec![]))], ..Default::default() };
        let answer = Ok(ImportOutcomeResponse {
            node_id: "t".into(),
            outcome: MoveOutcome::Completed as i32,
            range: Some(owned.clone()),
        });
        assert_eq!(recovery_plan(&observation, &mv(), &answer), finish(None), "a source that left the fleet");
        // A source holding the range active although the target completed: two owners.
        let active = range(3, RangeState::Active, None);
        assert!(
            matches!(plan(Some(vec![active]), Some(vec![]), completed), RecoveryPlan::Wait(why) if why.contains("two owners"))
        );
    }

    #[test]
    fn an_import_not_completed_is_fenced_on_the_target_before_the_source_unfreezes() {
        let frozen = range(3, RangeState::Frozen, Some(9));
        let importing = Some((MoveOutcome::Importing, None));
        assert_eq!(
            plan(Some(vec![frozen.clone()]), Some(vec![]), importing.clone()),
            rollback(Some("t:1"), Some("s:1"), false)
        );
        // A target that never heard of the move is fenced the same way (a late import is refused).
        let unknown = Some((MoveOutcome::Unknown, None));
        assert_eq!(plan(Some(vec![frozen.clone()]), Some(vec![]), unknown), rollback(Some("t:1"), Some("s:1"), false));
        // Already aborted on the target: only the source is left to unfreeze.
        let aborted = Some((MoveOutcome::Aborted, None));
        assert_eq!(plan(Some(vec![frozen.clone()]), Some(vec![]), aborted.clone()), rollback(None, Some("s:1"), false));
        // The source is down: fence the target now, unfreeze the source once it is back.
        assert_eq!(plan(None, Some(vec![]), importing), rollback(Some("t:1"), None, true));
        assert_eq!(plan(None, Some(vec![]), aborted.clone()), rollback(None, None, true));
        // The source no longer holds the range (split before it froze): nothing to unfreeze there.
        assert_eq!(plan(Some(vec![]), Some(vec![]), aborted), rollback(None, None, false));
    }

    #[test]
    fn a_target_that_cannot_be_asked_blocks_everything_but_an_active_source() {
        let frozen = range(3, RangeState::Frozen, Some(9));
        assert!(
            matches!(plan(Some(vec![frozen]), None, None), RecoveryPlan::Wait(why) if why.contains("cannot be asked"))
        );
        assert!(matches!(plan(None, None, None), RecoveryPlan::Wait(_)));
        // Frozen for another move: not this move's business, and not active either.
        let other_move = range(3, RangeState::Frozen, Some(8));
        assert!(matches!(plan(Some(vec![other_move]), None, None), RecoveryPlan::Wait(_)));
        // An active source never froze for this move: the target cannot complete it; stop the export.
        let active = range(3, RangeState::Active, None);
        assert_eq!(plan(Some(vec![active]), None, None), rollback(None, Some("s:1"), false));
    }
}
