//! The handoff under fire. A move of single copy R from n1 to n2 (a membership change: n2 added
//! as a learner, caught up, promoted while n1 leaves in one joint change, the lead handed to n2
//! inside it, the joint membership left), and apart a split and a merge of R, under a
//! read/write load, are interrupted at each step: the controller dies after the step, or the
//! node taking the step dies at its crash point (and restarts, as a platform would restart it).
//! In the gap, before anything recovers, the test does what a user or another component could
//! do meanwhile: nothing, split R's keys, merge them with a neighbour, move them on to a third
//! node, or kill -9 and restart the nodes; every crash point is crossed with each of these.
//! Then the controller's real recovery runs against the real nodes. Every case checks the
//! invariants: exactly one owner per key, no range left frozen or in a joint membership, every
//! acknowledged write reads back, and no read (during the whole run) returned a value older
//! than one already acknowledged when it began.
//!
//! Layout of every case: n1 leads A = ["", "k") and R = ["k", "t"); n2 leads B = ["t", +inf),
//! so R has a neighbour on each side of the move; n3 starts empty.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_e2e::history::HistoryWorkload;
use kvfleet_e2e::{NodeProcess, TestPlatform, assert_one_owner_per_key, client_for, reported_ranges};
use kvfleet_planner::Policy;
use kvfleet_proto::RangeBounds;
use kvfleet_proto::v1::*;
use kvfleet_resharding::observe::{NodeClients, leads};
use kvfleet_resharding::replica_moves::{Endpoint, move_replica};
use kvfleet_resharding::resharding_loop::{LoopConfig, ReshardingLoop};
use kvfleet_resharding::state::{InFlightMove, ReshardingState};
use kvfleet_resharding::status::StatusBoard;

const R: u64 = 4;
const B: u64 = 5;
const INSIDE_R: &str = "p";
const MOVE_ID: u64 = 100;

/// How far the move of R has come, read off R's newest descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Milestone {
    /// n2 is a learner of R.
    LearnerAdded,
    /// R's membership is joint: n2 joining, n1 leaving.
    Joint,
    /// n2 leads R, still inside the joint membership.
    TargetLeads,
    /// n2 is R's only voter: the move is done (the controller dies before recording that).
    Done,
}

