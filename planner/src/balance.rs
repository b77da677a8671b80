//! Moves: drain nodes being removed, then even out load (ops/s) across nodes, then size (with
//! cold ranges only, so size moves never undo load balance). A tolerance band, a minimum gain
//! per move and a per-range cooldown keep ranges from ping-ponging; `max_concurrent_moves`
//! bounds the work in flight.

use std::collections::{HashMap, HashSet};

use crate::Policy;
use crate::model::*;

/// Where each range will be once in-flight moves land, and each node's totals from that.
struct Placement<'a> {
    view: &'a ClusterView,
    ranges: Vec<(&'a RangeView, usize)>,
    ops: Vec<f64>,
    bytes: Vec<f64>,
}

impl<'a> Placement<'a> {
    fn new(view: &'a ClusterView) -> Self {
        let nodes = view.nodes.len();
        let moving_to: HashMap<RangeId, NodeId> = view
            .in_flight
            .iter()
            .filter_map(|a| match a {
                Action::Move { range, to, .. } => Some((*range, *to)),
                _ => None,
            })
            .collect();
        let mut placement = Placement { view, ranges: Vec::new(), ops: vec![0.0; nodes], bytes: vec![0.0; nodes] };
        for range in &view.ranges {
            let node = moving_to.get(&range.id).copied().unwrap_or(range.owner).0 as usize;
            if node >= nodes {
                continue;
            }
            placement.ops[node] += range.load.ops();
            placement.bytes[node] += range.size_bytes as f64;
            placement.ranges.push((range, node));
        }
        placement
    }

    fn shift(&mut self, index: usize, to: usize) {
        let (range, from) = self.ranges[index];
        self.ops[from] -= range.load.ops();
        self.bytes[from] -= range.size_bytes as f64;
        self.ops[to] += range.load.ops();
        self.bytes[to] += range.size_bytes as f64;
        self.ranges[index].1 = to;
    }
}

pub fn plan_moves(
    view: &ClusterView,
    policy: &Policy,
    now: u64,
    touched: &mut HashSet<RangeId>,
    budget: &mut usize,
    plan: &mut Plan,
) {
    let mut placement = Placement::new(view);
    let targets: Vec<usize> =
        view.nodes.iter().enumerate().filter(|(_, n)| n.schedulable && !n.draining).map(|(i, _)| i).collect();
    if targets.is_empty() {
        if !view.ranges.is_empty() {
            plan.skipped.push(Skip::NoTargetNode);
        }
        return;
    }
    if !drain(view, &mut placement, &targets, touched, budget, plan) {
        return;
    }
    let total_ops: f64 = targets.iter().map(|&n| placement.ops[n]).sum();
    if total_ops >= policy.min_balance_qps {
        balance(BalanceMetric::Load, policy, now, &mut placement, &targets, touched, budget, plan);
    }
    balance(BalanceMetric::Size, policy, now, &mut placement, &targets, touched, budget, plan);
}

/// Moves every range off draining nodes. Returns false if the budget ran out.
fn drain(
    view: &ClusterView,
    placement: &mut Placement<'_>,
    targets: &[usize],
    touched: &mut HashSet<RangeId>,
    budget: &mut usize,
    plan: &mut Plan,
) -> bool {
    let draining: Vec<usize> = (0..placement.ranges.len())
        .filter(|&i| {
            let (range, node) = placement.ranges[i];
            view.nodes[node].draining && !touched.contains(&range.id)
        })
        .collect();
    for (done, index) in draining.iter().enumerate() {
        if *budget == 0 {
            plan.skipped.push(Skip::MoveBudgetExhausted { wanted: draining.len() - done });
            return false;
        }
        let (range, from) = placement.ranges[*index];
        let to = least_loaded(placement, targets);
        plan.actions.push(Action::Move {
            range: range.id,
            from: NodeId(from as u32),
            to: NodeId(to as u32),
            reason: MoveReason::Drain,
        });
        placement.shift(*index, to);
        touched.insert(range.id);
        *budget -= 1;
    }
    true
}

