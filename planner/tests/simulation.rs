//! The planner against a simulated cluster: hotspots converge, uniform load stays put, a hot key
//! is isolated rather than split forever, nothing ping-pongs, drains empty a node, cold ranges
//! merge (but not right after a split), and every run is deterministic.

use std::collections::HashMap;

use kvfleet_planner::sim::Simulator;
use kvfleet_planner::{Action, NodeId, Planner, Policy, Skip, SplitReason};

fn policy() -> Policy {
    Policy { split_sustain_secs: 20, move_cooldown_secs: 120, ..Policy::default() }
}

fn zipf_cluster() -> Simulator {
    Simulator::new(4, &Simulator::zipf_shares(100_000, 0.99), 40_000.0)
}

#[test]
fn zipfian_hotspot_on_four_nodes_converges() {
    let mut sim = zipf_cluster();
    let mut planner = Planner::new(policy());
    let mut converged_at = None;
    for round in 1..=80 {
        sim.step(&mut planner);
        if sim.max_over_mean() <= 1.25 {
            converged_at = Some(round);
            break;
        }
    }
    let round = converged_at.unwrap_or_else(|| {
        panic!("not balanced after 80 rounds: max/mean {:.2}, loads {:?}", sim.max_over_mean(), sim.node_loads())
    });
    assert!(round <= 80);
    assert!(sim.ranges.len() > 4, "the hotspot had to be split");
}

#[test]
fn uniform_load_causes_no_action_at_all() {
    let shares = vec![1.0; 100_000];
    let mut sim = Simulator::new(4, &shares, 10_000.0);
    sim.spread_evenly(16);
    let mut planner = Planner::new(policy());
    for _ in 0..50 {
        let plan = sim.step(&mut planner);
        assert!(plan.actions.is_empty(), "uniform load planned {:?}", plan.actions);
        assert!(plan.skipped.iter().any(|s| matches!(s, Skip::Balanced { .. })));
    }
}

#[test]
fn a_single_hot_key_is_isolated_not_split_forever() {
    let mut shares = vec![1.0; 10_000];
    shares[5_000] = 90_000.0; // one key carries 90% of the load
    let mut sim = Simulator::new(4, &shares, 20_000.0);
    let mut planner = Planner::new(policy());
    let mut range_counts = Vec::new();
    let mut last_plan = None;
    for _ in 0..60 {
        last_plan = Some(sim.step(&mut planner));
        range_counts.push(sim.ranges.len());
    }
    let hot_key = kvfleet_planner::sim::record_key(5_000);
    let isolated = sim.ranges.iter().find(|r| r.start == hot_key).expect("a range starts at the hot key");
    let mut end = hot_key.clone();
    end.push(0);
    assert_eq!(isolated.end, end, "the hot key sits alone in [k, k\\0)");
    let plan = last_plan.unwrap();
    assert!(plan.skipped.iter().any(|s| matches!(s, Skip::SingleKeyRange { .. })), "{:?}", plan.skipped);
    assert!(plan.hot_keys.iter().any(|(_, k, _)| *k == hot_key));
    // The range count stops growing: no endless splitting.
    let tail = &range_counts[40..];
    assert!(tail.iter().all(|&n| n == tail[0]), "range count still changing: {tail:?}");
    assert!(range_counts.last().copied().unwrap_or(0) < 20);
}

#[test]
fn no_range_moves_again_within_its_cooldown() {
    let mut sim = zipf_cluster();
    let policy = policy();
    let mut planner = Planner::new(policy.clone());
    for _ in 0..150 {
        sim.step(&mut planner);
    }
    assert!(!sim.moves.is_empty());
    let mut last_move: HashMap<u64, u64> = HashMap::new();
    for record in &sim.moves {
        if let Some(previous) = last_move.insert(record.range, record.at) {
            assert!(
                record.at >= previous + policy.move_cooldown_secs,
                "range {} moved at {previous} and again at {}",
                record.range,
                record.at
            );
        }
    }
    // Once balanced, the fleet stays quiet: the last 30 rounds move nothing.
    let quiet_from = sim.now - 30 * sim.round_secs;
    assert!(sim.moves.iter().all(|m| m.at <= quiet_from), "still moving late: {:?}", sim.moves.last());
}

