//! Zero-downtime updates (`spec.updateStrategy.type: DrainFirst`), decided from the pods, the
//! StatefulSet and the last resharding round. Pure. One pod at a time, highest ordinal first:
//! its ranges move to the other pods, then it is deleted and the StatefulSet (OnDelete) recreates
//! it at the new revision; the next pod waits until every pod is back and ready.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kvfleet_resharding::fleet::FleetView;

use super::build::{self, Names};
use super::scale::{self, ScaleStep};

/// The label the StatefulSet controller puts on each pod: the revision it was created from.
const REVISION_LABEL: &str = "controller-revision-hash";
/// The Progressing condition's reason, and the Warning Event's, while an update is refused.
pub const BLOCKED_REASON: &str = "UpdateBlocked";

/// What the rollout needs to know about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    pub ordinal: i32,
    pub uid: Option<String>,
    pub revision: Option<String>,
    pub ready: bool,
    pub terminating: bool,
}

impl PodView {
    /// None for a pod that is not one of this StatefulSet's ordinals.
    pub fn of(names: &Names, pod: &Pod) -> Option<PodView> {
        let name = pod.metadata.name.clone()?;
        let ordinal = build::pod_ordinal(names, &name)?;
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Some(PodView {
            name,
            ordinal,
            uid: pod.metadata.uid.clone(),
            revision: pod.metadata.labels.as_ref().and_then(|l| l.get(REVISION_LABEL).cloned()),
            ready,
            terminating: pod.metadata.deletion_timestamp.is_some(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutStep {
    /// Every pod runs the StatefulSet's update revision.
    Done,
    /// Nothing is touched this round, and why.
    Wait { outdated: u32, why: String },
    /// A single pod has nowhere to move its ranges: it keeps the old revision.
    Blocked { outdated: u32, why: String },
    /// `pod`'s ranges are moving to the other pods.
    Drain { outdated: u32, pod: String, holding: String },
    /// `pod` holds nothing: delete it (only the pod with this uid) so it restarts updated.
    Restart { outdated: u32, pod: String, uid: Option<String> },
}

impl RolloutStep {
    /// Pods are being drained or restarted, or wait their turn (not Done, not Blocked).
    pub fn in_progress(&self) -> bool {
        !matches!(self, RolloutStep::Done | RolloutStep::Blocked { .. })
    }

    /// The pod the resharding loop must keep empty.
    pub fn draining_pod(&self) -> Option<&str> {
        match self {
            RolloutStep::Drain { pod, .. } | RolloutStep::Restart { pod, .. } => Some(pod),
            _ => None,
        }
    }

    pub fn outdated(&self) -> u32 {
        match self {
            RolloutStep::Done => 0,
            RolloutStep::Wait { outdated, .. }
            | RolloutStep::Blocked { outdated, .. }
            | RolloutStep::Drain { outdated, .. }
            | RolloutStep::Restart { outdated, .. } => *outdated,
        }
    }

    /// A sentence for Events and conditions.
    pub fn describe(&self) -> String {
        let left = |n: u32| format!("{n} pod{} to update", if n == 1 { "" } else { "s" });
        match self {
            RolloutStep::Done => "every pod runs the current spec".into(),
            RolloutStep::Wait { outdated, why } => format!("{}; waiting: {why}", left(*outdated)),
            RolloutStep::Blocked { outdated, why } => format!("{}; blocked: {why}", left(*outdated)),
            RolloutStep::Drain { outdated, holding, .. } => {
                format!("{}; moving ranges off {holding} before it restarts", left(*outdated))
            }
            RolloutStep::Restart { outdated, pod, .. } => {
                format!("{}; {pod} holds no ranges it must move: restarting it", left(*outdated))
            }
        }
    }
}

/// Whether the StatefulSet reports pods behind its update revision (then the pods are worth
/// listing). Only `updatedReplicas` counts: with OnDelete, currentRevision never advances.
pub fn pending(statefulset: &StatefulSet) -> bool {
    statefulset.status.as_ref().is_some_and(|s| s.updated_replicas.unwrap_or(0) < s.replicas)
}

pub fn decide(
    names: &Names,
    statefulset: &StatefulSet,
    pods: &[PodView],
    fleet: Option<&FleetView>,
    scale_step: &ScaleStep,
) -> RolloutStep {
    let Some(revision) = statefulset.status.as_ref().and_then(|s| s.update_revision.as_deref()) else {
        return RolloutStep::Done;
    };
    let replicas = statefulset.spec.replicas.unwrap_or(0);
    let mut outdated: Vec<&PodView> =
        pods.iter().filter(|p| p.ordinal < replicas && p.revision.as_deref() != Some(revision)).collect();
    if outdated.is_empty() {
        return RolloutStep::Done;
    }
    outdated.sort_by_key(|p| std::cmp::Reverse(p.ordinal));
    let count = outdated.len() as u32;
    let wait = |why: String| RolloutStep::Wait { outdated: count, why };

    if !matches!(scale_step, ScaleStep::Steady { .. }) {
        return wait("a scale step is in progress".into());
    }
    if replicas < 2 {
        return RolloutStep::Blocked {
            outdated: count,
            why: format!(
                "DrainFirst needs at least 2 pods to move {}'s ranges to; scale to 2 or set updateStrategy.type to Restart",
                outdated[0].name
            ),
        };
    }
    let unavailable: Vec<String> = (0..replicas)
        .filter_map(|ordinal| match pods.iter().find(|p| p.ordinal == ordinal) {
            None => Some(format!("{} (not created yet)", names.pod(ordinal))),
            Some(p) if p.terminating => Some(format!("{} (terminating)", p.name)),
            Some(p) if !p.ready => Some(format!("{} (not ready)", p.name)),
            Some(_) => None,
        })
        .collect();
    if !unavailable.is_empty() {
        return wait(format!("every pod must be ready before the next one drains: {}", unavailable.join(", ")));
    }
    let target = outdated[0];
    match scale::still_serving(fleet, &target.name) {
        Some(holding) => RolloutStep::Drain { outdated: count, pod: target.name.clone(), holding },
        None => RolloutStep::Restart { outdated: count, pod: target.name.clone(), uid: target.uid.clone() },
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::StatefulSetStatus;

    use super::*;
    use crate::k8s::fixtures::{Draining, Up, cluster, fleet_status, moving};

    fn names() -> Names {
        Names::of(&cluster("demo", 3)).unwrap()
    }

    fn statefulset(replicas: i32, updated: i32) -> StatefulSet {
        let mut sts = build::statefulset(&cluster("demo", replicas), replicas).unwrap();
        sts.status = Some(StatefulSetStatus {
            replicas,
            updated_replicas: Some(updated),
            current_revision: Some("old".into()),
            update_revision: Some("new".into()),
            ..Default::default()
        });
        sts
    }

    /// Pods 0..n with the given revisions, all ready.
    fn pods(revisions: &[&str]) -> Vec<PodView> {
        revisions
            .iter()
            .enumerate()
            .map(|(ordinal, revision)| PodView {
                name: format!("demo-{ordinal}"),
                ordinal: ordinal as i32,
                uid: Some(format!("uid-{ordinal}")),
                revision: Some(revision.to_string()),
                ready: true,
                terminating: false,
            })
            .collect()
    }

    const STEADY: ScaleStep = ScaleStep::Steady { replicas: 3 };

    #[test]
    fn nothing_to_do_when_every_pod_is_updated() {
        let sts = statefulset(3, 3);
        assert!(!pending(&sts));
        assert_eq!(decide(&names(), &sts, &pods(&["new", "new", "new"]), None, &STEADY), RolloutStep::Done);
        assert!(pending(&statefulset(3, 1)));
    }

    #[test]
    fn the_highest_outdated_pod_drains_first_then_restarts_when_empty() {
        let (n, sts) = (names(), statefulset(3, 0));
        let all_old = pods(&["old", "old", "old"]);
        // The last round did not drain demo-2 yet: it is marked now, nothing restarts.
        let up = fleet_status(&[("demo-0", Up, 2), ("demo-1", Up, 2), ("demo-2", Up, 2)], 0);
        let step = decide(&n, &sts, &all_old, Some(&up), &STEADY);
        assert_eq!(step, RolloutStep::Drain { outdated: 3, pod: "demo-2".into(), holding: "demo-2 (up)".into() });
        assert_eq!(step.draining_pod(), Some("demo-2"));
        assert!(step.describe().contains("3 pods to update; moving ranges off demo-2 (up)"), "{}", step.describe());
        // Draining, one range left and one moving.
        let mut draining = fleet_status(&[("demo-0", Up, 3), ("demo-1", Up, 2), ("demo-2", Draining, 1)], 0);
        draining.moves.push(moving(1, "demo-2", "demo-0"));
        let step = decide(&n, &sts, &all_old, Some(&draining), &STEADY);
        assert_eq!(step.draining_pod(), Some("demo-2"));
        assert!(matches!(step, RolloutStep::Drain { ref holding, .. } if holding == "demo-2 (1 ranges, 1 moving)"));
        // Empty: restart exactly that pod.
        let empty = fleet_status(&[("demo-0", Up, 3), ("demo-1", Up, 3), ("demo-2", Draining, 0)], 0);
        assert_eq!(
            decide(&n, &sts, &all_old, Some(&empty), &STEADY),
            RolloutStep::Restart { outdated: 3, pod: "demo-2".into(), uid: Some("uid-2".into()) }
        );
    }

    #[test]
    fn a_replicated_pod_restarts_once_it_leads_nothing_and_no_range_is_short_of_replicas() {
        let (n, sts) = (names(), statefulset(3, 0));
        let all_old = pods(&["old", "old", "old"]);
        // demo-2 holds a replica of all 4 ranges and still leads one of them.
        let mut replicated = fleet_status(&[("demo-0", Up, 4), ("demo-1", Up, 4), ("demo-2", Draining, 4)], 0);
        replicated.replication_factor = 3;
        replicated.nodes[2].following = 3;
        let step = decide(&n, &sts, &all_old, Some(&replicated), &STEADY);
        assert!(matches!(step, RolloutStep::Drain { ref holding, .. } if holding == "demo-2 (1 ranges)"), "{step:?}");
        // It leads nothing: it restarts with its follower replicas (the others serve meanwhile).
        replicated.nodes[2].following = 4;
        let restart = RolloutStep::Restart { outdated: 3, pod: "demo-2".into(), uid: Some("uid-2".into()) };
        assert_eq!(decide(&n, &sts, &all_old, Some(&replicated), &STEADY), restart);
        // Not while a range is short of replicas: restarting demo-2 could cost it its majority.
        replicated.under_replicated = vec![7];
        let step = decide(&n, &sts, &all_old, Some(&replicated), &STEADY);
        assert!(
            matches!(step, RolloutStep::Drain { ref holding, .. } if holding.contains("ranges 7 have fewer than 3 replicas answering")),
            "{step:?}"
        );
    }

    #[test]
    fn the_next_pod_waits_until_every_pod_is_back_and_ready() {
        let (n, sts) = (names(), statefulset(3, 0));
        let empty = fleet_status(&[("demo-0", Up, 3), ("demo-1", Up, 3), ("demo-2", Draining, 0)], 0);
        let mut terminating = pods(&["old", "old", "old"]);
        terminating[2].terminating = true;
        let step = decide(&n, &sts, &terminating, Some(&empty), &STEADY);
        assert_eq!(step.draining_pod(), None, "a deleted pod is not deleted again");
        assert!(step.describe().contains("demo-2 (terminating)"), "{}", step.describe());
        let gone = &pods(&["old", "old", "old"])[..2];
        assert!(decide(&n, &sts, gone, None, &STEADY).describe().contains("demo-2 (not created yet)"));
        let mut starting = pods(&["old", "old", "new"]);
        starting[2].ready = false;
        let step = decide(&n, &sts, &starting, None, &STEADY);
        assert_eq!(step.outdated(), 2);
        assert!(step.describe().contains("demo-2 (not ready)"), "{}", step.describe());
        // demo-2 is back: demo-1 is next.
        let step = decide(&n, &sts, &pods(&["old", "old", "new"]), None, &STEADY);
        assert_eq!(step.draining_pod(), Some("demo-1"));
    }

    #[test]
    fn a_single_pod_or_a_scale_step_holds_the_rollout() {
        let one = statefulset(1, 0);
        let step = decide(&names(), &one, &pods(&["old"]), None, &ScaleStep::Steady { replicas: 1 });
        assert!(matches!(&step, RolloutStep::Blocked { why, .. } if why.contains("at least 2 pods")), "{step:?}");
        assert_eq!(step.draining_pod(), None);
        let grow = ScaleStep::Grow { from: 3, to: 5 };
        let step = decide(&names(), &statefulset(3, 0), &pods(&["old", "old", "old"]), None, &grow);
        assert!(matches!(&step, RolloutStep::Wait { why, .. } if why.contains("scale step")), "{step:?}");
    }

    #[test]
    fn pods_are_read_from_their_labels_and_conditions() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "demo-1", "uid": "u1", "labels": {"controller-revision-hash": "demo-abc"},
                         "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let view = PodView::of(&names(), &pod).unwrap();
        assert_eq!(
            (view.ordinal, view.revision.as_deref(), view.ready, view.terminating),
            (1, Some("demo-abc"), true, true)
        );
        let stranger: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "other-1"}})).unwrap();
        assert_eq!(PodView::of(&names(), &stranger), None);
    }
}
