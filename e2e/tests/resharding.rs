//! The controller on real processes: a playground of 3 nodes with single copies (Raft groups of
//! one voter) under a Zipfian read/write load splits and moves ranges by itself, and every
//! acknowledged write reads back with its last value, with zero client-visible errors:
//! undisturbed, and with the source, the target or the controller killed at each step of a move
//! (crash points abort the process like kill -9, at an exact step, once; the Local platform
//! restarts a node, the test restarts the controller).
//! And a node drained, then restarted, as a scale-in or a DrainFirst update does on Kubernetes.
//! And the hotspot on five nodes with three (and five) replicas per range: split, spread, merged
//! back.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kvfleet_e2e::{
    NodeProcess, Playground, TestPlatform, assert_all_acked_readable, assert_one_owner_per_key, client_for, wait_until,
    wait_until_explained,
};
use kvfleet_planner::Policy;
use kvfleet_proto::v1::{ControllerStatus, ReplicaMembership};
use kvfleet_resharding::resharding_loop::{LoopConfig, ReshardingLoop};
use kvfleet_resharding::status::StatusBoard;
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Zipf};

const WRITERS: u64 = 8;
const KEYS_PER_WRITER: u64 = 400;

/// Quick reactions, so that a few seconds of load split and move ranges.
const FAST_POLICY: &[&str] = &[
    "--interval-secs",
    "0.5",
    "--load-window-secs",
    "3",
    "--split-qps",
    "300",
    "--split-sustain-secs",
    "2",
    "--move-cooldown-secs",
    "5",
];

/// What one worker saw: the last acknowledged value of each of its keys, errors, stale reads.
#[derive(Default)]
struct Outcome {
    acked: HashMap<Bytes, Bytes>,
    errors: Vec<String>,
    stale_reads: Vec<String>,
    ops: u64,
}

/// Workers reading and writing their own keys (so "the last acknowledged value" is exact), each
/// choosing keys by a Zipfian over ranks; the hottest ranks of all workers sit together at the
/// start of the key space: a hotspot.
struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Outcome>>,
}

fn key_of(worker: u64, rank: u64) -> Bytes {
    Bytes::from(format!("user{:08}", rank * WRITERS + worker))
}

impl Workload {
    fn start(client: kvfleet_client::Client) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..WRITERS)
            .map(|worker| {
                let (client, stop) = (client.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(worker);
                    let zipf = Zipf::new(KEYS_PER_WRITER as f64, 0.99).expect("zipf parameters");
                    let mut out = Outcome::default();
                    for i in 0..2_000_000u64 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        out.ops += 1;
                        let key = key_of(worker, zipf.sample(&mut rng) as u64 - 1);
                        if rng.random_bool(0.5) {
                            let value = Bytes::from(format!("{worker}/{i}"));
                            match client.put(key.clone(), value.clone()).await {
                                Ok(()) => {
                                    out.acked.insert(key, value);
                                }
                                Err(error) => out.errors.push(format!("put: {error}")),
                            }
                        } else {
                            match client.get(key.clone()).await {
                                Ok(found) if found.as_ref() == out.acked.get(&key) => {}
                                Ok(found) => out.stale_reads.push(format!(
                                    "{key:?}: read {found:?}, last acknowledged {:?}",
                                    out.acked.get(&key)
                                )),
                                Err(error) => out.errors.push(format!("get: {error}")),
                            }
                        }
                    }
                    out
                })
            })
            .collect();
        Workload { stop, tasks }
    }

    async fn finish(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Outcome::default();
        for task in self.tasks {
            let out = tokio::time::timeout(Duration::from_secs(90), task).await.expect("workers stop").unwrap();
            all.acked.extend(out.acked);
            all.errors.extend(out.errors);
            all.stale_reads.extend(out.stale_reads);
            all.ops += out.ops;
        }
        all
    }
}

fn owners(status: &ControllerStatus) -> usize {
    let mut owners: Vec<&str> = status.ranges.iter().map(|r| r.owner.as_str()).collect();
    owners.sort();
    owners.dedup();
    owners.len()
}

/// Reads every acknowledged write back, checks the zero-error promise, and checks that the
/// ranges the nodes at `addresses` own tile the key space with exactly one owner per key.
async fn verify(client: &kvfleet_client::Client, addresses: &[String], outcome: &Outcome) {
    assert!(
        outcome.errors.is_empty(),
        "{} client-visible errors out of {} operations, first: {:?}",
        outcome.errors.len(),
        outcome.ops,
        &outcome.errors[..outcome.errors.len().min(3)]
    );
    assert!(
        outcome.stale_reads.is_empty(),
        "stale reads: {:?}",
        &outcome.stale_reads[..outcome.stale_reads.len().min(3)]
    );
    assert!(outcome.acked.len() > 100, "only {} keys written", outcome.acked.len());
    assert_all_acked_readable(client, &outcome.acked).await;

    assert_one_owner_per_key(addresses).await;
}