fn least_loaded(placement: &Placement<'_>, targets: &[usize]) -> usize {
    *targets
        .iter()
        .min_by(|&&a, &&b| {
            placement.ops[a].total_cmp(&placement.ops[b]).then(placement.bytes[a].total_cmp(&placement.bytes[b]))
        })
        .unwrap_or(&targets[0])
}

#[allow(clippy::too_many_arguments)]
fn balance(
    metric: BalanceMetric,
    policy: &Policy,
    now: u64,
    placement: &mut Placement<'_>,
    targets: &[usize],
    touched: &mut HashSet<RangeId>,
    budget: &mut usize,
    plan: &mut Plan,
) {
    let value = |p: &Placement<'_>, node: usize| match metric {
        BalanceMetric::Load => p.ops[node],
        BalanceMetric::Size => p.bytes[node],
    };
    let range_value = |r: &RangeView| match metric {
        BalanceMetric::Load => r.load.ops(),
        BalanceMetric::Size => r.size_bytes as f64,
    };
    let mean = targets.iter().map(|&n| value(placement, n)).sum::<f64>() / targets.len() as f64;
    if mean <= 0.0 {
        return;
    }
    // Each pass scans the ranges once; cooling candidates cost a pass each, so bound them.
    let mut passes_left = 16 + *budget;
    loop {
        if passes_left == 0 {
            return;
        }
        passes_left -= 1;
        let Some(&source) = targets.iter().max_by(|&&a, &&b| value(placement, a).total_cmp(&value(placement, b)))
        else {
            return;
        };
        let target =
            *targets.iter().min_by(|&&a, &&b| value(placement, a).total_cmp(&value(placement, b))).unwrap_or(&source);
        let (high, low) = (value(placement, source), value(placement, target));
        if metric == BalanceMetric::Size && high - mean < policy.min_size_imbalance_bytes as f64 {
            return;
        }
        if high <= mean * (1.0 + policy.balance_tolerance) || source == target {
            if metric == BalanceMetric::Load {
                plan.skipped.push(Skip::Balanced { max_over_mean: high / mean });
            }
            return;
        }
        if *budget == 0 {
            plan.skipped.push(Skip::MoveBudgetExhausted { wanted: 1 });
            return;
        }
        // The best range to move brings the two nodes closest together, and must lower the
        // busiest node by a real margin.
        let limit = high - policy.min_move_gain * mean;
        let mut best: Option<(usize, f64, bool)> = None;
        for (index, &(range, node)) in placement.ranges.iter().enumerate() {
            if node != source || touched.contains(&range.id) {
                continue;
            }
            if metric == BalanceMetric::Size && range.load.ops() > policy.merge_below_qps {
                continue;
            }
            let moved = range_value(range);
            let new_high = (high - moved).max(low + moved);
            if moved <= 0.0 || new_high > limit {
                continue;
            }
            let cooling = range.moved_at.is_some_and(|t| now < t + policy.move_cooldown_secs);
            if best.is_none_or(|(_, score, _)| new_high < score) {
                best = Some((index, new_high, cooling));
            }
        }
        let Some((index, _, cooling)) = best else {
            let node = placement.view.nodes.get(source).map_or_else(|| format!("node {source}"), |n| n.name.clone());
            plan.skipped.push(Skip::NoBeneficialMove { node, metric, value: high });
            return;
        };
        let (range, _) = placement.ranges[index];
        if cooling {
            let seconds_left = range.moved_at.map_or(0, |t| (t + policy.move_cooldown_secs).saturating_sub(now));
            plan.skipped.push(Skip::Cooldown { range: range.id, seconds_left });
            touched.insert(range.id);
            continue;
        }
        let reason = match metric {
            BalanceMetric::Load => MoveReason::BalanceLoad { from_load: high, to_load: low },
            BalanceMetric::Size => MoveReason::BalanceSize { from_bytes: high as u64, to_bytes: low as u64 },
        };
        plan.actions.push(Action::Move {
            range: range.id,
            from: NodeId(source as u32),
            to: NodeId(target as u32),
            reason,
        });
        placement.shift(index, target);
        touched.insert(range.id);
        *budget -= 1;
    }
}