#[test]
fn draining_a_node_moves_every_range_off_it_within_the_budget() {
    let shares = vec![1.0; 10_000];
    let mut sim = Simulator::new(4, &shares, 4_000.0);
    sim.spread_evenly(12);
    sim.nodes[3].draining = true;
    sim.nodes[3].schedulable = false;
    let mut planner = Planner::new(policy());
    let first = sim.step(&mut planner);
    let drains = first.actions.iter().filter(|a| matches!(a, Action::Move { from: NodeId(3), .. })).count();
    assert_eq!(drains, 2, "max_concurrent_moves bounds each round");
    assert!(first.skipped.iter().any(|s| matches!(s, Skip::MoveBudgetExhausted { wanted: 1 })));
    sim.step(&mut planner);
    assert!(sim.ranges.iter().all(|r| r.owner != NodeId(3)), "node 3 still owns ranges");
}

#[test]
fn cold_neighbours_merge_but_not_right_after_a_split() {
    let shares = vec![1.0; 10_000];
    let mut sim = Simulator::new(2, &shares, 40_000.0);
    let policy = Policy { merge_delay_secs: 100, split_sustain_secs: 0, ..policy() };
    let mut planner = Planner::new(policy.clone());
    for _ in 0..10 {
        sim.step(&mut planner);
    }
    let after_splits = sim.ranges.len();
    assert!(after_splits > 4);
    // The load goes away: everything is cold and small now.
    sim.total_ops = 0.0;
    let cooled_at = sim.now;
    for _ in 0..100 {
        sim.step(&mut planner);
    }
    let merges: Vec<u64> =
        sim.actions.iter().filter(|(_, a)| matches!(a, Action::Merge { .. })).map(|(t, _)| *t).collect();
    assert!(!merges.is_empty(), "no merge happened");
    assert!(merges.iter().all(|&t| t >= cooled_at + policy.merge_delay_secs), "merged too early: {merges:?}");
    assert!(sim.ranges.len() < after_splits);
}

#[test]
fn every_split_of_a_hotspot_is_for_a_reason_and_runs_are_deterministic() {
    let run = || {
        let mut sim = zipf_cluster();
        let mut planner = Planner::new(policy());
        for _ in 0..40 {
            sim.step(&mut planner);
        }
        sim.actions
    };
    let (first, second) = (run(), run());
    assert_eq!(first, second);
    for (_, action) in &first {
        if let Action::Split { reason: SplitReason::Load { left_share, .. }, .. } = action {
            assert!((0.3..=0.7).contains(left_share), "skewed load split accepted: {left_share}");
        }
    }
}

#[test]
fn size_differences_below_the_floor_move_nothing_and_above_it_do() {
    use kvfleet_planner::sim::range_view;
    use kvfleet_planner::{ClusterView, MoveReason, NodeView};
    let node = |id: u32| NodeView {
        id: NodeId(id),
        name: format!("n{}", id + 1),
        schedulable: true,
        draining: false,
        restarting: false,
        departed: false,
    };
    let cold_ranges = |sizes: &[u64]| {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let start = if i == 0 { Vec::new() } else { vec![b'a' + i as u8] };
                let end = if i + 1 == sizes.len() { Vec::new() } else { vec![b'a' + i as u8 + 1] };
                // Every range on node 0, idle.
                let mut range = range_view(i as u64 + 1, &start, &end, 0);
                range.size_bytes = size;
                range
            })
            .collect::<Vec<_>>()
    };
    let view =
        |sizes: &[u64]| ClusterView { nodes: vec![node(0), node(1)], ranges: cold_ranges(sizes), in_flight: vec![] };
    let policy = Policy { merge_delay_secs: 1_000_000, ..policy() };
    // A few kilobytes of difference (what an idle playground holds): no reason to move.
    let plan = Planner::new(policy.clone()).plan(&view(&[20_000, 30_000, 10_000]), 10);
    assert!(plan.actions.is_empty(), "moved kilobytes around: {:?}", plan.actions);
    // Gigabytes on one node: size balancing moves a range.
    let gib = 1 << 30;
    let plan = Planner::new(policy).plan(&view(&[gib, gib, gib]), 10);
    assert!(
        plan.actions.iter().any(|a| matches!(a, Action::Move { reason: MoveReason::BalanceSize { .. }, .. })),
        "{:?}",
        plan.actions
    );
}
