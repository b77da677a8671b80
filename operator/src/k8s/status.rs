//! The KeyValueCluster's status, computed from the StatefulSet, the last resharding round, the
//! scale step and the rollout step: phase, counts, per-pod load, hot keys and the four
//! conditions. Pure.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kvfleet_proto::display_key;
use kvfleet_resharding::fleet::FleetView;

use super::crd::{HotKey, KeyValueCluster, KeyValueClusterStatus, Phase, PodStatus, RolloutStatus};
use super::pods::StuckPod;
use super::rollout::RolloutStep;
use super::scale::ScaleStep;

const MAX_HOT_KEYS: usize = 10;
/// The Degraded condition's reason when two pods serve overlapping ranges (the same word as the
/// resharding loop's Warning event).
pub const OWNERSHIP_CONFLICT_REASON: &str = "OwnershipConflict";
/// The Degraded condition's and the Warning event's reason when the API server refuses an apply.
pub const API_REFUSED_REASON: &str = "ApiRefused";

/// The Ready and Degraded conditions' and the Warning event's reason for pods that stay not
/// Ready past the bound.
pub const STUCK_REASON: &str = "PodsNotReady";

/// The Degraded condition's reason when ranges have fewer replicas answering than the spec asks.
pub const UNDER_REPLICATED_REASON: &str = "UnderReplicated";

/// Everything the status is computed from.
pub struct Observed<'a> {
    pub kvc: &'a KeyValueCluster,
    pub statefulset: Option<&'a StatefulSet>,
    pub fleet: Option<&'a FleetView>,
    pub step: &'a ScaleStep,
    /// The DrainFirst update, when one was decided this reconcile.
    pub rollout: Option<&'a RolloutStep>,
    /// What keeps the cluster from being built, if anything.
    pub problem: Option<Problem<'a>>,
    /// Pods not Ready past the bound, and why (`pods.rs`).
    pub stuck: &'a [StuckPod],
    pub now: Time,
}

