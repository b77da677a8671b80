//! Moves: drain nodes being removed, then even out load (ops/s) across nodes, then size (with
//! cold ranges only, so size moves never undo load balance). A tolerance band, a minimum gain
//! per move and a per-range cooldown keep ranges from ping-ponging; `max_concurrent_moves`
//! bounds the work in flight.

use std::collections::HashSet;

use crate::Policy;
use crate::model::*;

/// Where each range will be once in-flight moves land, and each node's totals from that. A
/// range's load counts on its owner (the leader serves it); its size on every node holding a copy.
struct Placement<'a> {
    view: &'a ClusterView,
    ranges: Vec<Placed<'a>>,
    ops: Vec<f64>,
    bytes: Vec<f64>,
    /// Replicas of replicated ranges held.
    replicas: Vec<usize>,
}

struct Placed<'a> {
    range: &'a RangeView,
    owner: usize,
    holders: Vec<usize>,
    /// Reads other replicas serve, by node (`RangeView::follower_reads`).
    follower_ops: Vec<(usize, f64)>,
}

impl<'a> Placement<'a> {
    fn new(view: &'a ClusterView) -> Self {
        let nodes = view.nodes.len();
        let mut placement = Placement {
            view,
            ranges: Vec::new(),
            ops: vec![0.0; nodes],
            bytes: vec![0.0; nodes],
            replicas: vec![0; nodes],
        };
        for range in &view.ranges {
            let mut placed = Placed {
                range,
                owner: range.owner.0 as usize,
                holders: range.holders().iter().map(|n| n.0 as usize).collect(),
                follower_ops: range.follower_reads.iter().map(|(n, ops)| (n.0 as usize, *ops)).collect(),
            };
            for action in &view.in_flight {
                match action {
                    Action::Move { range: id, from, to, .. } if *id == range.id => {
                        placed.replace(from.0 as usize, to.0 as usize);
                    }
                    Action::TransferLeader { range: id, to, .. } if *id == range.id => placed.owner = to.0 as usize,
                    _ => {}
                }
            }
            if placed.owner >= nodes
                || placed.holders.iter().chain(placed.follower_ops.iter().map(|(n, _)| n)).any(|&h| h >= nodes)
            {
                continue;
            }
            placement.ops[placed.owner] += range.owner_ops();
            for &(node, ops) in &placed.follower_ops {
                placement.ops[node] += ops;
            }
            for &holder in &placed.holders {
                placement.bytes[holder] += range.size_bytes as f64;
                placement.replicas[holder] += usize::from(range.is_replicated());
            }
            placement.ranges.push(placed);
        }
        placement
    }

    /// The copy on `from` moves to `to`, with what it serves (all the owner serves, if it owns).
    fn move_copy(&mut self, index: usize, from: usize, to: usize) {
        let placed = &mut self.ranges[index];
        let size = placed.range.size_bytes as f64;
        let mut ops: f64 = placed.follower_ops.iter().filter(|(n, _)| *n == from).map(|(_, ops)| ops).sum();
        if placed.owner == from {
            ops += placed.range.owner_ops();
        }
        self.ops[from] -= ops;
        self.ops[to] += ops;
        self.bytes[from] -= size;
        self.bytes[to] += size;
        if placed.range.is_replicated() {
            self.replicas[from] = self.replicas[from].saturating_sub(1);
            self.replicas[to] += 1;
        }
        placed.replace(from, to);
    }

    /// Only the serving moves, to a node that holds a copy already (reads other replicas serve
    /// stay where they are).
    fn move_leader(&mut self, index: usize, to: usize) {
        let placed = &mut self.ranges[index];
        let ops = placed.range.owner_ops();
        self.ops[placed.owner] -= ops;
        self.ops[to] += ops;
        placed.owner = to;
    }
}

