//! Merges: adjacent ranges that stayed cold and small for `merge_delay_secs` become one; if they
//! live on different nodes, the smaller moves next to the other first. Never soon after a split.

use std::collections::HashSet;

use crate::model::*;
use crate::{Memory, Policy};

pub fn is_cold(range: &RangeView, policy: &Policy) -> bool {
    range.load.ops() < policy.merge_below_qps && range.size_bytes < policy.merge_below_bytes
}

#[allow(clippy::too_many_arguments)]
pub fn plan_merges(
    view: &ClusterView,
    policy: &Policy,
    memory: &Memory,
    now: u64,
    touched: &mut HashSet<RangeId>,
    budget: &mut usize,
    plan: &mut Plan,
) {
    let mut ordered: Vec<&RangeView> = view.ranges.iter().collect();
    ordered.sort_by(|a, b| a.start.cmp(&b.start));
    let cold_long_enough = |r: &RangeView| {
        memory.cold_since(r.id).is_some_and(|since| now.saturating_sub(since) >= policy.merge_delay_secs)
    };
    for pair in ordered.windows(2) {
        let (left, right) = (pair[0], pair[1]);
        if left.end != right.start || touched.contains(&left.id) || touched.contains(&right.id) {
            continue;
        }
        if !(cold_long_enough(left) && cold_long_enough(right)) {
            continue;
        }
        if left.size_bytes + right.size_bytes >= policy.merge_below_bytes
            || left.load.ops() + right.load.ops() >= policy.merge_below_qps
        {
            continue;
        }
        let last_split = left.split_at.max(right.split_at);
        if let Some(split_at) = last_split.filter(|&t| now < t + policy.merge_delay_secs) {
            let seconds_left = split_at + policy.merge_delay_secs - now;
            plan.skipped.push(Skip::MergeDelay { left: left.id, right: right.id, seconds_left });
            continue;
        }
        if left.is_replicated() || right.is_replicated() {
            if plan_replicated_merge(view, left, right, memory, now, budget, plan) {
                touched.insert(left.id);
                touched.insert(right.id);
            }
            continue;
        }
        if left.owner == right.owner {
            plan.actions.push(Action::Merge {
                left: left.id,
                right: right.id,
                reason: cold_reason(left, right, memory, now),
            });
        } else {
            let (mover, stayer) = if left.size_bytes <= right.size_bytes { (left, right) } else { (right, left) };
            let target_ok = view.nodes.get(stayer.owner.0 as usize).is_some_and(|n| n.schedulable && !n.draining);
            if !target_ok {
                continue;
            }
            if *budget == 0 {
                plan.skipped.push(Skip::MoveBudgetExhausted { wanted: 1 });
                continue;
            }
            *budget -= 1;
            plan.actions.push(Action::Move {
                range: mover.id,
                from: mover.owner,
                to: stayer.owner,
                reason: MoveReason::ColocateForMerge { neighbour: stayer.id },
            });
        }
        touched.insert(left.id);
        touched.insert(right.id);
    }
}

fn cold_reason(left: &RangeView, right: &RangeView, memory: &Memory, now: u64) -> MergeReason {
    let cold_for = [left, right]
        .iter()
        .filter_map(|r| memory.cold_since(r.id))
        .map(|since| now.saturating_sub(since))
        .min()
        .unwrap_or(0);
    MergeReason::Cold {
        ops: left.load.ops() + right.load.ops(),
        size_bytes: left.size_bytes + right.size_bytes,
        cold_for,
    }
}

/// Two cold neighbours, at least one replicated: merged through their logs if their replicas
/// are on the same nodes, else the smaller one's replicas move one by one onto the other's nodes
/// first (TiKV's and CockroachDB's merge queues align replicas the same way). Nothing while a
/// replica of either is down, lost or missing (the merge needs every replica; a move would
/// leave the range one failure from unavailable). Whether it acted (or is held up for a reason
/// it recorded).
fn plan_replicated_merge(
    view: &ClusterView,
    left: &RangeView,
    right: &RangeView,
    memory: &Memory,
    now: u64,
    budget: &mut usize,
    plan: &mut Plan,
) -> bool {
    let (ids, skip) =
        ((left.id, right.id), |reason| Skip::ReplicatedMergeHeld { left: left.id, right: right.id, reason });
    if !(left.is_replicated() && right.is_replicated()) {
        plan.skipped.push(skip(MergeHeld::SingleCopyNeighbour));
        return false;
    }
    let answering = |node: &NodeId| view.nodes.get(node.0 as usize).is_some_and(|n| n.schedulable);
    let whole = |r: &RangeView| r.lost.is_empty() && r.missing_voters == 0 && r.replicas.iter().all(answering);
    if !(whole(left) && whole(right)) {
        plan.skipped.push(skip(MergeHeld::ReplicaDown));
        return false;
    }
    let nodes = |r: &RangeView| {
        let mut nodes = r.replicas.clone();
        nodes.sort();
        nodes
    };
    if nodes(left) == nodes(right) {
        plan.actions.push(Action::Merge { left: ids.0, right: ids.1, reason: cold_reason(left, right, memory, now) });
        return true;
    }
    let (mover, stayer) = if left.size_bytes <= right.size_bytes { (left, right) } else { (right, left) };
    let from = mover.replicas.iter().find(|n| !stayer.replicas.contains(n));
    let usable = |n: &&NodeId| view.nodes.get(n.0 as usize).is_some_and(|v| v.schedulable && !v.draining);
    let to = stayer.replicas.iter().filter(usable).find(|n| !mover.replicas.contains(n));
    let (Some(&from), Some(&to)) = (from, to) else {
        plan.skipped.push(skip(MergeHeld::NoNodeToAlign));
        return false;
    };
    if *budget == 0 {
        plan.skipped.push(Skip::MoveBudgetExhausted { wanted: 1 });
        return false;
    }
    *budget -= 1;
    plan.actions.push(Action::Move {
        range: mover.id,
        from,
        to,
        reason: MoveReason::ColocateForMerge { neighbour: stayer.id },
    });
    true
}

