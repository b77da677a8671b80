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
            plan.skipped.push(Skip::ReplicatedMergeNotBuilt { left: left.id, right: right.id });
            continue;
        }
        if left.owner == right.owner {
            let cold_for = [left, right]
                .iter()
                .filter_map(|r| memory.cold_since(r.id))
                .map(|since| now.saturating_sub(since))
                .min()
                .unwrap_or(0);
            let reason = MergeReason::Cold {
                ops: left.load.ops() + right.load.ops(),
                size_bytes: left.size_bytes + right.size_bytes,
                cold_for,
            };
            plan.actions.push(Action::Merge { left: left.id, right: right.id, reason });
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