impl Placed<'_> {
    /// A replicated range with a replica on a node that does not answer, that lost its copy or
    /// that left the fleet: no voluntary move (its membership change would need the replicas
    /// left to agree, one more failure from unavailable).
    fn short_of_replicas(&self, view: &ClusterView) -> bool {
        let down = |n: &NodeView| n.departed || (!n.schedulable && !n.draining);
        self.range.is_replicated()
            && (!self.range.lost.is_empty() || self.holders.iter().any(|&h| view.nodes.get(h).is_some_and(down)))
    }

    fn replace(&mut self, from: usize, to: usize) {
        for holder in self.holders.iter_mut().chain(self.follower_ops.iter_mut().map(|(n, _)| n)) {
            if *holder == from {
                *holder = to;
            }
        }
        if self.owner == from {
            self.owner = to;
        }
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
    if !replace_lost(view, &mut placement, &targets, touched, budget, plan) {
        return;
    }
    if !drain(view, &mut placement, &targets, touched, budget, plan) {
        return;
    }
    let total_ops: f64 = targets.iter().map(|&n| placement.ops[n]).sum();
    if total_ops >= policy.min_balance_qps {
        balance(BalanceMetric::Load, policy, now, &mut placement, &targets, touched, budget, plan);
    }
    balance_replica_counts(policy, now, &mut placement, &targets, touched, budget, plan);
    balance(BalanceMetric::Size, policy, now, &mut placement, &targets, touched, budget, plan);
}

/// Evens out how many replicas of replicated ranges each node holds (TiKV PD's region count
/// balance): a node that joins receives copies even before size or load tell, so that leaders can
/// then be handed to it. Moves a follower's copy where it can (no leadership moves), the smallest
/// first; never more than one copy above or below the mean.
fn balance_replica_counts(
    policy: &Policy,
    now: u64,
    placement: &mut Placement<'_>,
    targets: &[usize],
    touched: &mut HashSet<RangeId>,
    budget: &mut usize,
    plan: &mut Plan,
) {
    if !placement.ranges.iter().any(|p| p.range.is_replicated()) {
        return;
    }
    for _ in 0..placement.ranges.len().min(64) {
        let counts: Vec<(usize, usize)> = targets.iter().map(|&n| (n, placement.replicas[n])).collect();
        let (Some(&(source, high)), Some(&(target, low))) = (
            counts.iter().max_by_key(|(n, c)| (*c, std::cmp::Reverse(*n))),
            counts.iter().min_by_key(|(n, c)| (*c, *n)),
        ) else {
            return;
        };
        if high <= low + 1 {
            return;
        }
        if *budget == 0 {
            plan.skipped.push(Skip::MoveBudgetExhausted { wanted: 1 });
            return;
        }
        let candidate = placement
            .ranges
            .iter()
            .enumerate()
            .filter(|(_, p)| p.range.is_replicated() && p.holders.contains(&source) && !p.holders.contains(&target))
            .filter(|(_, p)| !touched.contains(&p.range.id) && !p.short_of_replicas(placement.view))
            .filter(|(_, p)| p.range.moved_at.is_none_or(|t| now >= t + policy.move_cooldown_secs))
            .min_by_key(|(_, p)| (p.owner == source, p.range.size_bytes))
            .map(|(index, p)| (index, p.range.id));
        let Some((index, range)) = candidate else {
            let node = placement.view.nodes.get(source).map_or_else(|| format!("node {source}"), |n| n.name.clone());
            plan.skipped.push(Skip::NoBeneficialMove { node, metric: BalanceMetric::Replicas, value: high as f64 });
            return;
        };
        let reason = MoveReason::BalanceReplicas { from_count: high, to_count: low };
        plan.actions.push(Action::Move { range, from: NodeId(source as u32), to: NodeId(target as u32), reason });
        placement.move_copy(index, source, target);
        touched.insert(range);
        *budget -= 1;
    }
}