#[cfg(test)]
mod tests {
    use crate::sim::range_view;
    use crate::*;

    fn nodes(count: usize, down: &[usize]) -> Vec<NodeView> {
        (0..count)
            .map(|i| NodeView {
                id: NodeId(i as u32),
                name: format!("n{i}"),
                schedulable: !down.contains(&i),
                draining: false,
                restarting: false,
                departed: false,
            })
            .collect()
    }

    fn replicated(id: RangeId, span: (u8, u8), replicas: &[u32], size_bytes: u64) -> RangeView {
        let end = if span.1 == 0 { Vec::new() } else { vec![span.1] };
        let mut range = range_view(id, &[span.0], &end, replicas[0]);
        range.replicas = replicas.iter().map(|&n| NodeId(n)).collect();
        range.size_bytes = size_bytes;
        range
    }

    /// The plan once both ranges have been cold for longer than the merge delay.
    fn plan_when_cold_long_enough(view: &ClusterView) -> Plan {
        let mut planner = Planner::new(Policy { merge_delay_secs: 10, ..Policy::default() });
        planner.plan(view, 0);
        planner.plan(view, 100)
    }

    #[test]
    fn cold_replicated_neighbours_on_the_same_nodes_merge() {
        let ranges = vec![replicated(1, (0, 9), &[0, 1, 2], 1 << 20), replicated(2, (9, 0), &[2, 0, 1], 1 << 20)];
        let view = ClusterView { nodes: nodes(4, &[]), ranges, in_flight: Vec::new() };
        let plan = plan_when_cold_long_enough(&view);
        assert!(
            plan.actions.iter().any(|a| matches!(a, Action::Merge { left: 1, right: 2, .. })),
            "{:?}",
            plan.actions
        );
    }

    #[test]
    fn replicas_on_other_nodes_are_aligned_first_the_smaller_range_moving() {
        // Range 2 (smaller) is on n0, n1, n3; range 1 on n0, n1, n2: n3's copy goes to n2.
        let ranges = vec![replicated(1, (0, 9), &[0, 1, 2], 4 << 20), replicated(2, (9, 0), &[0, 1, 3], 1 << 20)];
        let view = ClusterView { nodes: nodes(4, &[]), ranges, in_flight: Vec::new() };
        let plan = plan_when_cold_long_enough(&view);
        let expected = Action::Move {
            range: 2,
            from: NodeId(3),
            to: NodeId(2),
            reason: MoveReason::ColocateForMerge { neighbour: 1 },
        };
        assert!(plan.actions.contains(&expected), "{:?}", plan.actions);
        assert!(!plan.actions.iter().any(|a| matches!(a, Action::Merge { .. })), "{:?}", plan.actions);
    }

    #[test]
    fn nothing_merges_or_aligns_while_a_replica_is_down() {
        let ranges = vec![replicated(1, (0, 9), &[0, 1, 2], 1 << 20), replicated(2, (9, 0), &[0, 1, 2], 1 << 20)];
        let view = ClusterView { nodes: nodes(4, &[2]), ranges, in_flight: Vec::new() };
        let plan = plan_when_cold_long_enough(&view);
        assert!(!plan.actions.iter().any(|a| a.ranges().contains(&1) || a.ranges().contains(&2)), "{:?}", plan.actions);
        let held = Skip::ReplicatedMergeHeld { left: 1, right: 2, reason: MergeHeld::ReplicaDown };
        assert!(plan.skipped.contains(&held), "{:?}", plan.skipped);
        assert!(held.to_string().contains("a merge needs every replica"));
    }
}
