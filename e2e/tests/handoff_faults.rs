//! The handoff under fire. A move of range R (and, apart, a split and a merge of it) under a
//! read/write load is interrupted at each step: the controller dies after the step, or the node
//! taking the step dies at its crash point (and restarts, as a platform would restart it). In
//! the gap, before anything recovers, the test does what a user or another component could do
//! meanwhile: nothing, split R's keys, merge them with a neighbour, move them on to a third
//! node, or kill -9 and restart the nodes; every crash point is crossed with each of these. Then the controller's real recovery runs against the real
//! nodes. Every case checks the invariants: exactly one owner per key, every acknowledged write
//! reads back, and no read (during the whole run) returned a value older than one already
//! acknowledged when it began.
//!
//! Layout of every case: n1 owns A = ["", "k") and R = ["k", "t"); n2 owns B = ["t", +inf), so
//! R has a neighbour on each side of the move; n3 starts empty.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_e2e::history::HistoryWorkload;
use kvfleet_e2e::{NodeProcess, TestPlatform, assert_one_owner_per_key, client_for, owned_and_importing};
use kvfleet_planner::Policy;
use kvfleet_proto::v1::*;
use kvfleet_resharding::moves::{MoveTimeouts, drive};
use kvfleet_resharding::observe::NodeClients;
use kvfleet_resharding::platform::Member;
use kvfleet_resharding::resharding_loop::{LoopConfig, ReshardingLoop};
use kvfleet_resharding::state::{InFlightMove, ReshardingState};
use kvfleet_resharding::status::StatusBoard;

const R: u64 = 4;
const INSIDE_R: &str = "p";
const MOVE_ID: u64 = 100;
const FOREIGN_MOVE_ID: u64 = 200;