/// Moves every copy off draining nodes (one per range per round: a range's copies move one at a
/// time); off a node draining only to restart, a replicated range moves its leadership instead.
/// Returns false if the budget ran out.
fn drain(
    view: &ClusterView,
    placement: &mut Placement<'_>,
    targets: &[usize],
    touched: &mut HashSet<RangeId>,
    budget: &mut usize,
    plan: &mut Plan,
) -> bool {
    let work: Vec<(usize, Drain)> = (0..placement.ranges.len())
        .filter(|&i| !touched.contains(&placement.ranges[i].range.id))
        .filter_map(|i| drain_of(view, &placement.ranges[i]).map(|d| (i, d)))
        .collect();
    for (done, &(index, drain)) in work.iter().enumerate() {
        let placed = &placement.ranges[index];
        let range = placed.range;
        let (from, free): (usize, Vec<usize>) = match drain {
            Drain::Copy(from) => (from, targets.iter().copied().filter(|t| !placed.holders.contains(t)).collect()),
            Drain::Leadership(from) => (from, targets.iter().copied().filter(|t| placed.holders.contains(t)).collect()),
        };
        if free.is_empty() {
            let node = view.nodes[from].name.clone();
            plan.skipped.push(match drain {
                Drain::Copy(_) => Skip::NoNodeForReplica { range: range.id, node },
                Drain::Leadership(_) => Skip::NoNodeForLeader { range: range.id, node },
            });
            continue;
        }
        if *budget == 0 {
            plan.skipped.push(Skip::MoveBudgetExhausted { wanted: work.len() - done });
            return false;
        }
        let to = least_loaded(placement, &free);
        let reason = if view.nodes[from].departed { MoveReason::LeftFleet } else { MoveReason::Drain };
        let (from_node, to_node) = (NodeId(from as u32), NodeId(to as u32));
        match drain {
            Drain::Copy(_) => {
                plan.actions.push(Action::Move { range: range.id, from: from_node, to: to_node, reason });
                placement.move_copy(index, from, to);
            }
            Drain::Leadership(_) => {
                plan.actions.push(Action::TransferLeader { range: range.id, from: from_node, to: to_node, reason });
                placement.move_leader(index, to);
            }
        }
        touched.insert(range.id);
        *budget -= 1;
    }
    true
}

/// Re-creates replicas that lost their copy (before anything else: the range is a voter short):
/// on the least loaded node holding none, or on the same node if every node holds one. Returns
/// false if the budget ran out.
fn replace_lost(
    view: &ClusterView,
    placement: &mut Placement<'_>,
    targets: &[usize],
    touched: &mut HashSet<RangeId>,
    budget: &mut usize,
    plan: &mut Plan,
) -> bool {
    // (range index, the node whose replica is lost; None: a voter is missing altogether).
    let work: Vec<(usize, Option<usize>)> = (0..placement.ranges.len())
        .filter(|&i| !touched.contains(&placement.ranges[i].range.id))
        .filter_map(|i| {
            let range = placement.ranges[i].range;
            match range.lost.first() {
                Some(lost) => Some((i, Some(lost.0 as usize))),
                None => (range.missing_voters > 0).then_some((i, None)),
            }
        })
        .filter(|&(_, lost)| lost.is_none_or(|n| n < view.nodes.len()))
        .collect();
    for (done, &(index, lost)) in work.iter().enumerate() {
        if *budget == 0 {
            plan.skipped.push(Skip::MoveBudgetExhausted { wanted: work.len() - done });
            return false;
        }
        let placed = &placement.ranges[index];
        let range = placed.range.id;
        let free: Vec<usize> = targets.iter().copied().filter(|t| !placed.holders.contains(t)).collect();
        // A node restarting (a DrainFirst update) still takes back its own lost replica.
        let own_node_takes_it = |n: usize| targets.contains(&n) || view.nodes[n].restarting;
        let (lost, to) = match (lost, free.is_empty()) {
            (Some(lost), false) => (lost, least_loaded(placement, &free)),
            (Some(lost), true) if own_node_takes_it(lost) => (lost, lost),
            (None, false) => {
                // A new voter: re-created "on its own node", which holds none yet.
                let to = least_loaded(placement, &free);
                (to, to)
            }
            (Some(lost), true) => {
                plan.skipped.push(Skip::NoNodeForReplica { range, node: view.nodes[lost].name.clone() });
                continue;
            }
            (None, true) => {
                plan.skipped.push(Skip::NoTargetNode);
                continue;
            }
        };
        plan.actions.push(Action::Move {
            range,
            from: NodeId(lost as u32),
            to: NodeId(to as u32),
            reason: MoveReason::ReplaceLost,
        });
        if to != lost {
            placement.move_copy(index, lost, to);
        }
        touched.insert(range);
        *budget -= 1;
    }
    true
}

/// What a drain must do for one range.
#[derive(Debug, Clone, Copy)]
enum Drain {
    /// Move the copy on this draining node to a node without one.
    Copy(usize),
    /// Hand the leadership on this restarting node to another replica.
    Leadership(usize),
}

