//! Planning time at scale: 1,000 nodes and 100,000 ranges with skewed load, one round.
//! `cargo bench -p kvfleet-planner --bench plan_scale`; the target is under one second.

use criterion::{Criterion, criterion_group, criterion_main};
use kvfleet_planner::sim::range_view;
use kvfleet_planner::{ClusterView, Load, NodeId, NodeView, Planner, Policy};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn cluster(nodes: u32, ranges: u64) -> ClusterView {
    let mut rng = SmallRng::seed_from_u64(7);
    let zipf = rand_distr::Zipf::new(nodes as f64, 1.1).expect("valid zipf");
    let ranges = (0..ranges)
        .map(|i| {
            let start = if i == 0 { Vec::new() } else { (i * 1000).to_be_bytes().to_vec() };
            let end = if i + 1 == ranges { Vec::new() } else { ((i + 1) * 1000).to_be_bytes().to_vec() };
            let owner = (rng.sample(zipf) as u32 - 1).min(nodes - 1);
            let mut range = range_view(i + 1, &start, &end, owner);
            range.load =
                Load { reads: rng.random_range(0.0..3000.0), writes: rng.random_range(0.0..500.0), ..Load::default() };
            range.size_bytes = rng.random_range(0..300 << 20);
            range.samples = (0..16).map(|j| ((i * 1000 + j * 60).to_be_bytes().to_vec(), 10.0)).collect();
            range.hot_keys = vec![((i * 1000 + 1).to_be_bytes().to_vec(), 50.0)];
            range
        })
        .collect();
    let nodes = (0..nodes)
        .map(|i| NodeView {
            id: NodeId(i),
            name: format!("n{}", i + 1),
            schedulable: true,
            draining: false,
            restarting: false,
            departed: false,
        })
        .collect();
    ClusterView { nodes, ranges, in_flight: Vec::new() }
}

fn plan_scale(c: &mut Criterion) {
    let view = cluster(1_000, 100_000);
    let policy = Policy { split_sustain_secs: 0, ..Policy::default() };
    let mut group = c.benchmark_group("plan");
    group.sample_size(10);
    group.bench_function("1000_nodes_100000_ranges", |b| {
        b.iter(|| {
            let mut planner = Planner::new(policy.clone());
            planner.plan(&view, 1_000)
        })
    });
    group.finish();
}

criterion_group!(benches, plan_scale);
criterion_main!(benches);