/// Why the operator cannot build what the spec asks for: each makes the cluster Degraded with
/// its own reason and the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem<'a> {
    /// The spec was refused by the operator's own checks (what CEL cannot express).
    InvalidSpec(&'a str),
    /// The API server refused (or failed) an apply: its message.
    ApiRefused(&'a str),
}

pub fn compute(observed: &Observed) -> KeyValueClusterStatus {
    let Observed { kvc, statefulset, fleet, step, rollout, problem, stuck, .. } = observed;
    let sts_status = statefulset.and_then(|s| s.status.as_ref());
    let replicas = statefulset.and_then(|s| s.spec.replicas).unwrap_or(0);
    let ready = sts_status.and_then(|s| s.ready_replicas).unwrap_or(0);
    let updating = statefulset.is_some_and(super::rollout::pending);
    let rollout = rollout.filter(|r| **r != RolloutStep::Done);
    let fleet = fleet.filter(|f| f.round > 0);
    // Pods that did not answer: those holding ranges make them unavailable; one that holds none
    // (restarting after a drain) makes nothing unavailable.
    let (down, silent): (Vec<&str>, Vec<&str>) = fleet
        .map(|f| {
            let unreachable = f.nodes.iter().filter(|n| n.state.is_down());
            let (holding, empty): (Vec<_>, Vec<_>) = unreachable.partition(|n| n.ranges > 0);
            (holding.iter().map(|n| n.name.as_str()).collect(), empty.iter().map(|n| n.name.as_str()).collect())
        })
        .unwrap_or_default();
    let conflicts: Vec<String> =
        fleet.map(|f| f.conflicts.iter().map(ToString::to_string).collect()).unwrap_or_default();
    let stuck_text = stuck.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    let ranges = fleet.map_or(0, |f| f.ranges as u32);
    let moves = fleet.map_or(0, |f| f.moves.len() as u32);
    let short: Vec<String> = fleet
        .map(|f| f.under_replicated.iter().chain(&f.leaderless).map(|id| id.to_string()).collect())
        .unwrap_or_default();
    let under_replicated = fleet.map_or(0, |f| f.under_replicated.len() as u32);
    let replicated = fleet.is_some_and(|f| f.replication_factor > 1);
    let scaling = matches!(step, ScaleStep::Grow { .. } | ScaleStep::Drain { .. } | ScaleStep::Shrink { .. });

    let phase = if problem.is_some()
        || !conflicts.is_empty()
        || !down.is_empty() && ready > 0
        || !stuck.is_empty()
        || !short.is_empty()
    {
        Phase::Degraded
    } else if ready == 0 || ranges == 0 {
        Phase::Creating
    } else if scaling {
        Phase::Scaling
    } else if rollout.is_some_and(RolloutStep::in_progress) {
        Phase::Updating
    } else if moves > 0 {
        Phase::Rebalancing
    } else {
        Phase::Running
    };

    let all_ready = ready >= kvc.spec.replicas && ranges > 0 && down.is_empty();
    let ready_condition = if all_ready {
        (true, "AllPodsServing", format!("{ready} pods serve {ranges} ranges"))
    } else if !stuck.is_empty() {
        (false, STUCK_REASON, format!("{ready}/{} pods ready; {stuck_text}", kvc.spec.replicas))
    } else if ranges == 0 {
        (false, "NoRanges", format!("{ready}/{} pods ready; waiting for the first range", kvc.spec.replicas))
    } else {
        (false, "PodsNotReady", format!("{ready}/{} pods ready", kvc.spec.replicas))
    };
    let progressing = if scaling {
        (true, "Scaling", step.describe())
    } else if let Some(rollout) = rollout {
        match rollout {
            RolloutStep::Blocked { .. } => (false, super::rollout::BLOCKED_REASON, rollout.describe()),
            _ => (true, "DrainFirstUpdate", rollout.describe()),
        }
    } else if updating {
        (true, "RollingUpdate", "pods are being updated one at a time".to_string())
    } else {
        (false, "Stable", step.describe())
    };
    let rebalancing = if moves > 0 {
        (true, "MovesInFlight", format!("{moves} ranges moving between pods"))
    } else {
        (false, "Balanced", "no ranges moving".to_string())
    };
    let degraded = if let Some(Problem::InvalidSpec(why)) = problem {
        (true, "InvalidSpec", why.to_string())
    } else if let Some(Problem::ApiRefused(why)) = problem {
        (true, API_REFUSED_REASON, why.to_string())
    } else if !conflicts.is_empty() {
        let message = format!(
            "keys served by more than one pod, acknowledged writes may diverge; nothing is planned on them: {}",
            conflicts.join("; ")
        );
        (true, OWNERSHIP_CONFLICT_REASON, message)
    } else if !down.is_empty() && replicated {
        let message = format!(
            "unreachable: {} (a replicated range serves while a majority of its replicas answers; {} ranges under-replicated, {} without a leader)",
            down.join(", "),
            under_replicated,
            fleet.map_or(0, |f| f.leaderless.len())
        );
        (true, "PodsUnreachable", message)
    } else if !down.is_empty() {
        (true, "PodsUnreachable", format!("unreachable: {} (their ranges are unavailable)", down.join(", ")))
    } else if !stuck.is_empty() {
        (true, STUCK_REASON, format!("pods not ready: {stuck_text}"))
    } else if !short.is_empty() {
        let factor = fleet.map_or(1, |f| f.replication_factor);
        let message = format!(
            "ranges with fewer than {factor} replicas answering (or no leader): {}; one more loss may make them unavailable",
            short.join(", ")
        );
        (true, UNDER_REPLICATED_REASON, message)
    } else if !silent.is_empty() {
        let message = format!("not answering: {} (they hold no range, so nothing is unavailable)", silent.join(", "));
        (false, "NothingUnavailable", message)
    } else {
        (false, "Healthy", "every pod answers".to_string())
    };
    let old = kvc.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let generation = kvc.metadata.generation;
    let conditions = [
        ("Ready", ready_condition),
        ("Progressing", progressing),
        ("Rebalancing", rebalancing),
        ("Degraded", degraded),
    ]
    .into_iter()
    .map(|(type_, (status, reason, message))| condition(old, type_, status, reason, message, generation, &observed.now))
    .collect();

    KeyValueClusterStatus {
        phase: Some(phase),
        observed_generation: generation,
        replicas,
        ready_replicas: ready,
        ranges,
        moves_in_flight: moves,
        under_replicated_ranges: under_replicated,
        replication_factor: fleet.map_or(0, |f| f.replication_factor as u32),
        pods: fleet
            .map(|f| {
                f.nodes
                    .iter()
                    .map(|n| PodStatus {
                        name: n.name.clone(),
                        state: n.state.to_string(),
                        ranges: n.ranges,
                        ops_per_sec: one_decimal(n.ops_per_sec),
                        size_bytes: n.size_bytes,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        hot_keys: fleet
            .map(|f| {
                f.hot_keys
                    .iter()
                    .take(MAX_HOT_KEYS)
                    .map(|h| HotKey {
                        key: display_key(&h.key),
                        range_id: h.range_id,
                        ops_per_sec: one_decimal(h.ops_per_sec),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        conditions,
        rollout: rollout
            .map(|r| RolloutStatus { draining_pod: r.draining_pod().map(str::to_string), outdated_pods: r.outdated() }),
    }
}

/// Rates in the status are rounded to 0.1 op/s: finer digits would change the object every round.
fn one_decimal(rate: f64) -> f64 {
    (rate * 10.0).round() / 10.0
}

/// A condition; its lastTransitionTime moves only when its status flips.
fn condition(
    old: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::StatefulSetStatus;
    use k8s_openapi::jiff::Timestamp;
    use kvfleet_resharding::fleet::{Conflict, HotKey as FleetHotKey, NodeState};

    use super::*;
    use crate::k8s::build::statefulset;
    use crate::k8s::fixtures::{Draining, Up, cluster, down, fleet_status};

    fn sts(kvc: &KeyValueCluster, replicas: i32, ready: i32) -> StatefulSet {
        let mut sts = statefulset(kvc, replicas).unwrap();
        sts.status = Some(StatefulSetStatus {
            replicas,
            ready_replicas: Some(ready),
            updated_replicas: Some(replicas),
            ..Default::default()
        });
        sts
    }

    fn fleet(pods: &[(&str, NodeState, u32)], moves: usize) -> FleetView {
        let mut fleet = fleet_status(pods, moves);
        fleet.nodes.iter_mut().for_each(|n| n.ops_per_sec = 123.45);
        fleet.hot_keys = vec![FleetHotKey { range_id: 4, key: b"user\x01".to_vec(), ops_per_sec: 999.96 }];
        fleet
    }

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    fn compute_at(
        kvc: &KeyValueCluster,
        sts: Option<&StatefulSet>,
        fleet: Option<&FleetView>,
        step: &ScaleStep,
        now: i64,
    ) -> KeyValueClusterStatus {
        compute(&Observed {
            kvc,
            statefulset: sts,
            fleet,
            step,
            rollout: None,
            problem: None,
            stuck: &[],
            now: at(now),
        })
    }

    fn cond<'a>(status: &'a KeyValueClusterStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn a_healthy_cluster_is_running_and_ready() {
        let kvc = cluster("demo", 3);
        let sts = sts(&kvc, 3, 3);
        let fleet = fleet(&[("demo-0", Up, 2), ("demo-1", Up, 2), ("demo-2", Up, 1)], 0);
        let status = compute_at(&kvc, Some(&sts), Some(&fleet), &ScaleStep::Steady { replicas: 3 }, 100);
        assert_eq!(status.phase, Some(Phase::Running));
        assert_eq!((status.replicas, status.ready_replicas, status.ranges, status.moves_in_flight), (3, 3, 5, 0));
        assert_eq!(cond(&status, "Ready").status, "True");
        assert_eq!(cond(&status, "Degraded").status, "False");
        assert_eq!(status.pods[0].ops_per_sec, 123.5);
        assert_eq!(status.hot_keys[0].key, "user\\x01");
        assert_eq!(status.observed_generation, Some(1));
    }

    #[test]
    fn under_replicated_ranges_degrade_a_replicated_cluster_and_a_down_pod_is_no_outage() {
        let kvc = cluster("demo", 3);
        let steady = ScaleStep::Steady { replicas: 3 };
        let mut fleet = fleet(&[("demo-0", Up, 2), ("demo-1", Up, 2), ("demo-2", Up, 2)], 0);
        fleet.replication_factor = 3;
        fleet.under_replicated = vec![4, 9];
        let status = compute_at(&kvc, Some(&sts(&kvc, 3, 3)), Some(&fleet), &steady, 1);
        assert_eq!(status.phase, Some(Phase::Degraded));
        assert_eq!(status.under_replicated_ranges, 2);
        assert_eq!(cond(&status, "Degraded").reason, UNDER_REPLICATED_REASON);
        assert!(cond(&status, "Degraded").message.contains("fewer than 3 replicas answering (or no leader): 4, 9"));
        // A pod down in a replicated cluster: its ranges serve from the other replicas.
        fleet.nodes[2].state = down("connection refused");
        let status = compute_at(&kvc, Some(&sts(&kvc, 3, 2)), Some(&fleet), &steady, 1);
        assert_eq!(cond(&status, "Degraded").reason, "PodsUnreachable");
        assert!(
            cond(&status, "Degraded")
                .message
                .contains("serves while a majority of its replicas answers; 2 ranges under-replicated")
        );
    }

    #[test]
    fn phases_follow_what_is_happening() {
        let kvc = cluster("demo", 3);
        let steady = ScaleStep::Steady { replicas: 3 };
        assert_eq!(compute_at(&kvc, None, None, &ScaleStep::Create { replicas: 3 }, 1).phase, Some(Phase::Creating));
        let up = [("demo-0", Up, 2), ("demo-1", Up, 2), ("demo-2", Up, 1)];
        let moving = fleet(&up, 2);
        let status = compute_at(&kvc, Some(&sts(&kvc, 3, 3)), Some(&moving), &steady, 1);
        assert_eq!(status.phase, Some(Phase::Rebalancing));
        assert_eq!(cond(&status, "Rebalancing").message, "2 ranges moving between pods");
        let drain = ScaleStep::Drain { from: 4, to: 3, waiting: vec!["demo-3 (2 ranges)".into()] };
        let status = compute_at(&kvc, Some(&sts(&kvc, 4, 4)), Some(&moving), &drain, 1);
        assert_eq!(status.phase, Some(Phase::Scaling));
        assert!(cond(&status, "Progressing").message.contains("moving ranges off demo-3 (2 ranges)"));
        let down = fleet(&[("demo-0", Up, 2), ("demo-1", down("connection refused"), 2), ("demo-2", down("x"), 0)], 0);
        let status = compute_at(&kvc, Some(&sts(&kvc, 3, 2)), Some(&down), &steady, 1);
        assert_eq!(status.phase, Some(Phase::Degraded));
        assert_eq!(cond(&status, "Degraded").reason, "PodsUnreachable");
        assert_eq!(cond(&status, "Degraded").message, "unreachable: demo-1 (their ranges are unavailable)");
        assert_eq!(cond(&status, "Ready").status, "False");
        let invalid = compute(&Observed {
            kvc: &kvc,
            statefulset: None,
            fleet: None,
            step: &steady,
            rollout: None,
            problem: Some(Problem::InvalidSpec("spec.image is empty")),
            stuck: &[],
            now: at(1),
        });
        assert_eq!(invalid.phase, Some(Phase::Degraded));
        assert_eq!(cond(&invalid, "Degraded").message, "spec.image is empty");
    }

    #[test]
    fn overlapping_owners_degrade_the_cluster_naming_both_ranges() {
        let kvc = cluster("demo", 3);
        let mut conflicted = fleet(&[("demo-0", Up, 2), ("demo-1", Up, 2), ("demo-2", Up, 1)], 0);
        let range = |range_id, generation| kvfleet_proto::v1::RangeDescriptor {
            range_id,
            start_key: b"user1".to_vec().into(),
            end_key: b"user5".to_vec().into(),
            generation,
            ..Default::default()
        };
        conflicted.conflicts =
            vec![Conflict { newer: ("demo-1".into(), range(21, 9)), older: ("demo-2".into(), range(14, 7)) }];
        let status = compute_at(&kvc, Some(&sts(&kvc, 3, 3)), Some(&conflicted), &ScaleStep::Steady { replicas: 3 }, 1);
        assert_eq!(status.phase, Some(Phase::Degraded));
        let degraded = cond(&status, "Degraded");
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", OWNERSHIP_CONFLICT_REASON));
        assert!(
            degraded.message.contains("range 14 [user1, user5) (generation 7) on demo-2 overlaps range 21"),
            "{}",
            degraded.message
        );
    }

    #[test]
    fn transition_times_move_only_when_a_condition_flips() {
        let mut kvc = cluster("demo", 3);
        let steady = ScaleStep::Steady { replicas: 3 };
        let sts = sts(&kvc, 3, 3);
        let calm = fleet(&[("demo-0", Up, 3)], 0);
        kvc.status = Some(compute_at(&kvc, Some(&sts), Some(&calm), &steady, 100));
        let again = compute_at(&kvc, Some(&sts), Some(&calm), &steady, 200);
        assert_eq!(cond(&again, "Rebalancing").last_transition_time, at(100));
        kvc.status = Some(again);
        let busy = fleet(&[("demo-0", Up, 3)], 1);
        let flipped = compute_at(&kvc, Some(&sts), Some(&busy), &steady, 300);
        assert_eq!(cond(&flipped, "Rebalancing").last_transition_time, at(300));
        assert_eq!(cond(&flipped, "Ready").last_transition_time, at(100));
    }

    #[test]
    fn a_drain_first_update_shows_in_phase_condition_and_rollout() {
        let kvc = cluster("demo", 3);
        let steady = ScaleStep::Steady { replicas: 3 };
        let sts = sts(&kvc, 3, 3);
        let serving = fleet(&[("demo-0", Up, 3), ("demo-1", Up, 2), ("demo-2", Draining, 1)], 1);
        let drain = RolloutStep::Drain { outdated: 3, pod: "demo-2".into(), holding: "demo-2 (1 ranges)".into() };
        let observed = |rollout| Observed {
            kvc: &kvc,
            statefulset: Some(&sts),
            fleet: Some(&serving),
            step: &steady,
            rollout,
            problem: None,
            stuck: &[],
            now: at(1),
        };
        let status = compute(&observed(Some(&drain)));
        assert_eq!(status.phase, Some(Phase::Updating));
        assert_eq!(status.rollout, Some(RolloutStatus { draining_pod: Some("demo-2".into()), outdated_pods: 3 }));
        assert_eq!(cond(&status, "Progressing").reason, "DrainFirstUpdate");
        let blocked = RolloutStep::Blocked { outdated: 1, why: "DrainFirst needs at least 2 pods".into() };
        let status = compute(&observed(Some(&blocked)));
        assert_eq!(status.phase, Some(Phase::Rebalancing), "a blocked update is not progress");
        assert_eq!(
            (cond(&status, "Progressing").status.as_str(), cond(&status, "Progressing").reason.as_str()),
            ("False", "UpdateBlocked")
        );
        let done = compute(&observed(Some(&RolloutStep::Done)));
        assert_eq!(done.rollout, None);
        // Written as a merge patch: a finished rollout and emptied lists must replace the old ones.
        let json = serde_json::to_value(KeyValueClusterStatus::default()).unwrap();
        assert_eq!(
            (&json["rollout"], &json["hotKeys"], &json["pods"]),
            (&serde_json::Value::Null, &serde_json::json!([]), &serde_json::json!([]))
        );
        assert!(json.as_object().unwrap().contains_key("rollout"));
    }

    #[test]
    fn pods_that_never_become_ready_are_named_with_their_reason() {
        let kvc = cluster("demo", 3);
        let sts = sts(&kvc, 3, 2);
        let steady = ScaleStep::Steady { replicas: 3 };
        let stuck = [StuckPod { name: "demo-2".into(), why: "Unschedulable: 0/2 nodes are available".into() }];
        let status = compute(&Observed {
            kvc: &kvc,
            statefulset: Some(&sts),
            fleet: None,
            step: &steady,
            rollout: None,
            problem: None,
            stuck: &stuck,
            now: at(1),
        });
        assert_eq!(status.phase, Some(Phase::Degraded));
        assert_eq!(cond(&status, "Ready").reason, "PodsNotReady");
        assert_eq!(cond(&status, "Ready").message, "2/3 pods ready; demo-2: Unschedulable: 0/2 nodes are available");
        assert_eq!(cond(&status, "Degraded").status, "True");
    }

    #[test]
    fn degraded_never_says_every_pod_answers_while_one_does_not() {
        let kvc = cluster("demo", 3);
        let fleet = fleet(&[("demo-0", Up, 2), ("demo-1", Up, 2), ("demo-2", down("dns error"), 0)], 0);
        let sts = sts(&kvc, 3, 3);
        let status = compute_at(&kvc, Some(&sts), Some(&fleet), &ScaleStep::Steady { replicas: 3 }, 1);
        let degraded = cond(&status, "Degraded");
        assert_eq!(degraded.status, "False", "a pod holding no range makes nothing unavailable");
        assert_eq!(degraded.message, "not answering: demo-2 (they hold no range, so nothing is unavailable)");
    }
}
