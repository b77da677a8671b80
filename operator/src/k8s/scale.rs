//! How many pods the StatefulSet runs, decided from the spec and what the resharding loop last
//! saw. Scale-in is two steps: the pods going away drain (their ranges move off), and only when
//! they hold nothing does the StatefulSet shrink, so no volume that holds a range is deleted.

use kvfleet_resharding::fleet::{FleetNode, FleetView, NodeState};

use super::build::Names;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScaleStep {
    /// No StatefulSet yet: create it at spec.replicas.
    Create {
        replicas: i32,
    },
    Steady {
        replicas: i32,
    },
    Grow {
        from: i32,
        to: i32,
    },
    /// Pods at or above `to` are draining; the StatefulSet stays at `from` until they are empty.
    Drain {
        from: i32,
        to: i32,
        waiting: Vec<String>,
    },
    /// Pods at or above `to` hold nothing: the StatefulSet shrinks to `to` (which may still be
    /// above spec.replicas if lower pods are not empty yet).
    Shrink {
        from: i32,
        to: i32,
    },
}

impl ScaleStep {
    /// The replica count to apply to the StatefulSet.
    pub fn replicas(&self) -> i32 {
        match self {
            ScaleStep::Create { replicas } | ScaleStep::Steady { replicas } => *replicas,
            ScaleStep::Grow { to, .. } | ScaleStep::Shrink { to, .. } => *to,
            ScaleStep::Drain { from, .. } => *from,
        }
    }

    /// A sentence for Events and conditions.
    pub fn describe(&self) -> String {
        match self {
            ScaleStep::Create { replicas } => format!("creating {replicas} storage pods"),
            ScaleStep::Steady { replicas } => format!("{replicas} storage pods"),
            ScaleStep::Grow { from, to } => format!("scaling out from {from} to {to} pods; new pods receive ranges"),
            ScaleStep::Drain { from, to, waiting } => format!(
                "scaling in from {from} to {to} pods: moving ranges off {} before the pods go",
                waiting.join(", ")
            ),
            ScaleStep::Shrink { from, to } => {
                format!("scaling in from {from} to {to} pods: their ranges have moved away")
            }
        }
    }
}

/// What a pod being removed still holds, or why its emptiness is not known.
pub(super) fn still_holding(fleet: Option<&FleetView>, pod: &str) -> Option<String> {
    let (fleet, node) = match draining(fleet, pod) {
        Ok(seen) => seen,
        Err(why) => return Some(why),
    };
    left(pod, node.ranges, fleet.moves_touching(pod))
}

/// What a pod about to restart (a DrainFirst update) still serves: its single copies and the
/// replicated ranges it leads (the replicas it follows restart with it; the others serve
/// meanwhile), or why restarting it now could make ranges unavailable.
pub(super) fn still_serving(fleet: Option<&FleetView>, pod: &str) -> Option<String> {
    let (fleet, node) = match draining(fleet, pod) {
        Ok(seen) => seen,
        Err(why) => return Some(why),
    };
    let short: Vec<String> = fleet.under_replicated.iter().chain(&fleet.leaderless).map(|id| id.to_string()).collect();
    if !short.is_empty() {
        return Some(format!(
            "{pod} (ranges {} have fewer than {} replicas answering: restarting it could leave them without a majority)",
            short.join(", "),
            fleet.replication_factor
        ));
    }
    left(pod, node.ranges.saturating_sub(node.following), fleet.moves_touching(pod))
}

/// The last round's view of `pod`, if that round drained it; else why its contents are unknown.
fn draining<'a>(fleet: Option<&'a FleetView>, pod: &str) -> Result<(&'a FleetView, &'a FleetNode), String> {
    let Some(fleet) = fleet.filter(|f| f.round > 0) else {
        return Err(format!("{pod} (no resharding round yet)"));
    };
    let Some(node) = fleet.node(pod) else {
        return Err(format!("{pod} (not seen yet)"));
    };
    if node.state != NodeState::Draining {
        // Up: the last round did not treat it as draining yet; down: what it holds is unknown.
        return Err(format!("{pod} ({})", node.state));
    }
    Ok((fleet, node))
}

/// What is left to move off `pod`, if anything.
fn left(pod: &str, ranges: u32, moves: usize) -> Option<String> {
    match (ranges, moves) {
        (0, 0) => None,
        (ranges, 0) => Some(format!("{pod} ({ranges} ranges)")),
        (ranges, moves) => Some(format!("{pod} ({ranges} ranges, {moves} moving)")),
    }
}