/// Runs the load until, if `crash_file` is given, the armed crash point fired (at the first
/// move), and until the controller has split and moved (ranges on at least 2 nodes, at least 3
/// ranges) with nothing left in flight; then a little longer; then verifies.
async fn run_scenario(
    playground: &mut Playground,
    crash_file: Option<&Path>,
    restart_controller: bool,
) -> ControllerStatus {
    let workload = Workload::start(playground.client());
    if let Some(crash_file) = crash_file {
        wait_until("the crash point to fire", Duration::from_secs(90), async || crash_file.exists()).await;
        if restart_controller {
            assert!(playground.wait_for_controller_exit(Duration::from_secs(10)), "the controller did not crash");
            playground.spawn();
        }
    }
    wait_until("splits and moves, nothing in flight, every node up", Duration::from_secs(90), async || {
        let status = playground.status().await;
        status.ranges.len() >= 3
            && owners(&status) >= 2
            && status.moves.is_empty()
            && status.nodes.iter().all(|n| n.state == "up")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcome = workload.finish().await;
    verify(&playground.client(), &playground.addresses(), &outcome).await;
    let status = playground.status().await;
    println!(
        "{} ops, {} keys, {} ranges on {} nodes; recent: {:#?}",
        outcome.ops,
        outcome.acked.len(),
        status.ranges.len(),
        owners(&status),
        status.recent_events
    );
    status
}

async fn crash_scenario(crash_at: &str, restart_controller: bool) -> ControllerStatus {
    let dir = tempfile::tempdir().unwrap();
    let crash_file = dir.path().join("crashed");
    let crash_once = crash_file.to_str().unwrap().to_string();
    let mut playground = Playground::start(
        &dir.path().join("fleet"),
        3,
        FAST_POLICY,
        &[("KVFLEET_CRASH_AT", crash_at), ("KVFLEET_CRASH_ONCE", &crash_once)],
    );
    let status = run_scenario(&mut playground, Some(&crash_file), restart_controller).await;
    assert_eq!(playground.stop().code(), Some(0));
    status
}

/// A node crashes at `crash_at` (once); the Local platform restarts it.
async fn node_crash_scenario(crash_at: &str) {
    let status = crash_scenario(crash_at, false).await;
    assert!(status.nodes.iter().any(|n| n.restarts > 0), "a node was restarted: {:?}", status.nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zipfian_load_is_split_moved_and_merged_without_losing_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = FAST_POLICY.to_vec();
    args.extend(["--merge-delay-secs", "3"]);
    let mut playground = Playground::start(&dir.path().join("fleet"), 3, &args, &[]);
    let status = run_scenario(&mut playground, None, false).await;
    assert!(status.skips.iter().any(|s| s.count > 0), "decisions not taken are reported: {:?}", status.skips);

    // Idle, the ranges go cold and merge back.
    let busiest = status.ranges.len();
    wait_until("cold ranges to merge", Duration::from_secs(90), async || {
        playground.status().await.ranges.len() < busiest
    })
    .await;
    assert_eq!(playground.stop().code(), Some(0), "Ctrl-C (SIGTERM) stops the playground cleanly");

    // The next start resumes from the same directory with the same data.
    playground.spawn();
    let client = playground.client();
    assert!(client.scan(Bytes::new(), Bytes::new(), 10, true).await.unwrap().len() == 10);
    assert_eq!(playground.stop().code(), Some(0));
}

// Single copies are Raft groups of one voter: a move adds the target as a learner (caught up
// by a snapshot), promotes it and removes the source in one joint membership, in which the
// source hands its leadership over, and the new leader leaves the joint membership.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_killed_before_it_writes_a_membership_change() {
    node_crash_scenario("membership-apply-before-write").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_killed_after_it_wrote_a_membership_change() {
    node_crash_scenario("membership-apply-after-write").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_killed_installing_its_snapshot() {
    node_crash_scenario("snapshot-install-before-data").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_killed_handing_its_lead_over_in_the_joint_membership() {
    node_crash_scenario("transfer-leader-after-lease-ended").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_after_adding_the_learner() {
    crash_scenario("replica-move-after-add-learner", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_in_the_joint_membership() {
    crash_scenario("replica-move-after-promote-and-remove", true).await;
}

/// The issue-10 scenario on the playground, for single copies that are Raft groups: the
/// controller dies with a move in its joint membership (the target promoted, the source
/// leaving); before any controller is back, a user splits the moved range on whichever node
/// leads it. The nodes finish the joint membership by themselves (the source hands its lead to
/// the target, which leaves it), so the split goes through; the next controller finds the move
/// done. Readers hammering the keys throughout must never see an acknowledged write undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_in_the_joint_membership_then_a_user_splits_the_moved_range() {
    let dir = tempfile::tempdir().unwrap();
    let crash_file = dir.path().join("crashed");
    let crash_once = crash_file.to_str().unwrap().to_string();
    let fleet = dir.path().join("fleet");
    let mut playground = Playground::start(
        &fleet,
        3,
        FAST_POLICY,
        &[("KVFLEET_CRASH_AT", "replica-move-after-promote-and-remove"), ("KVFLEET_CRASH_ONCE", &crash_once)],
    );
    let workload = Workload::start(playground.client());
    let history = kvfleet_e2e::history::HistoryWorkload::start(
        playground.client(),
        (0..64)
            .map(|rank| key_of(rank % WRITERS, rank / WRITERS))
            .map(|k| {
                let mut k = k.to_vec();
                k.extend_from_slice(b"/h");
                Bytes::from(k)
            })
            .collect(),
        2,
        2,
    );
    wait_until("the crash point to fire", Duration::from_secs(90), async || crash_file.exists()).await;
    assert!(playground.wait_for_controller_exit(Duration::from_secs(10)), "the controller did not crash");

    let state: kvfleet_resharding::state::ReshardingState =
        serde_json::from_slice(&std::fs::read(fleet.join("controller-state.json")).unwrap()).unwrap();
    assert!(!state.moves.is_empty(), "the move in flight is in the saved state");
    // Up to `max_concurrent_moves` moves were in flight; the crash point stopped one in its joint
    // membership, and any other may have stopped earlier, with its learner added: that one
    // waits for the next controller (a range with a learner is not split). Whichever node leads
    // a moved range out of its joint membership, with no learner, splits it.
    let moved_ids: Vec<u64> = state.moves.iter().map(|m| m.range_id).collect();
    let joined = |d: &kvfleet_proto::v1::RangeDescriptor| {
        state.moves.iter().any(|m| {
            m.range_id == d.range_id
                && d.replicas.iter().any(|r| r.node_id == m.to && r.membership() != ReplicaMembership::Learner)
        })
    };
    let started = std::time::Instant::now();
    let mut last = format!("no node leads a moved range ({moved_ids:?})");
    let split = loop {
        assert!(started.elapsed() < Duration::from_secs(60), "no moved range was split within 60 s: {last}");
        let mut done = None;
        for (node_id, address) in &playground.nodes {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect_lazy();
            let mut admin = kvfleet_proto::v1::admin_client::AdminClient::new(channel);
            let Ok(ranges) = admin.list_ranges(kvfleet_proto::v1::ListRangesRequest {}).await else { continue };
            let mut led = ranges
                .into_inner()
                .ranges
                .into_iter()
                .filter(|d| moved_ids.contains(&d.range_id) && d.leader().is_some_and(|l| l.node_id == *node_id));
            let Some(moved) = led.find(|d| joined(d)) else { continue };
            if moved.in_joint_membership() {
                last = format!("node {node_id} leads moved range {} in a joint membership", moved.range_id);
                continue;
            }
            let mut inside: Vec<Bytes> = (0..WRITERS)
                .flat_map(|w| (0..KEYS_PER_WRITER).map(move |r| key_of(w, r)))
                .filter(|k| *k > moved.start_key && (moved.end_key.is_empty() || *k < moved.end_key))
                .collect();
            inside.sort();
            let Some(split_key) = inside.get(inside.len() / 2).cloned() else {
                last = format!("no workload key strictly inside {}", moved.span());
                continue;
            };
            let request = kvfleet_proto::v1::SplitRangeRequest {
                range_id: moved.range_id,
                expected_generation: moved.generation,
                split_key,
                right_id: 0,
            };
            match admin.split_range(request).await {
                Ok(_) => done = Some((node_id.clone(), moved.replicas.len(), moved.range_id)),
                Err(status) => last = format!("node {node_id}: {}", status.message()),
            }
        }
        if let Some(done) = done {
            break done;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(split.1, 1, "the moved range is a single copy again when it is split: {split:?}");
    eprintln!("the moved range {} was split on node {} with no controller", split.2, split.0);
    playground.spawn();
    wait_until("the move finished, every node up", Duration::from_secs(60), async || {
        let status = playground.status().await;
        status.moves.is_empty() && status.conflicts.is_empty() && status.nodes.iter().all(|n| n.state == "up")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcome = workload.finish().await;
    let (report, space) = history.finish().await;
    verify(&playground.client(), &playground.addresses(), &outcome).await;
    assert!(
        report.violations.is_empty(),
        "history violated: {:?}",
        &report.violations[..report.violations.len().min(5)]
    );
    let wrong = space.verify_final(&playground.client()).await;
    assert!(wrong.is_empty(), "{wrong:?}");
    assert_eq!(playground.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_sigkilled_mid_load_resumes_and_adopts_its_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let mut playground = Playground::start(&dir.path().join("fleet"), 3, FAST_POLICY, &[]);
    let pids: Vec<Option<u32>> = playground.nodes.iter().map(|(id, _)| playground.node_pid(id)).collect();
    let workload = Workload::start(playground.client());
    wait_until("the first split", Duration::from_secs(90), async || playground.status().await.ranges.len() >= 2).await;
    playground.kill9_controller();
    playground.spawn();
    let adopted: Vec<Option<u32>> = playground.nodes.iter().map(|(id, _)| playground.node_pid(id)).collect();
    assert_eq!(pids, adopted, "the restarted controller adopts the running nodes instead of starting new ones");
    wait_until("moves after the restart", Duration::from_secs(90), async || owners(&playground.status().await) >= 2)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcome = workload.finish().await;
    verify(&playground.client(), &playground.addresses(), &outcome).await;
    assert_eq!(playground.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_drained_then_restarted_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<NodeProcess> = (0..3)
        .map(|i| {
            NodeProcess::start(&format!("node-{i}"), &dir.path().join(i.to_string()), &["--load-window-secs", "3"])
        })
        .collect();
    let fleet = Arc::new(TestPlatform::new(&nodes.iter().collect::<Vec<_>>(), None));
    let config = LoopConfig {
        interval: Duration::from_millis(500),
        policy: Policy { split_qps: 300.0, split_sustain_secs: 2, move_cooldown_secs: 5, ..Policy::default() },
        ..LoopConfig::default()
    };
    let board = StatusBoard::new(&mut prometheus_client::registry::Registry::default());
    let controller = ReshardingLoop::new(fleet.clone(), config, board.clone()).await.expect("controller starts");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let control_loop = tokio::spawn(controller.run(stopped));
    let addresses: Vec<String> = nodes.iter().map(|n| n.address.clone()).collect();
    let client = client_for(&nodes.iter().collect::<Vec<_>>());
    let held = |status: &ControllerStatus, node: &str| status.ranges.iter().filter(|r| r.owner == node).count();
    let moving = |status: &ControllerStatus, node: &str| status.moves.iter().any(|m| m.from == node || m.to == node);

    let workload = Workload::start(client.clone());
    wait_until("node-2 to own ranges, nothing moving", Duration::from_secs(90), async || {
        let status = board.snapshot();
        held(&status, "node-2") > 0 && status.moves.is_empty()
    })
    .await;
    let before = held(&board.snapshot(), "node-2");
    fleet.set_draining("node-2", true);
    wait_until("node-2 to drain", Duration::from_secs(90), async || {
        let status = board.snapshot();
        let state = status.nodes.iter().find(|n| n.node_id == "node-2").map(|n| n.node_state());
        state == Some(kvfleet_proto::v1::NodeState::Draining)
            && held(&status, "node-2") == 0
            && !moving(&status, "node-2")
    })
    .await;
    // What a DrainFirst update does next: stop the empty node. Load goes on; the two others
    // alone must own the whole key space and answer every acknowledged write.
    assert!(nodes[2].terminate().success(), "node-2 stops cleanly");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcome = workload.finish().await;
    verify(&client, &addresses[..2], &outcome).await;
    // Restarted (at its new revision, on Kubernetes) and taken back.
    nodes[2].spawn();
    fleet.set_draining("node-2", false);
    wait_until("node-2 back up", Duration::from_secs(30), async || {
        board.snapshot().nodes.iter().any(|n| n.node_id == "node-2" && n.state == "up")
    })
    .await;
    assert_all_acked_readable(&client, &outcome.acked).await;
    println!("node-2 held {before} ranges, drained to 0, restarted; {} ops, {} keys", outcome.ops, outcome.acked.len());
    stop.send(true).expect("the control loop listens");
    tokio::time::timeout(Duration::from_secs(60), control_loop)
        .await
        .expect("the control loop stops")
        .expect("the control loop did not panic")
        .expect("the control loop ends cleanly");
}

/// The same Zipfian hotspot on five nodes with three replicas per range (`--replicas 3`): the
/// controller splits the hot range through its log, spreads replicas over all five nodes (replica
/// moves as membership changes) and leaders over several, with no client error and no stale read;
/// idle, the cold ranges are aligned onto the same nodes and merged back through their logs;
/// every acknowledged write is read back at each stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zipfian_load_on_five_nodes_with_three_replicas_is_split_spread_and_merged_back() {
    replicated_hotspot(5, 3).await;
}

/// The same with five replicas per range on five nodes (every node holds every range).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zipfian_load_on_five_nodes_with_five_replicas_is_split_and_merged_back() {
    replicated_hotspot(5, 5).await;
}

async fn replicated_hotspot(nodes: usize, replicas: usize) {
    let dir = tempfile::tempdir().unwrap();
    // Every write waits for a majority of `replicas` fsyncs: on a slow disk the hot range's load
    // can hover around FAST_POLICY's 300 ops/s and never stay above it for the 2 s a split needs
    // (seen in CI). A third of it splits on any machine this suite runs on.
    let mut args: Vec<&str> = FAST_POLICY.to_vec();
    let at = args.iter().position(|a| *a == "--split-qps").expect("FAST_POLICY sets --split-qps");
    args[at + 1] = "100";
    let replicas_arg = replicas.to_string();
    args.extend(["--replicas", replicas_arg.as_str(), "--merge-delay-secs", "3"]);
    let playground = Playground::start(&dir.path().join("fleet"), nodes, &args, &[]);
    let workload = Workload::start(playground.client());
    wait_until_explained(
        "splits, replicas on every node, leaders on two, nothing in flight",
        Duration::from_secs(150),
        async || {
            let status = playground.status().await;
            let mut holders: Vec<&str> =
                status.ranges.iter().flat_map(|r| r.replicas.iter().map(String::as_str)).collect();
            holders.sort_unstable();
            holders.dedup();
            let done = status.ranges.len() >= 3
                && holders.len() == nodes
                && owners(&status) >= 2
                && status.moves.is_empty()
                && status.ranges.iter().all(|r| r.replicas.len() == replicas);
            if done {
                return Ok(());
            }
            let ranges: Vec<String> = status
                .ranges
                .iter()
                .map(|r| format!("{} led by {} on {:?}", r.range_id, r.owner, r.replicas))
                .collect();
            let events = &status.recent_events[status.recent_events.len().saturating_sub(8)..];
            Err(format!(
                "{} ranges [{}], {} leaders, moves {:?}, skips {:?}, conflicts {}, under-replicated {:?}, \
                 leaderless {:?}, last events {events:#?}",
                status.ranges.len(),
                ranges.join("; "),
                owners(&status),
                status.moves,
                status.skips,
                status.conflicts.len(),
                status.under_replicated,
                status.leaderless,
            ))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcome = workload.finish().await;
    let client = playground.client();
    assert!(outcome.errors.is_empty(), "client errors: {:?}", &outcome.errors[..outcome.errors.len().min(3)]);
    assert!(
        outcome.stale_reads.is_empty(),
        "stale reads: {:?}",
        &outcome.stale_reads[..outcome.stale_reads.len().min(3)]
    );
    assert!(outcome.acked.len() > 100, "only {} keys written", outcome.acked.len());
    assert_all_acked_readable(&client, &outcome.acked).await;
    let busiest = playground.status().await.ranges.len();

    // Idle, the ranges go cold: aligned and merged back, each still on its replicas.
    wait_until("cold replicated ranges to merge", Duration::from_secs(150), async || {
        let status = playground.status().await;
        status.ranges.len() < busiest && status.ranges.iter().all(|r| r.replicas.len() == replicas)
    })
    .await;
    let status = playground.status().await;
    assert!(
        status.recent_events.iter().any(|e| e.contains("through their logs")),
        "no merge through the logs in {:?}",
        status.recent_events
    );
    assert_all_acked_readable(&client, &outcome.acked).await;
    println!(
        "{nodes} nodes, {replicas} replicas: {} ops, {} keys; {} ranges after merging: {:#?}",
        outcome.ops,
        outcome.acked.len(),
        status.ranges.len(),
        status.recent_events
    );
}