/// Where the run is interrupted.
#[derive(Debug, Clone, Copy)]
enum Crash {
    /// The controller (with the task driving the move of R from n1 to n2) dies once the move
    /// has reached this milestone.
    ControllerAt(Milestone),
    /// Node `usize` (0: the source n1, 1: the target n2) dies at this crash point during the
    /// move, then restarts.
    MoveNode(usize, &'static str),
    /// n1 dies at this crash point while splitting R, then restarts.
    Split(&'static str),
    /// n1 dies at this crash point while merging A and R, then restarts.
    Merge(&'static str),
}

/// What happens in the gap, before the controller recovers.
#[derive(Debug, Clone, Copy)]
enum Meanwhile {
    Nothing,
    /// Whoever leads R's keys splits them.
    Split,
    /// Whoever leads R's keys merges them with a neighbour (refused unless both ranges have
    /// their replicas on the same nodes).
    Merge,
    /// A second mover moves R's keys on to another node.
    MoveOn,
    /// kill -9 and restart n1 and n2.
    Restart,
}

fn endpoint(node: &NodeProcess) -> Endpoint {
    Endpoint { node_id: node.node_id.clone(), address: node.address.clone() }
}

async fn owned(node: &NodeProcess) -> Vec<RangeDescriptor> {
    node.admin().list_ranges(ListRangesRequest {}).await.map(|r| r.into_inner().ranges).unwrap_or_default()
}

/// Moves `range_id`'s replica from node `from` to node `to`, as the controller's move task does.
async fn move_range(nodes: &[NodeProcess], range_id: u64, from: usize, to: usize) -> Result<RangeDescriptor, String> {
    let seeds: Vec<String> = nodes.iter().map(|n| n.address.clone()).collect();
    let (from, to) = (endpoint(&nodes[from]), endpoint(&nodes[to]));
    move_replica(&NodeClients::default(), range_id, &seeds, &from, &to, Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())
}

/// The newest descriptor of `range_id` any node reports (highest generation, then membership
/// version), with the node that reports itself its leader, if any.
async fn newest(nodes: &[NodeProcess], range_id: u64) -> Option<(RangeDescriptor, Option<String>)> {
    let mut best: Option<(RangeDescriptor, Option<String>)> = None;
    for node in nodes {
        for desc in owned(node).await.into_iter().filter(|d| d.range_id == range_id) {
            let leads = leads(&desc, &node.node_id);
            let newer = best
                .as_ref()
                .is_none_or(|(kept, _)| (desc.generation, desc.conf_version) > (kept.generation, kept.conf_version));
            let leader = leads.then(|| node.node_id.clone());
            match &mut best {
                Some((kept, kept_leader)) if !newer => {
                    if (kept.generation, kept.conf_version) == (desc.generation, desc.conf_version) && leader.is_some()
                    {
                        *kept_leader = leader;
                    }
                }
                _ => best = Some((desc, leader)),
            }
        }
    }
    best
}

fn reached(desc: &RangeDescriptor, leader: Option<&str>, milestone: Milestone) -> bool {
    let membership = |node: &str| desc.replicas.iter().find(|r| r.node_id == node).map(Replica::membership);
    let joint = desc.in_joint_membership();
    let done = desc.replicas.len() == 1 && membership("n2") == Some(ReplicaMembership::Voter);
    match milestone {
        Milestone::LearnerAdded => membership("n2").is_some(),
        Milestone::Joint => joint || done,
        Milestone::TargetLeads => (joint && leader == Some("n2")) || done,
        Milestone::Done => done,
    }
}

/// The leader of the range holding `key` (the index of its node) and the range.
async fn leader_of_key(nodes: &[NodeProcess], key: &str) -> Option<(usize, RangeDescriptor)> {
    for (index, node) in nodes.iter().enumerate() {
        for desc in owned(node).await {
            let leads = leads(&desc, &node.node_id);
            if leads && desc.contains_key(key.as_bytes()) {
                return Some((index, desc));
            }
        }
    }
    None
}

/// n1 with A (range 1), R and B, then B moved to n2.
async fn set_up(dirs: &[tempfile::TempDir]) -> Vec<NodeProcess> {
    let nodes: Vec<NodeProcess> = ["n1", "n2", "n3"]
        .iter()
        .enumerate()
        .map(|(i, id)| NodeProcess::start(id, dirs[i].path(), if i == 0 { &["--bootstrap"] } else { &[] }))
        .collect();
    nodes[0].split(1, "k", R).await;
    nodes[0].split(R, "t", B).await;
    move_range(&nodes, B, 0, 1).await.expect("moving B to n2");
    nodes
}

/// Arms `crash_point` on `node` (restarting it with the crash point in its environment; the
/// crash fires once, so the platform-like restart after it runs clean), and waits until it
/// leads again the ranges it holds alone (their one voter campaigns one election timeout after
/// the restart).
async fn arm(node: &mut NodeProcess, crash_point: &str, once: &std::path::Path) {
    node.env = vec![
        ("KVFLEET_CRASH_AT".into(), crash_point.into()),
        ("KVFLEET_CRASH_ONCE".into(), once.display().to_string()),
    ];
    node.kill9();
    node.spawn();
    let node = &*node;
    kvfleet_e2e::wait_until("the restarted node to lead its single copies", Duration::from_secs(30), async || {
        // Not answering is not leading.
        let Ok(listed) = node.admin().list_ranges(ListRangesRequest {}).await else { return false };
        listed.into_inner().ranges.iter().all(|d| match d.replicas.as_slice() {
            [only] if only.node_id == node.node_id => only.role() == ReplicaRole::Leader,
            _ => true,
        })
    })
    .await;
}

/// Restarts `node` once its process died at the armed crash point.
fn restart_after_crash(node: &mut NodeProcess) {
    let status = node.wait_for_exit(Duration::from_secs(30));
    assert!(!status.success(), "{} was expected to die at its crash point", node.node_id);
    node.spawn();
}

/// Runs the move of R from n1 to n2 until it reaches `milestone`, then kills its task (the
/// controller dying with it). Returns what the move had done.
async fn move_r_until(nodes: &[NodeProcess], milestone: Milestone) -> String {
    let seeds: Vec<String> = nodes.iter().map(|n| n.address.clone()).collect();
    let (from, to) = (endpoint(&nodes[0]), endpoint(&nodes[1]));
    let task = tokio::spawn(async move {
        move_replica(&NodeClients::default(), R, &seeds, &from, &to, Duration::from_secs(30)).await
    });
    let until = Instant::now() + Duration::from_secs(40);
    while Instant::now() < until && !task.is_finished() {
        if let Some((desc, leader)) = newest(nodes, R).await
            && reached(&desc, leader.as_deref(), milestone)
        {
            task.abort();
            return format!("cut off at {milestone:?} (conf version {})", desc.conf_version);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outcome = task.await.map(|r| r.map(|d| d.conf_version).map_err(|e| e.to_string()));
    format!("the move ended before the cut: {outcome:?}")
}

async fn meanwhile(nodes: &mut [NodeProcess], what: Meanwhile) -> String {
    let Some((owner, desc)) = leader_of_key(nodes, INSIDE_R).await else {
        return "nobody leads R's keys (an election is under way): nothing else can touch them".into();
    };
    match what {
        Meanwhile::Nothing => "nothing".into(),
        Meanwhile::Split => {
            let split = SplitRangeRequest {
                range_id: desc.range_id,
                expected_generation: desc.generation,
                split_key: Bytes::from(INSIDE_R),
                right_id: 601,
            };
            let result = nodes[owner].admin().split_range(split).await;
            format!("split range {} on {}: {:?}", desc.range_id, nodes[owner].node_id, result.map(|_| ()))
        }
        Meanwhile::Merge => {
            let ranges = owned(&nodes[owner]).await;
            let right = ranges.iter().find(|d| d.start_key == desc.end_key && !desc.end_key.is_empty());
            let left = ranges.iter().find(|d| d.end_key == desc.start_key && !desc.start_key.is_empty());
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
            };
            let result = nodes[owner].admin().merge_ranges(merge).await;
            format!("merge {} + {} on {}: {:?}", l.range_id, r.range_id, nodes[owner].node_id, result.map(|_| ()))
        }
        Meanwhile::MoveOn => {
            let to = if owner == 2 { 0 } else { 2 };
            let result = move_range(nodes, desc.range_id, owner, to).await.map(|d| d.conf_version);
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

/// Whether every range the nodes report is settled: led (a leader elected after a restart may
/// still have logged changes to apply, such as a merge's freeze), only voters, not frozen.
fn settled(ranges: &[RangeDescriptor]) -> bool {
    let led = |range_id: u64| {
        ranges.iter().any(|d| d.range_id == range_id && d.replicas.iter().any(|r| r.role() == ReplicaRole::Leader))
    };
    ranges.iter().all(|d| {
        led(d.range_id)
            && d.state() == RangeState::Active
            && !d.is_frozen_for_merge()
            && d.replicas.iter().all(|r| r.membership() == ReplicaMembership::Voter)
    })
}

/// The controller's recovery, for real: rounds until nothing is in flight, every range settled
/// (see `settled`), and no conflict; bounded.
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
        let owned = reported_ranges(&addresses).await;
        let status = board.snapshot();
        let done = settled_state && settled(&owned) && status.conflicts.is_empty();
        settled_rounds = if done { settled_rounds + 1 } else { 0 };
        if settled_rounds == 2 {
            return;
        }
        assert!(
            Instant::now() < until,
            "recovery did not settle in 60 s: state {:?}, owned {owned:?}, conflicts {:?}, events {:?}",
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
    };
    let took = match crash {
        Crash::ControllerAt(milestone) => {
            state.moves.push(in_flight);
            move_r_until(&nodes, milestone).await
        }
        Crash::MoveNode(dies, point) => {
            state.moves.push(in_flight);
            arm(&mut nodes[dies], point, &once).await;
            // The mover runs until the node dies and a little after (retrying against the dead
            // node), then dies with the controller.
            let seeds: Vec<String> = nodes.iter().map(|n| n.address.clone()).collect();
            let (from, to) = (endpoint(&nodes[0]), endpoint(&nodes[1]));
            let mover = tokio::spawn(async move {
                move_replica(&NodeClients::default(), R, &seeds, &from, &to, Duration::from_secs(30)).await
            });
            restart_after_crash(&mut nodes[dies]);
            tokio::time::sleep(Duration::from_millis(300)).await;
            mover.abort();
            let outcome = mover.await.map(|r| r.map(|d| d.conf_version).map_err(|e| e.to_string()));
            format!("{} died at {point}; the mover: {outcome:?}", nodes[dies].node_id)
        }
        Crash::Split(point) => {
            arm(&mut nodes[0], point, &once).await;
            let split = SplitRangeRequest {
                range_id: R,
                expected_generation: r.generation,
                split_key: Bytes::from("m"),
                right_id: 801,
            };
            let result = nodes[0].admin().split_range(split).await;
            restart_after_crash(&mut nodes[0]);
            format!("split: {:?}", result.map(|_| ()))
        }
        Crash::Merge(point) => {
            arm(&mut nodes[0], point, &once).await;
            let merge = MergeRangesRequest { left_id: 1, right_id: R, ..Default::default() };
            let result = nodes[0].admin().merge_ranges(merge).await;
            restart_after_crash(&mut nodes[0]);
            format!("merge: {:?}", result.map(|_| ()))
        }
    };
    let done_meanwhile = meanwhile(&mut nodes, what).await;
    println!("{crash:?}: {took}; meanwhile: {done_meanwhile}");
    if let Crash::Merge(_) = crash {
        // A merge stopped between its freeze and its proposal is finished by asking again (the
        // controller finishes those of its own merges only).
        // Retried while the restarted node has no leader yet (bounded); refused for good when
        // the gap's action made the two ranges unmergeable.
        let mut again = Ok(());
        let asking = Instant::now();
        while asking.elapsed() < Duration::from_secs(60) {
            let merge = MergeRangesRequest { left_id: 1, right_id: R, ..Default::default() };
            again = nodes[0].admin().merge_ranges(merge).await.map(|_| ());
            match &again {
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                _ => break,
            }
        }
        println!("merging A and R again: {again:?}");
    }
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
    ($($name:ident: $crash:expr;)*) => {$(
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn then_nothing() {
                run_case($crash, Meanwhile::Nothing).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn then_split() {
                run_case($crash, Meanwhile::Split).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn then_merge() {
                run_case($crash, Meanwhile::Merge).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn then_move_on() {
                run_case($crash, Meanwhile::MoveOn).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn then_restart() {
                run_case($crash, Meanwhile::Restart).await;
            }
        }
    )*};
}

cases! {
    controller_dies_with_a_learner_added: Crash::ControllerAt(Milestone::LearnerAdded);
    controller_dies_in_the_joint_membership: Crash::ControllerAt(Milestone::Joint);
    controller_dies_once_the_target_leads: Crash::ControllerAt(Milestone::TargetLeads);
    controller_dies_with_the_move_done: Crash::ControllerAt(Milestone::Done);
    target_dies_installing_its_snapshot: Crash::MoveNode(1, "snapshot-install-before-data");
    target_dies_before_recording_its_snapshot: Crash::MoveNode(1, "snapshot-install-before-applied");
    source_dies_applying_a_membership_change: Crash::MoveNode(0, "membership-apply-before-write");
    source_dies_after_applying_a_membership_change: Crash::MoveNode(0, "membership-apply-after-write");
    target_dies_applying_a_membership_change: Crash::MoveNode(1, "membership-apply-before-write");
    target_dies_after_applying_a_membership_change: Crash::MoveNode(1, "membership-apply-after-write");
    source_dies_handing_its_lead_over: Crash::MoveNode(0, "transfer-leader-after-lease-ended");
    // The source holds the end of the joint membership, uncommitted: it may win the next
    // election and commit it as leader, demoting itself, then hand its lead to the target.
    target_dies_as_the_source_acknowledges_the_joint_end: Crash::MoveNode(1, "leave-joint-acknowledged");
    split_dies_applying: Crash::Split("split-apply-before-write");
    split_dies_after_applying: Crash::Split("split-apply-after-write");
    merge_dies_freezing: Crash::Merge("merge-freeze-apply-before-write");
    merge_dies_frozen: Crash::Merge("merge-after-freeze");
    merge_dies_applying: Crash::Merge("merge-apply-before-write");
    merge_dies_after_applying: Crash::Merge("merge-apply-after-write");
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