fn drain_of(view: &ClusterView, placed: &Placed<'_>) -> Option<Drain> {
    let mut leadership = None;
    for &holder in placed.holders.iter().filter(|&&h| view.nodes[h].draining) {
        if !(placed.range.is_replicated() && view.nodes[holder].restarting) {
            return Some(Drain::Copy(holder));
        }
        if placed.owner == holder {
            leadership = Some(Drain::Leadership(holder));
        }
    }
    leadership
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
        // `balance_replica_counts` evens out replica counts; here Replicas is never asked.
        BalanceMetric::Size | BalanceMetric::Replicas => p.bytes[node],
    };
    let range_value = |r: &RangeView| match metric {
        // What moves with the leadership (or the owner's copy): not other replicas' reads.
        BalanceMetric::Load => r.owner_ops(),
        BalanceMetric::Size | BalanceMetric::Replicas => r.size_bytes as f64,
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
        let high = value(placement, source);
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
        // busiest node by a real margin. By load, a replicated range's serving moves to the least
        // busy node already holding a copy (a leader transfer); by size, a copy moves to the
        // smallest node not holding one.
        let limit = high - policy.min_move_gain * mean;
        let mut best: Option<(usize, usize, f64, bool)> = None;
        for (index, placed) in placement.ranges.iter().enumerate() {
            let range = placed.range;
            let on_source = match metric {
                BalanceMetric::Load => placed.owner == source,
                BalanceMetric::Size | BalanceMetric::Replicas => placed.holders.contains(&source),
            };
            if !on_source || touched.contains(&range.id) || placed.short_of_replicas(placement.view) {
                continue;
            }
            if metric == BalanceMetric::Size && range.load.ops() > policy.merge_below_qps {
                continue;
            }
            let to = match metric {
                BalanceMetric::Load if range.is_replicated() => placed
                    .holders
                    .iter()
                    .copied()
                    .filter(|h| *h != source && targets.contains(h))
                    .min_by(|&a, &b| value(placement, a).total_cmp(&value(placement, b))),
                _ if placed.holders.contains(&target) => None,
                _ => Some(target),
            };
            let Some(to) = to else { continue };
            let moved = range_value(range);
            let new_high = (high - moved).max(value(placement, to) + moved);
            if moved <= 0.0 || new_high > limit {
                continue;
            }
            let cooling = range.moved_at.is_some_and(|t| now < t + policy.move_cooldown_secs);
            if best.is_none_or(|(_, _, score, _)| new_high < score) {
                best = Some((index, to, new_high, cooling));
            }
        }
        let Some((index, to, _, cooling)) = best else {
            let node = placement.view.nodes.get(source).map_or_else(|| format!("node {source}"), |n| n.name.clone());
            plan.skipped.push(Skip::NoBeneficialMove { node, metric, value: high });
            return;
        };
        let range = placement.ranges[index].range;
        if cooling {
            let seconds_left = range.moved_at.map_or(0, |t| (t + policy.move_cooldown_secs).saturating_sub(now));
            plan.skipped.push(Skip::Cooldown { range: range.id, seconds_left });
            touched.insert(range.id);
            continue;
        }
        let low = value(placement, to);
        let reason = match metric {
            BalanceMetric::Load => MoveReason::BalanceLoad { from_load: high, to_load: low },
            BalanceMetric::Size | BalanceMetric::Replicas => {
                MoveReason::BalanceSize { from_bytes: high as u64, to_bytes: low as u64 }
            }
        };
        let (from, to_node) = (NodeId(source as u32), NodeId(to as u32));
        if metric == BalanceMetric::Load && range.is_replicated() {
            plan.actions.push(Action::TransferLeader { range: range.id, from, to: to_node, reason });
            placement.move_leader(index, to);
        } else {
            plan.actions.push(Action::Move { range: range.id, from, to: to_node, reason });
            placement.move_copy(index, source, to);
        }
        touched.insert(range.id);
        *budget -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::range_view;

    fn nodes(count: usize, draining: &[usize]) -> Vec<NodeView> {
        (0..count)
            .map(|i| NodeView {
                id: NodeId(i as u32),
                name: format!("n{i}"),
                schedulable: !draining.contains(&i),
                draining: draining.contains(&i),
                restarting: false,
                departed: false,
            })
            .collect()
    }

    fn replicated(id: RangeId, span: (u8, u8), leader: u32, replicas: &[u32], ops: f64) -> RangeView {
        let end = if span.1 == 0 { Vec::new() } else { vec![span.1] };
        let mut range = range_view(id, &[span.0], &end, leader);
        range.replicas = replicas.iter().map(|&n| NodeId(n)).collect();
        range.load.writes = ops;
        range.size_bytes = 1 << 20;
        range
    }

    fn plan(view: &ClusterView) -> Plan {
        let policy = Policy { max_concurrent_moves: 8, ..Policy::default() };
        let mut plan = Plan::default();
        plan_moves(view, &policy, 1_000_000, &mut HashSet::new(), &mut policy.max_concurrent_moves.clone(), &mut plan);
        plan
    }

    #[test]
    fn a_draining_node_s_replicas_move_to_nodes_without_one() {
        // n3 drains; range 1 has replicas on n0, n1, n3 (n3 leads), range 2 on n0, n1, n2.
        let view = ClusterView {
            nodes: nodes(5, &[3]),
            ranges: vec![replicated(1, (0, 9), 3, &[0, 1, 3], 10.0), replicated(2, (9, 0), 0, &[0, 1, 2], 10.0)],
            in_flight: Vec::new(),
        };
        let plan = plan(&view);
        let moves: Vec<&Action> = plan.actions.iter().filter(|a| a.ranges() == vec![1]).collect();
        match moves.as_slice() {
            [Action::Move { from, to, reason: MoveReason::Drain, .. }] => {
                assert_eq!(*from, NodeId(3));
                assert!([NodeId(2), NodeId(4)].contains(to), "to a node holding no replica, got {to:?}");
            }
            other => panic!("expected one drain move of range 1, got {other:?}"),
        }
        assert!(!plan.actions.iter().any(|a| a.ranges() == vec![2] && matches!(a, Action::Move { .. })));
    }

    #[test]
    fn a_replica_with_nowhere_to_go_is_a_reasoned_skip() {
        // Three replicas on three nodes, one draining: no fourth node to take the copy.
        let view = ClusterView {
            nodes: nodes(3, &[2]),
            ranges: vec![replicated(1, (0, 0), 0, &[0, 1, 2], 10.0)],
            in_flight: Vec::new(),
        };
        let plan = plan(&view);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert!(plan.skipped.contains(&Skip::NoNodeForReplica { range: 1, node: "n2".into() }), "{:?}", plan.skipped);
        assert!(plan.skipped.iter().any(|s| s.to_string().contains("every schedulable node holds one")));
    }

    #[test]
    fn load_follows_leadership_to_nodes_holding_a_replica() {
        // Every range on every node, all led by n0: balancing hands leaders over, moves no copy.
        let ranges =
            (0..6u8).map(|i| replicated(u64::from(i) + 1, (i * 10, i * 10 + 10), 0, &[0, 1, 2], 500.0)).collect();
        let view = ClusterView { nodes: nodes(3, &[]), ranges, in_flight: Vec::new() };
        let plan = plan(&view);
        let transfers: Vec<(NodeId, NodeId)> = plan
            .actions
            .iter()
            .map(|a| match a {
                Action::TransferLeader { from, to, .. } => (*from, *to),
                other => panic!("only leader transfers expected, got {other:?}"),
            })
            .collect();
        assert_eq!(transfers.len(), 4, "two leaders to each of n1 and n2: {transfers:?}");
        for to in [NodeId(1), NodeId(2)] {
            assert_eq!(transfers.iter().filter(|(from, t)| *from == NodeId(0) && *t == to).count(), 2);
        }
    }

    #[test]
    fn size_moves_a_copy_only_to_a_node_without_one() {
        // n3 holds nothing; the cold ranges' copies are on n0..n2: copies move to n3 only (by
        // replica count first, then by size).
        let policy = Policy { max_concurrent_moves: 8, min_size_imbalance_bytes: 1, ..Policy::default() };
        let ranges =
            (0..4u8).map(|i| replicated(u64::from(i) + 1, (i * 10, i * 10 + 10), 0, &[0, 1, 2], 0.0)).collect();
        let view = ClusterView { nodes: nodes(4, &[]), ranges, in_flight: Vec::new() };
        let mut plan = Plan::default();
        plan_moves(&view, &policy, 1_000_000, &mut HashSet::new(), &mut 8, &mut plan);
        assert!(!plan.actions.is_empty(), "{:?}", plan.skipped);
        for action in &plan.actions {
            match action {
                Action::Move {
                    to,
                    reason: MoveReason::BalanceSize { .. } | MoveReason::BalanceReplicas { .. },
                    ..
                } => {
                    assert_eq!(*to, NodeId(3))
                }
                other => panic!("expected copies to move to n3, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_node_drained_to_restart_hands_over_its_leaderships_and_keeps_its_replicas() {
        // n2 restarts (a DrainFirst update): it leads range 1 and follows range 2; range 3 is a
        // single copy on it.
        let mut nodes = nodes(3, &[2]);
        nodes[2].restarting = true;
        let mut single = range_view(3, &[20], &[], 2);
        single.size_bytes = 1 << 20;
        let view = ClusterView {
            nodes,
            ranges: vec![
                replicated(1, (0, 10), 2, &[0, 1, 2], 10.0),
                replicated(2, (10, 20), 0, &[0, 1, 2], 10.0),
                single,
            ],
            in_flight: Vec::new(),
        };
        let plan = plan(&view);
        let drains: Vec<&Action> = plan
            .actions
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Move { reason: MoveReason::Drain, .. }
                        | Action::TransferLeader { reason: MoveReason::Drain, .. }
                )
            })
            .collect();
        assert_eq!(drains.len(), 2, "{:?}", plan.actions);
        assert!(
            drains
                .iter()
                .any(|a| matches!(a, Action::TransferLeader { range: 1, from: NodeId(2), to, .. } if *to != NodeId(2))),
            "range 1's leadership leaves n2: {drains:?}"
        );
        assert!(
            drains.iter().any(|a| matches!(a, Action::Move { range: 3, from: NodeId(2), .. })),
            "the single copy moves off: {drains:?}"
        );
        assert!(!plan.actions.iter().any(|a| a.ranges() == vec![2]), "range 2 keeps its replica on n2");
    }

    #[test]
    fn a_new_node_receives_replicas_until_counts_are_within_one() {
        // Six ranges on n0..n2, n3 just joined: copies move to n3, followers' copies first.
        let ranges = (0..6u8)
            .map(|i| replicated(u64::from(i) + 1, (i * 10, i * 10 + 10), u32::from(i % 3), &[0, 1, 2], 1.0))
            .collect();
        let view = ClusterView { nodes: nodes(4, &[]), ranges, in_flight: Vec::new() };
        let plan = plan(&view);
        let moves: Vec<(RangeId, NodeId, NodeId)> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Move { range, from, to, reason: MoveReason::BalanceReplicas { .. } } => {
                    Some((*range, *from, *to))
                }
                _ => None,
            })
            .collect();
        // 18 copies over 4 nodes: n3 ends with 4 or 5, every other node within one of it.
        assert!((4..=5).contains(&moves.len()), "{moves:?}");
        assert!(moves.iter().all(|(_, _, to)| *to == NodeId(3)), "{moves:?}");
        for (range, from, _) in &moves {
            let leader = view.ranges.iter().find(|r| r.id == *range).map(|r| r.owner);
            assert_ne!(leader, Some(*from), "a follower's copy moves, not the leader's: {moves:?}");
        }
    }

    #[test]
    fn reads_served_by_followers_count_on_their_nodes_not_the_leader_s() {
        // n0 leads every range, but followers serve most reads (stale reads of hot keys): n0
        // carries 100 ops/s per range, n1 and n2 200 each. Handing leaders over would not help.
        let ranges: Vec<RangeView> = (0..6u8)
            .map(|i| {
                let mut range = replicated(u64::from(i) + 1, (i * 10, i * 10 + 10), 0, &[0, 1, 2], 0.0);
                range.load.reads = 500.0;
                range.follower_reads = vec![(NodeId(1), 200.0), (NodeId(2), 200.0)];
                range
            })
            .collect();
        let view = ClusterView { nodes: nodes(3, &[]), ranges, in_flight: Vec::new() };
        let plan = plan(&view);
        assert!(!plan.actions.iter().any(|a| matches!(a, Action::TransferLeader { .. })), "{:?}", plan.actions);
        // Counted on the leader alone, the same load would move leaders away from n0.
        let mut on_leader = view.clone();
        on_leader.ranges.iter_mut().for_each(|r| r.follower_reads.clear());
        let plan = super::tests::plan(&on_leader);
        assert!(
            plan.actions.iter().any(|a| matches!(a, Action::TransferLeader { from: NodeId(0), .. })),
            "{:?}",
            plan.actions
        );
    }

    #[test]
    fn a_range_short_of_voters_gets_one_on_a_node_holding_none() {
        // Range 1 has two voters (a re-creation was cut off after removing the third).
        let mut range = replicated(1, (0, 0), 0, &[0, 1], 10.0);
        range.missing_voters = 1;
        let view = ClusterView { nodes: nodes(3, &[]), ranges: vec![range], in_flight: Vec::new() };
        let plan = plan(&view);
        assert_eq!(
            plan.actions,
            vec![Action::Move { range: 1, from: NodeId(2), to: NodeId(2), reason: MoveReason::ReplaceLost }]
        );
    }

    #[test]
    fn a_replica_that_lost_its_copy_is_recreated_elsewhere_or_on_its_own_node() {
        // Range 1's replica on n2 lost its copy. With a fourth node, the copy goes there.
        let mut range = replicated(1, (0, 0), 0, &[0, 1, 2], 10.0);
        range.lost = vec![NodeId(2)];
        let view = ClusterView { nodes: nodes(4, &[]), ranges: vec![range.clone()], in_flight: Vec::new() };
        let plan = plan(&view);
        assert_eq!(
            plan.actions.first(),
            Some(&Action::Move { range: 1, from: NodeId(2), to: NodeId(3), reason: MoveReason::ReplaceLost }),
            "{:?}",
            plan.actions
        );
        // Every node holds one: re-created on n2 itself.
        let view = ClusterView { nodes: nodes(3, &[]), ranges: vec![range], in_flight: Vec::new() };
        let plan = super::tests::plan(&view);
        assert_eq!(
            plan.actions,
            vec![Action::Move { range: 1, from: NodeId(2), to: NodeId(2), reason: MoveReason::ReplaceLost }]
        );
    }

    #[test]
    fn a_voter_on_a_node_that_left_the_fleet_is_recreated_on_a_member_once() {
        // n3 left the fleet (a StatefulSet shrunk by hand) holding range 1's third voter; n2
        // holds no replica of range 1. Range 2 is on n0..n2 and carries all the load.
        let mut view_nodes = nodes(4, &[]);
        view_nodes[3] = NodeView { schedulable: false, draining: false, departed: true, ..view_nodes[3].clone() };
        let ranges = vec![replicated(1, (0, 10), 0, &[0, 1, 3], 1.0), replicated(2, (10, 0), 0, &[0, 1, 2], 900.0)];
        let mut view = ClusterView { nodes: view_nodes, ranges, in_flight: Vec::new() };
        // Not drained yet (the loop waits a few rounds): range 1 is only left alone.
        let plan = super::tests::plan(&view);
        assert!(plan.actions.iter().all(|a| !a.ranges().contains(&1)), "{:?}", plan.actions);
        view.nodes[3].draining = true;
        let plan = super::tests::plan(&view);
        let on_range_1: Vec<&Action> = plan.actions.iter().filter(|a| a.ranges().contains(&1)).collect();
        assert_eq!(
            on_range_1,
            vec![&Action::Move { range: 1, from: NodeId(3), to: NodeId(2), reason: MoveReason::LeftFleet }],
            "{:?}",
            plan.actions
        );
        assert!(plan.actions.iter().all(|a| !matches!(a, Action::Move { to: NodeId(3), .. })), "{:?}", plan.actions);
        // While that move runs, range 1 is left alone, and nothing lands on n3.
        let in_flight = vec![on_range_1[0].clone()];
        let view = ClusterView { in_flight, ..view };
        let plan = super::tests::plan(&view);
        assert!(plan.actions.iter().all(|a| !a.ranges().contains(&1)), "{:?}", plan.actions);
        assert!(plan.actions.iter().all(|a| !matches!(a, Action::Move { to: NodeId(3), .. })), "{:?}", plan.actions);
    }
}