pub fn decide(names: &Names, spec_replicas: i32, current: Option<i32>, fleet: Option<&FleetView>) -> ScaleStep {
    let Some(current) = current else { return ScaleStep::Create { replicas: spec_replicas } };
    if spec_replicas > current {
        return ScaleStep::Grow { from: current, to: spec_replicas };
    }
    if spec_replicas == current {
        return ScaleStep::Steady { replicas: current };
    }
    // Shrink past every empty pod at the top; stop at the first one still holding something.
    let mut to = current;
    let mut waiting = Vec::new();
    for ordinal in (spec_replicas..current).rev() {
        match still_holding(fleet, &names.pod(ordinal)) {
            None if waiting.is_empty() => to = ordinal,
            None => {}
            Some(what) => waiting.push(what),
        }
    }
    waiting.reverse();
    if to < current {
        ScaleStep::Shrink { from: current, to }
    } else {
        ScaleStep::Drain { from: current, to: spec_replicas, waiting }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::fixtures::{Draining, Up, cluster, down, fleet_status, moving};

    fn fleet(pods: &[(&str, NodeState, u32)]) -> FleetView {
        fleet_status(pods, 0)
    }

    fn names() -> Names {
        Names::of(&cluster("demo", 3)).unwrap()
    }

    #[test]
    fn create_grow_and_steady() {
        assert_eq!(decide(&names(), 3, None, None), ScaleStep::Create { replicas: 3 });
        assert_eq!(decide(&names(), 5, Some(3), None), ScaleStep::Grow { from: 3, to: 5 });
        assert_eq!(decide(&names(), 3, Some(3), None), ScaleStep::Steady { replicas: 3 });
    }

    #[test]
    fn scale_in_waits_until_the_pods_going_away_are_empty() {
        let n = names();
        // No round yet: nothing is known, nothing shrinks.
        let step = decide(&n, 3, Some(5), None);
        assert!(matches!(&step, ScaleStep::Drain { from: 5, to: 3, waiting } if waiting.len() == 2), "{step:?}");
        assert_eq!(step.replicas(), 5);
        // The last round had not marked them draining yet: an empty "up" pod may still receive ranges.
        let seen = fleet(&[("demo-0", Up, 4), ("demo-3", Up, 0), ("demo-4", Up, 0)]);
        assert_eq!(decide(&n, 3, Some(5), Some(&seen)).replicas(), 5);
        // Draining, still holding ranges.
        let draining = fleet(&[("demo-3", Draining, 2), ("demo-4", Draining, 1)]);
        let step = decide(&n, 3, Some(5), Some(&draining));
        assert_eq!(
            step,
            ScaleStep::Drain { from: 5, to: 3, waiting: vec!["demo-3 (2 ranges)".into(), "demo-4 (1 ranges)".into()] }
        );
        assert!(step.describe().contains("moving ranges off demo-3 (2 ranges), demo-4 (1 ranges)"));
        // A pod down: unknown, so kept.
        let down = fleet(&[("demo-3", Draining, 0), ("demo-4", down("connection refused"), 0)]);
        assert_eq!(decide(&n, 3, Some(5), Some(&down)).replicas(), 5);
    }

    #[test]
    fn scale_in_shrinks_past_empty_pods_from_the_top_only() {
        let n = names();
        let empty = fleet(&[("demo-3", Draining, 0), ("demo-4", Draining, 0)]);
        assert_eq!(decide(&n, 3, Some(5), Some(&empty)), ScaleStep::Shrink { from: 5, to: 3 });
        // demo-4 empty, demo-3 not: the StatefulSet removes the highest ordinal first, so 5 -> 4.
        let top_empty = fleet(&[("demo-3", Draining, 1), ("demo-4", Draining, 0)]);
        assert_eq!(decide(&n, 3, Some(5), Some(&top_empty)), ScaleStep::Shrink { from: 5, to: 4 });
        // demo-3 empty, demo-4 not: nothing can go yet.
        let bottom_empty = fleet(&[("demo-3", Draining, 0), ("demo-4", Draining, 1)]);
        assert_eq!(decide(&n, 3, Some(5), Some(&bottom_empty)).replicas(), 5);
    }

    #[test]
    fn a_move_touching_a_draining_pod_holds_it() {
        let mut one_moving = fleet(&[("demo-3", Draining, 0)]);
        one_moving.moves.push(moving(1, "demo-3", "demo-1"));
        let step = decide(&names(), 3, Some(4), Some(&one_moving));
        assert_eq!(step, ScaleStep::Drain { from: 4, to: 3, waiting: vec!["demo-3 (0 ranges, 1 moving)".into()] });
    }

    /// The fleet view has no state text to decide on: the text people read is `Display`, and
    /// a node that did not answer stays unknown whatever its error says.
    #[test]
    fn scale_in_decides_on_the_typed_state_not_the_text() {
        let n = names();
        let misleading = fleet(&[("demo-3", down("draining"), 0), ("demo-4", down("draining, empty"), 0)]);
        assert_eq!(misleading.nodes[0].state.to_string(), "down: draining");
        let step = decide(&n, 3, Some(5), Some(&misleading));
        assert_eq!(
            step,
            ScaleStep::Drain {
                from: 5,
                to: 3,
                waiting: vec!["demo-3 (down: draining)".into(), "demo-4 (down: draining, empty)".into()]
            }
        );
        let drained = fleet(&[("demo-3", Draining, 0), ("demo-4", Draining, 0)]);
        assert_eq!(decide(&n, 3, Some(5), Some(&drained)), ScaleStep::Shrink { from: 5, to: 3 });
    }
}