/// Where the run is interrupted.
#[derive(Debug, Clone, Copy)]
enum Crash {
    /// The controller dies right after this many steps of the move of R from n1 to n2
    /// (1 import, 2 freeze, 3 complete).
    ControllerAfterStep(usize),
    /// The move's source (n1) or target (n2) dies at this crash point, then restarts.
    MoveNode(&'static str),
    /// n1 dies at this crash point while splitting R, then restarts.
    Split(&'static str),
    /// n1 dies at this crash point while merging A and R, then restarts.
    Merge(&'static str),
}

/// What happens in the gap, before the controller recovers.
#[derive(Debug, Clone, Copy)]
enum Meanwhile {
    Nothing,
    /// Whoever owns R's keys (active) splits them.
    Split,
    /// Whoever owns R's keys (active) merges them with a neighbour on the same node.
    Merge,
    /// Whoever owns R's keys (active) moves them on to another node (a second mover).
    MoveOn,
    /// kill -9 and restart n1 and n2.
    Restart,
}

fn member(node: &NodeProcess) -> Member {
    Member::at(&node.node_id, &node.address)
}

fn replica(node: &NodeProcess) -> Replica {
    Replica {
        node_id: node.node_id.clone(),
        address: node.address.clone(),
        role: ReplicaRole::Leader as i32,
        raft_id: 0,
        behind_entries: None,
        membership: 0,
    }
}

async fn owned(node: &NodeProcess) -> Vec<RangeDescriptor> {
    node.admin().list_ranges(ListRangesRequest {}).await.map(|r| r.into_inner().ranges).unwrap_or_default()
}

fn timeouts() -> MoveTimeouts {
    MoveTimeouts { import: Duration::from_secs(60), step: Duration::from_secs(10) }
}

/// A whole move, as the controller's move task drives it.
async fn move_range(
    nodes: &[NodeProcess],
    move_id: u64,
    desc: &RangeDescriptor,
    from: usize,
    to: usize,
) -> Result<(), String> {
    let mv = InFlightMove {
        move_id,
        range_id: desc.range_id,
        generation: desc.generation,
        from: nodes[from].node_id.clone(),
        to: nodes[to].node_id.clone(),
        reason: "test".into(),
        started_unix_ms: 0,
        replica: false,
    };
    drive(NodeClients::default(), mv, desc.clone(), member(&nodes[from]), member(&nodes[to]), timeouts())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The active range holding `key`, and the index of the node that owns it.
async fn active_owner_of(nodes: &[NodeProcess], key: &str) -> Option<(usize, RangeDescriptor)> {
    for (index, node) in nodes.iter().enumerate() {
        for desc in owned(node).await {
            let holds = desc.start_key.as_ref() <= key.as_bytes()
                && (desc.end_key.is_empty() || key.as_bytes() < desc.end_key.as_ref());
            if holds && desc.state() == RangeState::Active {
                return Some((index, desc));
            }
        }
    }
    None
}

/// n1 with A, R (range 4) and B, then B moved to n2.
async fn set_up(dirs: &[tempfile::TempDir]) -> Vec<NodeProcess> {
    let nodes: Vec<NodeProcess> = ["n1", "n2", "n3"]
        .iter()
        .enumerate()
        .map(|(i, id)| NodeProcess::start(id, dirs[i].path(), if i == 0 { &["--bootstrap"] } else { &[] }))
        .collect();
    nodes[0].split(1, "k", 2, 3).await;
    nodes[0].split(3, "t", R, 5).await;
    let b = owned(&nodes[0]).await.into_iter().find(|d| d.range_id == 5).expect("range B");
    move_range(&nodes, 50, &b, 0, 1).await.expect("moving B to n2");
    nodes
}

/// Arms `crash_point` on `node` (restarting it with the crash point in its environment; the
/// crash fires once, so the platform-like restart after it runs clean).
fn arm(node: &mut NodeProcess, crash_point: &str, once: &std::path::Path) {
    node.env = vec![
        ("KVFLEET_CRASH_AT".into(), crash_point.into()),
        ("KVFLEET_CRASH_ONCE".into(), once.display().to_string()),
    ];
    node.kill9();
    node.spawn();
}

/// Restarts `node` once its process died at the armed crash point.
fn restart_after_crash(node: &mut NodeProcess) {
    let status = node.wait_for_exit(Duration::from_secs(20));
    assert!(!status.success(), "{} was expected to die at its crash point", node.node_id);
    node.spawn();
}

/// Runs the steps of the move of R from n1 to n2 in order, stopping after `steps` steps or at
/// the first that fails (the node taking it died). Returns how many steps succeeded.
async fn move_r_steps(nodes: &[NodeProcess], r: &RangeDescriptor, steps: usize) -> usize {
    let (source, target) = (&nodes[0], &nodes[1]);
    let import =
        ImportRangeRequest { range: Some(r.clone()), source_address: source.address.clone(), move_id: MOVE_ID };
    if steps < 1 || target.admin().import_range(import).await.is_err() {
        return 0;
    }
    let new_generation = r.generation + 1;
    if steps < 2 {
        return 1;
    }
    let freeze = FreezeForMoveRequest { range_id: R, move_id: MOVE_ID, target: Some(replica(target)), new_generation };
    let Ok(frozen) = source.admin().freeze_for_move(freeze).await else { return 1 };
    if steps < 3 {
        return 2;
    }
    let complete = CompleteImportRequest {
        range_id: R,
        move_id: MOVE_ID,
        final_seq: frozen.into_inner().final_seq,
        new_generation,
    };
    let Ok(done) = target.admin().complete_import(complete).await else { return 2 };
    if steps < 4 {
        return 3;
    }
    let retire = RetireMovedRequest { range_id: R, move_id: MOVE_ID, new_owner: done.into_inner().range };
    if source.admin().retire_moved(retire).await.is_err() {
        return 3;
    }
    4
}

async fn meanwhile(nodes: &mut [NodeProcess], what: Meanwhile) -> String {
    let Some((owner, desc)) = active_owner_of(nodes, INSIDE_R).await else {
        return "nobody owns R's keys actively (frozen mid-move): nothing else can touch them".into();
    };
    match what {
        Meanwhile::Nothing => "nothing".into(),
        Meanwhile::Split => {
            let split = SplitRangeRequest {
                range_id: desc.range_id,
                expected_generation: desc.generation,
                split_key: Bytes::from(INSIDE_R),
                left_id: 600,
                right_id: 601,
            };
            let result = nodes[owner].admin().split_range(split).await;
            format!("split range {} on {}: {:?}", desc.range_id, nodes[owner].node_id, result.map(|_| ()))
        }
        Meanwhile::Merge => {
            let ranges = owned(&nodes[owner]).await;
            let right = ranges.iter().find(|d| d.start_key == desc.end_key && d.state() == RangeState::Active);
            let left = ranges.iter().find(|d| d.end_key == desc.start_key && d.state() == RangeState::Active);
            let (l, r) = match (left, right) {
                (_, Some(right)) => (desc.clone(), right.clone()),
                (Some(left), None) => (left.clone(), desc.clone()),
                (None, None) => return format!("range {} has no neighbour on {}", desc.range_id, nodes[owner].node_id),
            };
            let merge = MergeRangesRequest {
                left_id: l.range_id,
                right_id: r.range_id,
                expected_left_generation: l.generation,
                expected_right_generation: r.generation,
                merged_id: 700,
            };
            let result = nodes[owner].admin().merge_ranges(merge).await;
            format!("merge {} + {} on {}: {:?}", l.range_id, r.range_id, nodes[owner].node_id, result.map(|_| ()))
        }
        Meanwhile::MoveOn => {
            let to = if owner == 2 { 0 } else { 2 };
            let result = move_range(nodes, FOREIGN_MOVE_ID, &desc, owner, to).await;
            format!("move {} {} -> {}: {result:?}", desc.range_id, nodes[owner].node_id, nodes[to].node_id)
        }
        Meanwhile::Restart => {
            for node in nodes.iter_mut().take(2) {
                node.kill9();
                node.spawn();
            }
            "kill -9 and restart of n1 and n2".into()
        }
    }
}

/// The controller's recovery, for real: rounds until nothing is in flight, nothing frozen or
/// importing anywhere, and no conflict; bounded.
async fn recover(nodes: &[NodeProcess], state: ReshardingState) {
    let platform = Arc::new(TestPlatform::new(&nodes.iter().collect::<Vec<_>>(), Some(state)));
    // A planner that does nothing by itself: what moves here is recovery's doing.
    let policy = Policy {
        split_qps: 1e12,
        split_bytes_per_sec: 1e15,
        split_bytes: u64::MAX / 2,
        merge_below_qps: 0.0,
        balance_tolerance: 1e9,
        ..Policy::default()
    };
    let config = LoopConfig { interval: Duration::from_millis(200), policy, ..LoopConfig::default() };
    let board = StatusBoard::new(&mut prometheus_client::registry::Registry::default());
    let mut controller = ReshardingLoop::new(platform.clone(), config, board.clone()).await.expect("controller starts");
    let addresses: Vec<String> = nodes.iter().map(|n| n.address.clone()).collect();
    let until = Instant::now() + Duration::from_secs(60);
    // A round reports what it observed before acting: settled twice in a row means a round saw
    // the nodes after the last recovery action, and reported no conflict.
    let mut settled_rounds = 0;
    loop {
        controller.round().await.expect("a recovery round");
        let settled_state = platform.state().is_some_and(|s| s.moves.is_empty());
        let (owned, importing) = owned_and_importing(&addresses).await;
        let settled_nodes = importing.is_empty() && owned.iter().all(|d| d.state() == RangeState::Active);
        let status = board.snapshot();
        let settled = settled_state && settled_nodes && status.conflicts.is_empty();
        settled_rounds = if settled { settled_rounds + 1 } else { 0 };
        if settled_rounds == 2 {
            return;
        }
        assert!(
            Instant::now() < until,
            "recovery did not settle in 60 s: state {:?}, owned {owned:?}, importing {importing:?}, conflicts {:?}, \
             events {:?}",
            platform.state(),
            status.conflicts,
            status.recent_events
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn keys() -> Vec<Bytes> {
    let r = (0..90).map(|i| format!("k{i:03}")).chain((0..30).map(|i| format!("p{i:03}")));
    let a = (0..10).map(|i| format!("a{i:03}"));
    let b = (0..10).map(|i| format!("u{i:03}"));
    r.chain(a).chain(b).map(Bytes::from).collect()
}

async fn run_case(crash: Crash, what: Meanwhile) {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let once = dirs[0].path().join("crashed");
    let mut nodes = set_up(&dirs).await;
    let r = owned(&nodes[0]).await.into_iter().find(|d| d.range_id == R).expect("range R on n1");
    let client = client_for(&nodes.iter().collect::<Vec<_>>());
    let workload = HistoryWorkload::start(client.clone(), keys(), 4, 3);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // What the controller had persisted before its first call for the move.
    let mut state =
        ReshardingState { next_range_id: 1000, next_move_id: 1000, bootstrapped: true, ..Default::default() };
    let in_flight = InFlightMove {
        move_id: MOVE_ID,
        range_id: R,
        generation: r.generation,
        from: "n1".into(),
        to: "n2".into(),
        reason: "test".into(),
        started_unix_ms: 0,
        replica: false,
    };
    let took = match crash {
        Crash::ControllerAfterStep(steps) => {
            state.moves.push(in_flight);
            format!("{} steps", move_r_steps(&nodes, &r, steps).await)
        }
        Crash::MoveNode(point) => {
            state.moves.push(in_flight);
            let dies = if ["import-mid-snapshot", "complete-before-persist"].contains(&point) { 1 } else { 0 };
            arm(&mut nodes[dies], point, &once);
            let steps = move_r_steps(&nodes, &r, 4).await;
            restart_after_crash(&mut nodes[dies]);
            format!("{steps} steps before {} died", nodes[dies].node_id)
        }
        Crash::Split(point) => {
            arm(&mut nodes[0], point, &once);
            let split = SplitRangeRequest {
                range_id: R,
                expected_generation: r.generation,
                split_key: Bytes::from("m"),
                left_id: 800,
                right_id: 801,
            };
            let result = nodes[0].admin().split_range(split).await;
            restart_after_crash(&mut nodes[0]);
            format!("split: {:?}", result.map(|_| ()))
        }
        Crash::Merge(point) => {
            arm(&mut nodes[0], point, &once);
            let merge = MergeRangesRequest { left_id: 2, right_id: R, merged_id: 900, ..Default::default() };
            let result = nodes[0].admin().merge_ranges(merge).await;
            restart_after_crash(&mut nodes[0]);
            format!("merge: {:?}", result.map(|_| ()))
        }
    };
    let done_meanwhile = meanwhile(&mut nodes, what).await;
    println!("{crash:?}: {took}; meanwhile: {done_meanwhile}");
    recover(&nodes, state).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (report, space) = workload.finish().await;
    let addresses: Vec<String> = nodes.iter().map(|n| n.address.clone()).collect();
    assert_one_owner_per_key(&addresses).await;
    assert!(
        report.violations.is_empty(),
        "history violated: {:?}",
        &report.violations[..report.violations.len().min(5)]
    );
    let wrong = space.verify_final(&client_for(&nodes.iter().collect::<Vec<_>>())).await;
    assert!(wrong.is_empty(), "acknowledged writes lost or stale: {:?}", &wrong[..wrong.len().min(5)]);
    assert!(report.writes > 100 && report.reads > 100, "too little load: {report:?}");
    println!(
        "{} writes, {} reads, {} errors{}",
        report.writes,
        report.reads,
        report.errors.len(),
        report.errors.first().map(|e| format!(" (first: {e})")).unwrap_or_default()
    );
}

// Every crash point crossed with everything that can happen in the gap.
macro_rules! cases {
    ($($name:ident: $crash:expr, $meanwhile:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            run_case($crash, $meanwhile).await;
        }
    )*};
}

cases! {
    controller_dies_after_import: Crash::ControllerAfterStep(1), Meanwhile::Nothing;
    controller_dies_after_import_then_split: Crash::ControllerAfterStep(1), Meanwhile::Split;
    controller_dies_after_import_then_merge: Crash::ControllerAfterStep(1), Meanwhile::Merge;
    controller_dies_after_import_then_move_on: Crash::ControllerAfterStep(1), Meanwhile::MoveOn;
    controller_dies_after_import_then_restart: Crash::ControllerAfterStep(1), Meanwhile::Restart;
    controller_dies_after_freeze: Crash::ControllerAfterStep(2), Meanwhile::Nothing;
    controller_dies_after_freeze_then_split: Crash::ControllerAfterStep(2), Meanwhile::Split;
    controller_dies_after_freeze_then_merge: Crash::ControllerAfterStep(2), Meanwhile::Merge;
    controller_dies_after_freeze_then_move_on: Crash::ControllerAfterStep(2), Meanwhile::MoveOn;
    controller_dies_after_freeze_then_restart: Crash::ControllerAfterStep(2), Meanwhile::Restart;
    controller_dies_after_complete: Crash::ControllerAfterStep(3), Meanwhile::Nothing;
    controller_dies_after_complete_then_split: Crash::ControllerAfterStep(3), Meanwhile::Split;
    controller_dies_after_complete_then_merge: Crash::ControllerAfterStep(3), Meanwhile::Merge;
    controller_dies_after_complete_then_move_on: Crash::ControllerAfterStep(3), Meanwhile::MoveOn;
    controller_dies_after_complete_then_restart: Crash::ControllerAfterStep(3), Meanwhile::Restart;
    target_dies_mid_import: Crash::MoveNode("import-mid-snapshot"), Meanwhile::Nothing;
    target_dies_mid_import_then_split: Crash::MoveNode("import-mid-snapshot"), Meanwhile::Split;
    target_dies_mid_import_then_merge: Crash::MoveNode("import-mid-snapshot"), Meanwhile::Merge;
    target_dies_mid_import_then_move_on: Crash::MoveNode("import-mid-snapshot"), Meanwhile::MoveOn;
    target_dies_mid_import_then_restart: Crash::MoveNode("import-mid-snapshot"), Meanwhile::Restart;
    source_dies_freezing: Crash::MoveNode("freeze-before-persist"), Meanwhile::Nothing;
    source_dies_freezing_then_split: Crash::MoveNode("freeze-before-persist"), Meanwhile::Split;
    source_dies_freezing_then_merge: Crash::MoveNode("freeze-before-persist"), Meanwhile::Merge;
    source_dies_freezing_then_move_on: Crash::MoveNode("freeze-before-persist"), Meanwhile::MoveOn;
    source_dies_freezing_then_restart: Crash::MoveNode("freeze-before-persist"), Meanwhile::Restart;
    source_dies_frozen: Crash::MoveNode("freeze-after-persist"), Meanwhile::Nothing;
    source_dies_frozen_then_split: Crash::MoveNode("freeze-after-persist"), Meanwhile::Split;
    source_dies_frozen_then_merge: Crash::MoveNode("freeze-after-persist"), Meanwhile::Merge;
    source_dies_frozen_then_move_on: Crash::MoveNode("freeze-after-persist"), Meanwhile::MoveOn;
    source_dies_frozen_then_restart: Crash::MoveNode("freeze-after-persist"), Meanwhile::Restart;
    target_dies_completing: Crash::MoveNode("complete-before-persist"), Meanwhile::Nothing;
    target_dies_completing_then_split: Crash::MoveNode("complete-before-persist"), Meanwhile::Split;
    target_dies_completing_then_merge: Crash::MoveNode("complete-before-persist"), Meanwhile::Merge;
    target_dies_completing_then_move_on: Crash::MoveNode("complete-before-persist"), Meanwhile::MoveOn;
    target_dies_completing_then_restart: Crash::MoveNode("complete-before-persist"), Meanwhile::Restart;
    source_dies_retiring: Crash::MoveNode("retire-before-persist"), Meanwhile::Nothing;
    source_dies_retiring_then_split: Crash::MoveNode("retire-before-persist"), Meanwhile::Split;
    source_dies_retiring_then_merge: Crash::MoveNode("retire-before-persist"), Meanwhile::Merge;
    source_dies_retiring_then_move_on: Crash::MoveNode("retire-before-persist"), Meanwhile::MoveOn;
    source_dies_retiring_then_restart: Crash::MoveNode("retire-before-persist"), Meanwhile::Restart;
    split_dies_before_persist: Crash::Split("split-before-persist"), Meanwhile::Nothing;
    split_dies_before_persist_then_split: Crash::Split("split-before-persist"), Meanwhile::Split;
    split_dies_before_persist_then_merge: Crash::Split("split-before-persist"), Meanwhile::Merge;
    split_dies_before_persist_then_move_on: Crash::Split("split-before-persist"), Meanwhile::MoveOn;
    split_dies_before_persist_then_restart: Crash::Split("split-before-persist"), Meanwhile::Restart;
    split_dies_after_persist: Crash::Split("split-after-persist"), Meanwhile::Nothing;
    split_dies_after_persist_then_split: Crash::Split("split-after-persist"), Meanwhile::Split;
    split_dies_after_persist_then_merge: Crash::Split("split-after-persist"), Meanwhile::Merge;
    split_dies_after_persist_then_move_on: Crash::Split("split-after-persist"), Meanwhile::MoveOn;
    split_dies_after_persist_then_restart: Crash::Split("split-after-persist"), Meanwhile::Restart;
    merge_dies_before_persist: Crash::Merge("merge-before-persist"), Meanwhile::Nothing;
    merge_dies_before_persist_then_split: Crash::Merge("merge-before-persist"), Meanwhile::Split;
    merge_dies_before_persist_then_merge: Crash::Merge("merge-before-persist"), Meanwhile::Merge;
    merge_dies_before_persist_then_move_on: Crash::Merge("merge-before-persist"), Meanwhile::MoveOn;
    merge_dies_before_persist_then_restart: Crash::Merge("merge-before-persist"), Meanwhile::Restart;
    merge_dies_after_persist: Crash::Merge("merge-after-persist"), Meanwhile::Nothing;
    merge_dies_after_persist_then_split: Crash::Merge("merge-after-persist"), Meanwhile::Split;
    merge_dies_after_persist_then_merge: Crash::Merge("merge-after-persist"), Meanwhile::Merge;
    merge_dies_after_persist_then_move_on: Crash::Merge("merge-after-persist"), Meanwhile::MoveOn;
    merge_dies_after_persist_then_restart: Crash::Merge("merge-after-persist"), Meanwhile::Restart;
}

/// The safety net, on real processes: two nodes that both own the whole key space (two fleets
/// glued together by mistake) are reported as a conflict, loudly, and the controller touches
/// neither while the load would otherwise make it split and move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_owners_are_reported_and_left_alone() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<NodeProcess> = ["n1", "n2"]
        .iter()
        .enumerate()
        .map(|(i, id)| NodeProcess::start(id, dirs[i].path(), &["--bootstrap", "--load-window-secs", "2"]))
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        node.client().put(Bytes::from("k"), Bytes::from(format!("from n{}", i + 1))).await.unwrap();
    }
    let state = ReshardingState { bootstrapped: true, ..Default::default() };
    let platform = Arc::new(TestPlatform::new(&nodes.iter().collect::<Vec<_>>(), Some(state)));
    let policy = Policy { split_qps: 1.0, split_sustain_secs: 0, ..Policy::default() };
    let config = LoopConfig { interval: Duration::from_millis(200), policy, ..LoopConfig::default() };
    let mut registry = prometheus_client::registry::Registry::default();
    let board = StatusBoard::new(&mut registry);
    let mut controller = ReshardingLoop::new(platform, config, board.clone()).await.expect("controller starts");
    // Load on both copies: reason enough to split, if anything were planned on them.
    for round in 0..15 {
        for node in &nodes {
            for _ in 0..20 {
                node.client().get(Bytes::from(format!("k{round}"))).await.unwrap();
            }
        }
        controller.round().await.expect("a round");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = board.snapshot();
    assert_eq!(status.conflicts.len(), 1, "{:?}", status.conflicts);
    let conflict = &status.conflicts[0];
    assert_eq!((conflict.older_node.as_str(), conflict.newer_node.as_str()), ("n2", "n1"));
    assert!(status.ranges.is_empty(), "conflicting ranges are not in the map: {:?}", status.ranges);
    assert!(status.nodes.iter().all(|n| n.ranges == 1), "each node still counts what it holds: {:?}", status.nodes);
    assert!(
        status.recent_events.iter().filter(|e| e.contains("ownership conflict")).count() == 1,
        "one event when it appears, not one per round: {:?}",
        status.recent_events
    );
    let mut metrics = String::new();
    prometheus_client::encoding::text::encode(&mut metrics, &registry).unwrap();
    assert!(metrics.contains(r#"kvfleet_controller_ownership_conflicts{cluster="local"} 1"#), "{metrics}");
    for node in &nodes {
        let ranges = owned(node).await;
        assert_eq!(ranges.iter().map(|d| (d.range_id, d.generation)).collect::<Vec<_>>(), vec![(1, 1)], "untouched");
    }
}
