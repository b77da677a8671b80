//! The resharding loop on replicated fleets, on real node processes under a checked history: the
//! controller creates range 1 on three nodes, splits it through the log, hands leaders over to
//! balance load, and moves a draining node's replicas away as membership changes, while the
//! controller crashes in the middle of its moves (with the tasks driving them) and a replica is
//! killed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfleet_e2e::history::{HistoryWorkload, keys};
use kvfleet_e2e::replicated::ReplicatedFleet;
use kvfleet_e2e::{NodeProcess, TestPlatform, wait_until};
use kvfleet_planner::Policy;
use kvfleet_proto::v1::{
    BootstrapRequest, ChangeReplicasRequest, CreateReplicaRequest, RangeDescriptor, ReadConsistency, Replica,
    ReplicaChange, ReplicaMembership, replica_change,
};
use kvfleet_resharding::resharding_loop::{LoopConfig, ReshardingLoop};
use kvfleet_resharding::state::InFlightMove;
use kvfleet_resharding::status::StatusBoard;
use tokio::sync::watch;

/// A controller on a runtime of its own: crashing it drops the runtime, and with it every task
/// it was driving a move with (as a kill -9 of its process would). What it saved stays in the
/// platform.
struct Controller {
    runtime: Option<tokio::runtime::Runtime>,
    _shutdown: watch::Sender<bool>,
}

impl Controller {
    fn start(platform: Arc<TestPlatform>, config: LoopConfig, board: StatusBoard) -> Self {
        kvfleet_e2e::log_in_process_controller();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("the controller's runtime");
        let (shutdown, stop) = watch::channel(false);
        runtime.spawn(async move {
            let controller = ReshardingLoop::new(platform, config, board).await.expect("the controller starts");
            controller.run(stop).await
        });
        Controller { runtime: Some(runtime), _shutdown: shutdown }
    }

    fn crash(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn config() -> LoopConfig {
    let policy = Policy {
        split_qps: 150.0,
        split_sustain_secs: 2,
        move_cooldown_secs: 3,
        max_concurrent_moves: 2,
        ..Policy::default()
    };
    LoopConfig {
        interval: Duration::from_millis(300),
        policy,
        rpc_timeout: Duration::from_secs(5),
        replication_factor: 3,
        ..LoopConfig::default()
    }
}

/// Every range as its leader reports it (ranges whose leader did not answer are missing).
async fn ranges_by_leader(fleet: &ReplicatedFleet) -> Vec<RangeDescriptor> {
    let nodes: Vec<(String, String)> = fleet.nodes.iter().map(|n| (n.node_id.clone(), n.address.clone())).collect();
    led_ranges(&nodes).await
}

/// Every range as its leader reports it, asking the nodes (node id, address).
async fn led_ranges(nodes: &[(String, String)]) -> Vec<RangeDescriptor> {
    let mut found: Vec<RangeDescriptor> = Vec::new();
    for (node_id, address) in nodes {
        let Some(ranges) = list_ranges(address).await else { continue };
        for desc in ranges {
            let leads = kvfleet_resharding::observe::leads(&desc, node_id);
            if leads && !found.iter().any(|d| d.range_id == desc.range_id) {
                found.push(desc);
            }
        }
    }
    found.sort_by(|a, b| a.start_key.cmp(&b.start_key));
    found
}

/// Whether `ranges` tile the key space, each with exactly three voters and none on `not_on`.
fn settled(ranges: &[RangeDescriptor], not_on: &str) -> bool {
    kvfleet_e2e::tile_the_key_space(ranges)
        && ranges.iter().all(|d| {
            d.replicas.len() == 3
                && d.replicas.iter().all(|r| r.membership() == ReplicaMembership::Voter && r.node_id != not_on)
        })
}

/// `count` empty nodes and a controller creating them a fleet of factor 3.
fn controlled_fleet(count: usize) -> (ReplicatedFleet, Arc<TestPlatform>, StatusBoard, Controller) {
    controlled_fleet_with(count, config())
}

/// `controlled_fleet` with a controller configured by `config`.
fn controlled_fleet_with(
    count: usize,
    config: LoopConfig,
) -> (ReplicatedFleet, Arc<TestPlatform>, StatusBoard, Controller) {
    let fleet = ReplicatedFleet::start_empty(count);
    let nodes: Vec<&NodeProcess> = fleet.nodes.iter().collect();
    let platform = Arc::new(TestPlatform::new(&nodes, None));
    let board = StatusBoard::new(&mut prometheus_client::registry::Registry::default());
    let controller = Controller::start(platform.clone(), config, board.clone());
    (fleet, platform, board, controller)
}

/// Waits until load has split range 1 through its log, each half on the same three voters.
async fn wait_for_split(fleet: &ReplicatedFleet) {
    wait_until("the controller to split range 1 under load", Duration::from_secs(60), async || {
        let ranges = ranges_by_leader(fleet).await;
        ranges.len() >= 2 && settled(&ranges, "none")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_controller_replicates_splits_balances_and_drains_with_crashes_at_its_moves() {
    let (mut fleet, platform, board, mut controller) = controlled_fleet(4);

    // Range 1 on the first three nodes; the fourth holds nothing.
    let leader = fleet.leader(None).await;
    assert!(leader < 3, "range 1 is led by one of the three nodes it was created on");
    assert_eq!(fleet.ranges_on(3).await.map(|r| r.len()), Some(0), "the fourth node holds no replica yet");
    // Asked again (an answer the controller lost), a node that made range 1 says OK; asked with
    // other replicas, it refuses before writing anything.
    let made = fleet.ranges_on(leader).await.expect("the leader answers");
    let replicas = made.iter().find(|d| d.range_id == 1).expect("range 1").replicas.clone();
    let mut admin = fleet.nodes[leader].admin();
    let again = admin.bootstrap(BootstrapRequest { replicas: replicas.clone() }).await;
    assert!(again.is_ok(), "the same bootstrap again: {again:?}");
    let mut other = replicas.clone();
    other[2] = Replica {
        node_id: fleet.nodes[3].node_id.clone(),
        address: fleet.nodes[3].address.clone(),
        ..Default::default()
    };
    if other.iter().all(|r| r.node_id != fleet.nodes[leader].node_id) {
        other[0] = replicas.iter().find(|r| r.node_id == fleet.nodes[leader].node_id).cloned().expect("the leader");
    }
    let refused = admin.bootstrap(BootstrapRequest { replicas: other }).await.expect_err("another bootstrap");
    assert!(refused.message().contains("bootstrapped only once"), "{refused:?}");
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(48), 6, 4);
    workload.add_readers_with(&client, 2, 300, ReadConsistency::Follower);

    // Load splits range 1 through its log; each half stays on the same three nodes.
    wait_for_split(&fleet).await;

    // The halves' load all lands on one leader: the controller hands leaders to other replicas.
    wait_until("the controller to spread the leaders by load", Duration::from_secs(60), async || {
        let ranges = ranges_by_leader(&fleet).await;
        let mut leaders: Vec<&str> = ranges.iter().filter_map(|d| d.leader()).map(|r| r.node_id.as_str()).collect();
        leaders.sort_unstable();
        leaders.dedup();
        let transferred =
            board.snapshot().recent_events.iter().any(|e| e.contains("leadership") && e.contains("balance load"));
        leaders.len() >= 2 && settled(&ranges, "none") && transferred
    })
    .await;

    // Drain a node holding replicas, crash the controller twice while it moves them (at
    // different instants of a move), and kill another replica once meanwhile.
    // A balance move may be in flight already: the crashes aim at the moves the drain starts.
    let drained = fleet.nodes[0].node_id.clone();
    let moved_before: Vec<u64> =
        platform.state().map(|s| s.moves.iter().map(|m| m.move_id).collect()).unwrap_or_default();
    platform.set_draining(&drained, true);
    let draining_move = |m: &InFlightMove| m.from == drained && !moved_before.contains(&m.move_id);
    let mut crashed_mid_move = 0;
    for (crash, delay) in [Duration::from_millis(150), Duration::from_millis(1200)].into_iter().enumerate() {
        let moving = async || platform.state().is_some_and(|s| s.moves.iter().any(draining_move));
        let started = Instant::now();
        while !moving().await && started.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !moving().await {
            break;
        }
        tokio::time::sleep(delay).await;
        let in_flight = platform.state().map(|s| s.moves).unwrap_or_default();
        eprintln!("crashing the controller {delay:?} into its move: {in_flight:?}");
        crashed_mid_move += usize::from(in_flight.iter().any(draining_move));
        controller.crash();
        if crash == 0 {
            fleet.nodes[1].kill9();
            tokio::time::sleep(Duration::from_secs(1)).await;
            fleet.nodes[1].spawn();
        }
        controller = Controller::start(platform.clone(), config(), board.clone());
    }
    assert!(crashed_mid_move >= 1, "no crash hit a move off the drained node in flight");
    wait_until("every replica to leave the drained node", Duration::from_secs(120), async || {
        let ranges = ranges_by_leader(&fleet).await;
        settled(&ranges, &drained)
    })
    .await;
    wait_until("the drained node to delete its copies", Duration::from_secs(30), async || {
        fleet.ranges_on(0).await.is_some_and(|r| r.is_empty())
    })
    .await;
    wait_until("the controller to record every move finished", Duration::from_secs(30), async || {
        platform.state().is_some_and(|s| s.moves.is_empty())
    })
    .await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = workload.finish_checked(&client).await;
    assert!(report.writes > 100, "the load went on: {} writes", report.writes);
    controller.crash();
}

/// A learner on a node that is not a member is removed. Then a node taken out of the fleet
/// without a drain (a StatefulSet shrunk by hand: its pod is
/// deleted, its voters stay in their ranges' memberships): the controller says so and
/// re-creates those replicas on the members by membership changes, through a crash of the
/// controller in the middle of one (the next one resumes it although the node is no longer
/// anywhere in its list), under a checked history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_removed_without_a_drain_has_its_replicas_recreated_on_members() {
    let (mut fleet, platform, board, mut controller) = controlled_fleet(4);
    fleet.leader(None).await;
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(48), 4, 4);
    workload.add_readers_with(&client, 2, 300, ReadConsistency::Follower);
    wait_for_split(&fleet).await;

    let (events, mut heard) = tokio::sync::mpsc::unbounded_channel();
    board.set_event_sink(events);

    // A learner on a node that is not a member (as a move leaves one whose target was scaled
    // away): the controller removes it.
    let stranger = fleet.add_node();
    let stranger_id = fleet.nodes[stranger].node_id.clone();
    // The controller may split the chosen range meanwhile (the stranger's empty replica then
    // overlaps the halves) or change its membership: try again, on any range, for a while.
    let (mut added, mut refused): (Option<u64>, Vec<String>) = (None, Vec::new());
    let trying = Instant::now();
    while added.is_none() && trying.elapsed() < Duration::from_secs(30) {
        let ranges = ranges_by_leader(&fleet).await;
        let voters_only = |d: &&RangeDescriptor| d.replicas.iter().all(|r| r.membership() == ReplicaMembership::Voter);
        let leader_of = |d: &RangeDescriptor| {
            let leader = d.leader().map(|r| r.node_id.clone()).unwrap_or_default();
            fleet.nodes.iter().position(|n| n.node_id == leader)
        };
        if let Some((desc, leader)) = ranges.iter().filter(voters_only).find_map(|d| Some((d, leader_of(d)?))) {
            let mut admin = fleet.nodes[stranger].admin();
            match admin.create_replica(CreateReplicaRequest { range: Some(desc.clone()) }).await {
                Err(status) => refused.push(format!("CreateReplica of range {}: {status:?}", desc.range_id)),
                Ok(_) => {
                    let learner = Replica {
                        node_id: stranger_id.clone(),
                        address: fleet.nodes[stranger].address.clone(),
                        ..Default::default()
                    };
                    let change = ChangeReplicasRequest {
                        range_id: desc.range_id,
                        expected_conf_version: desc.conf_version,
                        changes: vec![ReplicaChange {
                            kind: replica_change::Kind::AddLearner as i32,
                            replica: Some(learner),
                        }],
                    };
                    match fleet.nodes[leader].admin().change_replicas(change).await {
                        Ok(_) => added = Some(desc.range_id),
                        Err(status) => refused.push(format!("ChangeReplicas of range {}: {status:?}", desc.range_id)),
                    }
                }
            }
        }
        if added.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if !refused.is_empty() {
        eprintln!("refused before the learner was added: {refused:#?}");
    }
    let with_learner = added.unwrap_or_else(|| panic!("no learner added on the stranger in 30 s: {refused:#?}"));
    wait_until("the controller to remove the stranger's learner", Duration::from_secs(30), async || {
        let ranges = ranges_by_leader(&fleet).await;
        let range = ranges.iter().find(|d| d.range_id == with_learner);
        range.is_some_and(|d| d.replicas.iter().all(|r| r.node_id != stranger_id))
    })
    .await;

    // Range 1 was made on the first three nodes: the first one votes in ranges.
    let gone = 0;
    let gone_id = fleet.nodes[gone].node_id.clone();
    let held = fleet.ranges_on(gone).await.expect("the node answers").len();
    assert!(held > 0, "the node to remove holds replicas");
    // A move off the node may have started before it left (to balance): the crashes aim at the
    // moves its leaving starts.
    let moved_before: Vec<u64> =
        platform.state().map(|s| s.moves.iter().map(|m| m.move_id).collect()).unwrap_or_default();
    fleet.nodes[gone].kill9();
    platform.remove_member(&gone_id);
    let off_the_gone_node = |m: &InFlightMove| m.from == gone_id && !moved_before.contains(&m.move_id);

    // Crash the controller twice while it moves replicas off the removed node: at once, and
    // some way into the moves.
    let mut crashed_mid_move = 0;
    for delay in [Duration::ZERO, Duration::from_millis(700)] {
        let moving_off = async || platform.state().is_some_and(|s| s.moves.iter().any(off_the_gone_node));
        let started = Instant::now();
        while !moving_off().await && started.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(delay).await;
        let in_flight = platform.state().map(|s| s.moves).unwrap_or_default();
        eprintln!("crashing the controller {delay:?} into its moves off {gone_id}: {in_flight:?}");
        crashed_mid_move += usize::from(in_flight.iter().any(off_the_gone_node));
        controller.crash();
        controller = Controller::start(platform.clone(), config(), board.clone());
    }
    assert!(crashed_mid_move >= 1, "no crash hit a move off the removed node in flight");
    // The controller said so as it went (the last one started may not have yet).
    let (mut warned, mut learner_removed) = (false, false);
    let listening = Instant::now();
    while !(warned && learner_removed) && listening.elapsed() < Duration::from_secs(30) {
        let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(1), heard.recv()).await else { continue };
        warned |= event.reason == "NodeLeftFleet" && event.text.contains(&format!("node {gone_id} is not a member"));
        learner_removed |= event.text.contains(&format!("range {with_learner}'s learner on {stranger_id}"));
    }
    assert!(warned, "the controller says the node left the fleet");
    assert!(learner_removed, "the controller says it removed the stranger's learner");

    wait_until("every replica on the three members", Duration::from_secs(120), async || {
        settled(&ranges_by_leader(&fleet).await, &gone_id)
    })
    .await;
    wait_until("the controller to record every move finished", Duration::from_secs(30), async || {
        platform.state().is_some_and(|s| s.moves.is_empty())
    })
    .await;
    wait_until("the controller to report no range short of voters", Duration::from_secs(10), async || {
        board.snapshot().under_replicated.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = workload.finish_checked(&client).await;
    assert!(report.writes > 100, "the load went on: {} writes", report.writes);
    println!("{held} replicas on the removed node, re-created on members");
    controller.crash();
}

/// A node removed without a drain comes back (its pod, with its old disk, and its place among
/// the members: the StatefulSet scaled back up) while the controller is moving its replicas
/// off it: the moves finish or are overtaken, every range ends on three voters, the key space
/// stays tiled, and the history shows nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_node_added_back_while_its_replicas_move_off_it_loses_nothing() {
    let (mut fleet, platform, _board, controller) = controlled_fleet(4);
    fleet.leader(None).await;
    let client = fleet.client();
    let workload = HistoryWorkload::start(client.clone(), keys(48), 4, 4);
    wait_for_split(&fleet).await;

    let gone = 0;
    let gone_id = fleet.nodes[gone].node_id.clone();
    fleet.nodes[gone].kill9();
    platform.remove_member(&gone_id);
    let moving_off = async || platform.state().is_some_and(|s| s.moves.iter().any(|m| m.from == gone_id));
    wait_until("a move off the removed node to start", Duration::from_secs(60), moving_off).await;
    fleet.nodes[gone].spawn();
    platform.add_member(&fleet.nodes[gone]);

    wait_until("every range on three voters, every move finished", Duration::from_secs(120), async || {
        let ranges = ranges_by_leader(&fleet).await;
        settled(&ranges, "none") && platform.state().is_some_and(|s| s.moves.is_empty())
    })
    .await;
    kvfleet_e2e::assert_one_owner_per_key(&fleet.addresses()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = workload.finish_checked(&client).await;
    assert!(report.writes > 100, "the load went on: {} writes", report.writes);
    controller.crash();
}

/// The playground as a user runs it (`--replicas 3`, real processes): split under load, the
/// controller killed (-9) and restarted, one node killed (-9) and restarted by the playground;
/// the history checker finds nothing, and every range keeps three voters, one on each node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replicated_playground_splits_under_load_through_kills() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--replicas",
        "3",
        "--interval-secs",
        "0.5",
        "--load-window-secs",
        "3",
        "--split-qps",
        "150",
        "--split-sustain-secs",
        "2",
        "--move-cooldown-secs",
        "3",
    ];
    let mut playground = kvfleet_e2e::Playground::start(&dir.path().join("fleet"), 3, &args, &[]);
    let client = playground.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(48), 6, 4);
    workload.add_readers_with(&client, 2, 400, ReadConsistency::Follower);
    let split = async || {
        let status = playground.status().await;
        status.ranges.len() >= 2
    };
    wait_until("the playground to split under load", Duration::from_secs(60), split).await;

    playground.kill9_controller();
    let victim = playground.nodes[1].0.clone();
    let pid = playground.node_pid(&victim).expect("the node's pid");
    let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    tokio::time::sleep(Duration::from_secs(1)).await;
    playground.spawn();
    let round = playground.status().await.round;
    wait_until("the restarted controller's rounds", Duration::from_secs(30), async || {
        let status = playground.status().await;
        status.round > round + 2 && status.replication_factor == 3
    })
    .await;

    let report = workload.finish_checked(&client).await;
    assert!(report.writes > 100, "the load went on: {} writes", report.writes);
    let nodes = playground.nodes.clone();
    wait_until("every range to have three voters and a leader", Duration::from_secs(30), async || {
        let led = led_ranges(&nodes).await;
        led.len() >= 2
            && settled(&led, "none")
            && led.iter().all(|d| d.replicas.iter().all(|r| nodes.iter().any(|(n, _)| *n == r.node_id)))
    })
    .await;
    assert_eq!(playground.stop().code(), Some(0), "Ctrl-C (SIGTERM) stops the playground cleanly");
}

async fn list_ranges(address: &str) -> Option<Vec<RangeDescriptor>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let mut admin = kvfleet_proto::v1::admin_client::AdminClient::new(channel);
    Some(admin.list_ranges(kvfleet_proto::v1::ListRangesRequest {}).await.ok()?.into_inner().ranges)
}

/// A node whose disk is replaced (kill -9, data directory deleted, started again with the same
/// id and address) under a checked history: the controller finds its replicas listed but
/// holding nothing, removes them and adds them back (no other node can take them), through the
/// node's kill -9 in the middle of it, and the re-created replicas are real voters: with another
/// node killed afterwards, writes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_lost_with_a_disk_are_recreated_on_their_node() {
    let (mut fleet, platform, _board, _controller) = controlled_fleet(3);
    fleet.leader(None).await;
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(48), 4, 4);
    workload.add_readers_with(&client, 2, 500, ReadConsistency::Follower);
    wait_for_split(&fleet).await;

    let wiped = 2;
    fleet.nodes[wiped].kill9();
    std::fs::remove_dir_all(&fleet.nodes[wiped].data_dir).expect("delete the node's data");
    fleet.nodes[wiped].spawn();
    assert_eq!(fleet.ranges_on(wiped).await.map(|r| r.len()), Some(0), "the new disk holds nothing");
    // Once a re-creation is under way, the node restarts in the middle of it (kill -9).
    let recreating = async || platform.state().is_some_and(|s| s.moves.iter().any(|m| m.from == m.to));
    let started = Instant::now();
    while !recreating().await && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recreating().await, "no re-creation started");
    tokio::time::sleep(Duration::from_millis(400)).await;
    fleet.nodes[wiped].kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.nodes[wiped].spawn();
    wait_until("the lost replicas to be re-created on the wiped node", Duration::from_secs(120), async || {
        let ranges = ranges_by_leader(&fleet).await;
        let held = fleet.ranges_on(wiped).await.unwrap_or_default();
        settled(&ranges, "none") && ranges.iter().all(|d| held.iter().any(|h| h.range_id == d.range_id))
    })
    .await;

    // The re-created replicas vote: with another node down, every range keeps a majority.
    let other = (0..3).find(|&i| i != wiped).expect("another node");
    let before = workload.space.acked_writes();
    fleet.nodes[other].kill9();
    tokio::time::sleep(Duration::from_secs(5)).await;
    workload.space.wait_for_writes_past(before + 10, "writes stopped with the re-created replicas as votes").await;
    fleet.nodes[other].spawn();
    let report = workload.finish_checked(&client).await;
    assert!(report.writes > 100, "the load went on: {} writes", report.writes);
}

/// A node gone for good (kill -9, never restarted within `replace_down_after`): the controller
/// re-creates its replicas on the fourth node, by moves from the dead node (its replica demoted,
/// then removed, with the remaining voters' majority), under a checked history. Then the dead
/// node comes back with its old disk: told by the ranges' leaders that it was removed, it drops
/// every copy, and nothing it held is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_down_for_good_has_its_replicas_replaced_and_drops_them_when_it_returns() {
    let replace_down_after = Duration::from_secs(3);
    let (mut fleet, platform, _board, controller) =
        controlled_fleet_with(4, LoopConfig { replace_down_after, ..config() });
    fleet.leader(None).await;
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(48), 4, 4);
    workload.add_readers_with(&client, 2, 300, ReadConsistency::Follower);
    wait_for_split(&fleet).await;

    // Range 1 was made on the first three nodes: the first one holds replicas.
    let dead = 0;
    let dead_id = fleet.nodes[dead].node_id.clone();
    let held = fleet.ranges_on(dead).await.expect("the node answers").len();
    assert!(held > 0, "the node to kill holds replicas");
    fleet.nodes[dead].kill9();
    let killed = Instant::now();
    wait_until("the dead node's replicas to be re-created elsewhere", Duration::from_secs(120), async || {
        let ranges = ranges_by_leader(&fleet).await;
        settled(&ranges, &dead_id)
    })
    .await;
    let replaced_after = killed.elapsed();
    assert!(
        replaced_after >= replace_down_after,
        "replicas were replaced {replaced_after:?} after the kill, before the {replace_down_after:?} allowed"
    );
    wait_until("the controller to record every move finished", Duration::from_secs(30), async || {
        platform.state().is_some_and(|s| s.moves.is_empty())
    })
    .await;

    // Back with its old disk, the node learns it was removed from each range and drops it (the
    // controller may meanwhile give it new replicas to balance the counts: those are members).
    fleet.nodes[dead].spawn();
    wait_until("the returned node to drop every removed replica", Duration::from_secs(60), async || {
        let Some(held) = fleet.ranges_on(dead).await else { return false };
        let ranges = ranges_by_leader(&fleet).await;
        held.iter().all(|copy| {
            ranges.iter().any(|d| d.range_id == copy.range_id && d.replicas.iter().any(|r| r.node_id == dead_id))
        })
    })
    .await;
    wait_until("every range on three voters", Duration::from_secs(60), async || {
        settled(&ranges_by_leader(&fleet).await, "none")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = workload.finish_checked(&client).await;
    assert!(report.writes > 100, "the load went on: {} writes", report.writes);
    println!("{held} replicas on the dead node, replaced {replaced_after:?} after its kill");
    controller.crash();
}

/// Merges on a replicated fleet: load splits range 1 on four nodes, and the controller spreads
/// the copies over the fourth node, so the halves' replicas end up on different nodes. Then the
/// controller (restarted with a policy under which every range is cold) aligns them by replica
/// moves and merges them back through their logs, under a checked history, while the node
/// coordinating the merge is killed right after it froze the right range and the controller is
/// crashed with it: the next controller finishes the frozen merge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_replicated_ranges_are_aligned_and_merged_back_through_a_crash_mid_merge() {
    let (mut fleet, platform, board, controller) = controlled_fleet(4);
    fleet.leader(None).await;
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(48), 6, 4);
    workload.add_readers_with(&client, 2, 700, ReadConsistency::Follower);
    wait_for_split(&fleet).await;
    wait_until("the controller to give the fourth node replicas", Duration::from_secs(90), async || {
        fleet.ranges_on(3).await.is_some_and(|r| !r.is_empty())
    })
    .await;

    // Every node crashes (once) right after it freezes a range for a merge it coordinates.
    let marks = tempfile::tempdir().expect("a temporary directory");
    let mark = |index: usize| marks.path().join(format!("crashed-{index}"));
    for index in 0..4 {
        fleet.arm_crash_once(index, "merge-after-freeze", &mark(index));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    controller.crash();
    let cold = Policy { split_qps: 1e9, merge_below_qps: 1e9, merge_delay_secs: 3, ..config().policy };
    let cold_config = LoopConfig { policy: cold, ..config() };
    let mut controller = Controller::start(platform.clone(), cold_config.clone(), board.clone());
    let started = Instant::now();
    let crashed = |index: usize| mark(index).exists();
    while !(0..4).any(crashed) && started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let coordinator = (0..4).find(|&index| crashed(index)).expect("a node froze a range for a merge within 120 s");
    controller.crash();
    tokio::time::sleep(Duration::from_secs(1)).await;
    fleet.nodes[coordinator].kill9();
    fleet.nodes[coordinator].spawn();
    let frozen = async || {
        let ranges = ranges_by_leader(&fleet).await;
        ranges.iter().any(|d| d.merge_freeze_index > 0)
    };
    eprintln!("node {coordinator} crashed after a freeze; a range frozen for the merge: {}", frozen().await);
    controller = Controller::start(platform.clone(), cold_config, board.clone());

    let until = Instant::now() + Duration::from_secs(180);
    loop {
        fleet.restart_stopped();
        let ranges = ranges_by_leader(&fleet).await;
        if ranges.len() == 1 && settled(&ranges, "none") {
            break;
        }
        if Instant::now() > until {
            panic!(
                "the ranges did not merge back into one on three voters within 180 s: ranges {ranges:?}; the \
                 controller's state {:?}; its status {:?}",
                platform.state(),
                board.snapshot()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until("the controller's event of the merge", Duration::from_secs(30), async || {
        board.snapshot().recent_events.iter().any(|e| e.contains("through their logs"))
    })
    .await;
    let report = workload.finish_checked(&client).await;
    assert!(report.writes > 100, "the load went on: {} writes", report.writes);
    controller.crash();
}

/// A merge frozen with a replica of its right range on a node lost for good: the merge needs
/// every replica, so it can never finish, and the frozen range would serve nothing for ever.
/// The node coordinating the merge dies right after the freeze, a second node is killed for good
/// before the coordinator comes back, and a controller starts: it undoes the freeze (the left
/// range refuses the merge for good, then the right one is thawed; the node doing it dies once
/// between the two), the range serves again, the
/// dead node's replicas are re-created on the fourth node, and the two ranges still merge by
/// hand afterwards; all under a checked history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merge_frozen_with_a_replica_on_a_node_lost_for_good_is_undone_and_the_range_serves_again() {
    let replace_down_after = Duration::from_secs(3);
    // No split or merge of the controller's own: only the one made by hand below.
    let still = Policy { split_qps: 1e9, merge_below_qps: 0.0, ..config().policy };
    let still_config = LoopConfig { replace_down_after, policy: still, ..config() };
    let (mut fleet, platform, board, controller) = controlled_fleet_with(4, still_config.clone());
    fleet.leader(None).await;
    wait_until("range 1 on three voters", Duration::from_secs(60), async || {
        settled(&ranges_by_leader(&fleet).await, "none")
    })
    .await;
    controller.crash();
    let mut voters: Vec<String> =
        ranges_by_leader(&fleet).await[0].replicas.iter().map(|r| r.node_id.clone()).collect();
    voters.sort();
    let first_three: Vec<String> = fleet.nodes[..3].iter().map(|n| n.node_id.clone()).collect();
    assert_eq!(voters, first_three, "range 1 is made on the first three nodes");
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(48), 4, 4);
    workload.add_readers_with(&client, 2, 300, ReadConsistency::Follower);

    let FrozenMerge { right_id, coordinator, down: lost, marks } = freeze_a_merge_with_a_holder_down(&mut fleet).await;
    // Lost for good: the merge can never have every replica.
    let lost_id = fleet.nodes[lost].node_id.clone();
    // A key of the right range that the history does not write: a write cut off here must not
    // surprise its checker if it is applied later.
    let put = || client.put(bytes::Bytes::from("probe-after-freeze"), bytes::Bytes::from("thawed"));
    let early = tokio::time::timeout(Duration::from_secs(2), put()).await;
    assert!(!matches!(early, Ok(Ok(_))), "the frozen range took a write");

    // Whichever survivor undoes the freeze dies once between the fence and the thaw: asked
    // again, the fenced left range answers alike and the thaw follows.
    let undone_mark = marks.path().join("undoing");
    for index in [coordinator, (coordinator + 2) % 3] {
        fleet.arm_crash_once(index, "merge-abort-after-fence", &undone_mark);
    }
    let controller = Controller::start(platform.clone(), still_config, board.clone());
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        // The survivors only: the lost node must stay silent.
        for index in [coordinator, (coordinator + 2) % 3] {
            if !fleet.nodes[index].is_running() {
                fleet.nodes[index].kill9();
                fleet.nodes[index].spawn();
            }
        }
        let ranges = ranges_by_leader(&fleet).await;
        if ranges.len() == 2 && ranges.iter().all(|d| d.merge_freeze_index == 0) && settled(&ranges, &lost_id) {
            break;
        }
        assert!(
            Instant::now() < until,
            "the freeze was not undone and the lost node's replicas re-created within 120 s: {ranges:?}; the \
             controller's status {:?}",
            board.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(undone_mark.exists(), "no node died between the fence and the thaw");
    put().await.expect("the thawed range takes writes");
    told_of_the_undo(&board, right_id).await;
    controller.crash();
    undone_then_merged_again(&fleet, &platform, &board, &lost_id).await;
    let report = workload.finish_checked(&client).await;
    assert!(report.writes > 100, "the load went on: {} writes", report.writes);
}

/// Splits range 1 at key024 through its leader; the right half's id.
async fn split_range_1_at_key024(fleet: &mut ReplicatedFleet) -> u64 {
    let leader = fleet.leader(None).await;
    let split = kvfleet_proto::v1::SplitRangeRequest {
        range_id: 1,
        split_key: bytes::Bytes::from("key024"),
        ..Default::default()
    };
    let right = fleet.nodes[leader].admin().split_range(split).await.expect("the leader splits").into_inner();
    right.right.expect("the right half").range_id
}

/// The first of nodes `among` found down within 5 s: the one that froze the right range and died.
async fn the_node_down(fleet: &mut ReplicatedFleet, among: std::ops::Range<usize>) -> usize {
    for _ in 0..50 {
        if let Some(index) = among.clone().find(|&index| !fleet.nodes[index].is_running()) {
            return index;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("none of nodes {among:?} died after freezing the right range");
}

/// Merges range `right_id` back into range 1, as a task (`merge_replicated`, 60 s at most).
fn start_merging(
    fleet: &ReplicatedFleet,
    right_id: u64,
) -> tokio::task::JoinHandle<Result<RangeDescriptor, kvfleet_resharding::replica_merges::ReplicaMergeError>> {
    let seeds = fleet.addresses();
    tokio::spawn(async move {
        let clients = kvfleet_resharding::observe::NodeClients::default();
        kvfleet_resharding::replica_merges::merge_replicated(&clients, 1, right_id, &seeds, Duration::from_secs(60))
            .await
    })
}

/// Three nodes and a controller that made range 1 on them, crashed; returns the controller
/// settings to start it again with: no split or merge of its own.
async fn three_nodes_holding_range_1() -> (ReplicatedFleet, Arc<TestPlatform>, StatusBoard, LoopConfig) {
    let still = Policy { split_qps: 1e9, merge_below_qps: 0.0, ..config().policy };
    let still_config = LoopConfig { policy: still, ..config() };
    let (mut fleet, platform, board, controller) = controlled_fleet_with(3, still_config.clone());
    fleet.leader(None).await;
    wait_until("range 1 on three voters", Duration::from_secs(60), async || {
        settled(&ranges_by_leader(&fleet).await, "none")
    })
    .await;
    controller.crash();
    (fleet, platform, board, still_config)
}

/// Waits (30 s) for the controller's event telling of range `right_id`'s freeze undone: it is
/// recorded after the nodes have thawed.
async fn told_of_the_undo(board: &StatusBoard, right_id: u64) {
    wait_until("an event telling of the undone freeze", Duration::from_secs(30), async || {
        let events = board.snapshot().recent_events;
        events.iter().any(|e| e.contains(&format!("range {right_id}")) && e.contains("freeze undone"))
    })
    .await;
}

/// Has a controller with a cold policy merge range 1 and range `right_id` again (the left range
/// refused that freeze only), on three voters, none on node `not_on`.
async fn undone_then_merged_again(
    fleet: &ReplicatedFleet,
    platform: &Arc<TestPlatform>,
    board: &StatusBoard,
    not_on: &str,
) {
    let cold = Policy { split_qps: 1e9, merge_below_qps: 1e9, merge_delay_secs: 3, ..config().policy };
    let controller = Controller::start(platform.clone(), LoopConfig { policy: cold, ..config() }, board.clone());
    wait_until("the two ranges merged again", Duration::from_secs(120), async || {
        let ranges = ranges_by_leader(fleet).await;
        ranges.len() == 1 && settled(&ranges, not_on)
    })
    .await;
    controller.crash();
}

/// A merge of range 1's halves frozen on nodes 0-2, with one holder of them down.
struct FrozenMerge {
    right_id: u64,
    /// The node that froze the right half and died, started again.
    coordinator: usize,
    /// `(coordinator + 1) % 3`, killed before the coordinator was back.
    down: usize,
    /// Where the crash marks are (more can be put there).
    marks: tempfile::TempDir,
}

/// Splits range 1 (on nodes 0-2) at key024 and merges the halves back with every holder armed to
/// die right after it froze the right half for a merge it coordinates; kills node
/// `(coordinator + 1) % 3` before the coordinator starts again, so the merge cannot have every
/// replica; returns once the coordinator is back and holds the right half frozen into range 1.
async fn freeze_a_merge_with_a_holder_down(fleet: &mut ReplicatedFleet) -> FrozenMerge {
    let right_id = split_range_1_at_key024(fleet).await;
    // One mark for all: the first to reach the point dies, the others run on past it.
    let marks = tempfile::tempdir().expect("a temporary directory");
    let mark = marks.path().join("crashed");
    for index in 0..3 {
        fleet.arm_crash_once(index, "merge-after-freeze", &mark);
    }
    fleet.leader(None).await;
    fleet.leader_of(right_id, None).await;
    let merger = start_merging(fleet, right_id);
    wait_until("a node to freeze the right range and die", Duration::from_secs(60), async || mark.exists()).await;
    let coordinator = the_node_down(fleet, 0..3).await;
    let down = (coordinator + 1) % 3;
    fleet.nodes[down].kill9();
    fleet.nodes[coordinator].kill9();
    fleet.nodes[coordinator].spawn();
    fleet.leader_of(right_id, None).await;
    let frozen = fleet.ranges_on(coordinator).await.unwrap_or_default();
    let frozen = frozen.iter().find(|d| d.range_id == right_id).cloned();
    let frozen = frozen.filter(|d| d.merge_freeze_index > 0).expect("the right range is frozen on the coordinator");
    assert_eq!((frozen.merge_left_id, frozen.state()), (1, kvfleet_proto::v1::RangeState::Frozen));
    // The merge's own retries cannot finish it either.
    tokio::time::sleep(Duration::from_secs(2)).await;
    merger.abort();
    FrozenMerge { right_id, coordinator, down, marks }
}

/// A merge frozen while a replica's node is down for a while (a pod being rescheduled) is
/// undone once the node has been silent for the frozen-merge patience (10 s); the node comes
/// back in the middle of the undo, after the left range took its refusal of the merge and before
/// the right range is thawed, so the controller sees every replica answer and must not finish
/// the merge: it sees the left range changed and finishes the undo. The returning node's
/// replicas catch up on the refusal and the thaw from the logs (every copy agrees), the range
/// serves again, and the two ranges merge later; all under a checked history with follower
/// reads, which the returning node serves too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merge_frozen_while_a_node_is_down_is_undone_and_the_node_back_mid_undo_catches_up() {
    // No replica replaced: the node comes back.
    let (mut fleet, platform, board, still_config) = three_nodes_holding_range_1().await;
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(48), 4, 4);
    workload.add_readers_with(&client, 2, 300, ReadConsistency::Follower);

    let FrozenMerge { right_id, coordinator, down, marks } = freeze_a_merge_with_a_holder_down(&mut fleet).await;
    let survivors = [coordinator, (coordinator + 2) % 3];
    let frozen = fleet.ranges_on(coordinator).await.unwrap_or_default();
    let frozen = frozen.into_iter().find(|d| d.range_id == right_id).expect("the right range on the coordinator");

    // The survivor that undoes the freeze dies between the left range's refusal and the thaw.
    let undone_mark = marks.path().join("undoing");
    for index in survivors {
        fleet.arm_crash_once(index, "merge-abort-after-fence", &undone_mark);
    }
    let controller = Controller::start(platform.clone(), still_config.clone(), board.clone());
    wait_until("the undo to be cut off between its two steps", Duration::from_secs(90), async || undone_mark.exists())
        .await;
    // The controller dies too, with the undo it was retrying; nothing can thaw the range
    // meanwhile (one node of three answers).
    controller.crash();
    // Back in the gap: every replica answers now, and a new controller, which never saw a node
    // silent, must still not finish the merge: the left range it was to merge into changed.
    fleet.nodes[down].spawn();
    for index in survivors {
        if !fleet.nodes[index].is_running() {
            fleet.nodes[index].kill9();
            fleet.nodes[index].spawn();
        }
    }
    fleet.leader(None).await;
    let controller = Controller::start(platform.clone(), still_config, board.clone());
    let mut agreed = Vec::new();
    let until = Instant::now() + Duration::from_secs(120);
    while agreed.len() != 2 {
        let ranges = ranges_by_leader(&fleet).await;
        if ranges.len() == 2 && ranges.iter().all(|d| d.merge_freeze_index == 0) && settled(&ranges, "none") {
            // Every node's copies, the returning node's too, as their leaders report them.
            let mut copies = Vec::new();
            for index in 0..3 {
                copies.push(fleet.ranges_on(index).await.unwrap_or_default());
            }
            let same = |leader: &RangeDescriptor| {
                copies.iter().all(|on| {
                    on.iter().any(|d| {
                        d.range_id == leader.range_id
                            && d.generation == leader.generation
                            && d.state() == kvfleet_proto::v1::RangeState::Active
                            && d.merge_freeze_index == 0
                    })
                })
            };
            if ranges.iter().all(same) {
                agreed = ranges.clone();
            }
        }
        assert!(
            Instant::now() < until,
            "the freeze was not undone on every replica within 120 s: {ranges:?}; the controller's status {:?}",
            board.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(agreed[1].range_id, right_id, "the right range came back, not a merge: {agreed:?}");
    assert!(agreed[0].generation > frozen.merge_left_generation, "the left range took the merge's refusal: {agreed:?}");
    client
        .put(bytes::Bytes::from("probe-after-undo"), bytes::Bytes::from("thawed"))
        .await
        .expect("the thawed range takes writes");
    told_of_the_undo(&board, right_id).await;
    controller.crash();
    undone_then_merged_again(&fleet, &platform, &board, "none").await;
    let report = workload.finish_checked(&client).await;
    assert!(report.writes > 100, "the load went on: {} writes", report.writes);
}

/// A merge frozen on nodes 0-2 (range 1's halves) while node `old`, last heard on an earlier
/// version, is down; a controller running, which has tried to undo the freeze and was refused
/// for the node's version; a checked workload.
struct OldSilentFreeze {
    fleet: ReplicatedFleet,
    board: StatusBoard,
    controller: Controller,
    client: kvfleet_client::Client,
    workload: HistoryWorkload,
    right_id: u64,
    old: usize,
}

async fn frozen_past_an_old_silent_node() -> OldSilentFreeze {
    let (mut fleet, platform, board, still_config) = three_nodes_holding_range_1().await;
    // Node 2 plays an earlier version to the others from now on; nodes 0 and 1 die right after
    // freezing a range for a merge they coordinate.
    let old = 2;
    fleet.restart_with(old, vec![("KVFLEET_TEST_FEATURES".into(), String::new())]);
    let marks = tempfile::tempdir().expect("a temporary directory");
    let mark = marks.path().join("crashed");
    for index in 0..2 {
        fleet.arm_crash_once(index, "merge-after-freeze", &mark);
    }
    fleet.leader(None).await;
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(48), 4, 4);
    workload.add_readers_with(&client, 2, 300, ReadConsistency::Follower);

    let right_id = split_range_1_at_key024(&mut fleet).await;
    // Both ranges led by node 0, which then coordinates the merge.
    for range_id in [1, right_id] {
        let to_node_id = fleet.nodes[0].node_id.clone();
        wait_until("node 0 to lead the range", Duration::from_secs(30), async || {
            let leader = fleet.leader_of(range_id, None).await;
            if leader == 0 {
                return true;
            }
            let request = kvfleet_proto::v1::TransferLeaderRequest { range_id, to_node_id: to_node_id.clone() };
            let _ = fleet.nodes[leader].admin().transfer_leader(request).await;
            false
        })
        .await;
    }
    let merger = start_merging(&fleet, right_id);
    wait_until("a node to freeze the right range and die", Duration::from_secs(60), async || mark.exists()).await;
    // Node 0 as asked, or node 1 if leadership moved meanwhile (both are armed; node 2 is not).
    let coordinator = the_node_down(&mut fleet, 0..2).await;
    fleet.nodes[old].kill9();
    fleet.nodes[coordinator].kill9();
    fleet.nodes[coordinator].spawn();
    merger.abort();
    fleet.leader_of(right_id, None).await;
    let frozen_on = |ranges: Option<Vec<RangeDescriptor>>| {
        ranges.unwrap_or_default().into_iter().any(|d| d.range_id == right_id && d.is_frozen_for_merge())
    };
    assert!(frozen_on(fleet.ranges_on(coordinator).await), "the right range is frozen on the coordinator");

    // Past the frozen-merge patience (10 s) the controller tries to undo the freeze, and is told
    // why not; the range stays frozen.
    let controller = Controller::start(platform.clone(), still_config, board.clone());
    let refusal = "last heard running a version without it";
    wait_until("the undo to be refused for the node's version", Duration::from_secs(60), async || {
        board.snapshot().recent_events.iter().any(|e| e.contains(refusal))
    })
    .await;
    for index in [0, 1] {
        assert!(frozen_on(fleet.ranges_on(index).await), "node {index} still holds the right range frozen");
    }
    let probe = tokio::time::timeout(
        Duration::from_secs(2),
        client.put(bytes::Bytes::from("probe-while-frozen"), bytes::Bytes::from("x")),
    )
    .await;
    assert!(!matches!(probe, Ok(Ok(_))), "the frozen range took a write");

    OldSilentFreeze { fleet, board, controller, client, workload, right_id, old }
}

/// A merge frozen while a replica's node is down is not undone if that node was last heard
/// running a version that cannot apply the undo (played here by a node that tells its peers no
/// features): back on such a version, it would keep its copy frozen while the others took
/// writes. The controller's attempts are refused with the reason, the range waits frozen, and
/// once the node answers again the merge finishes; all under a checked history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_freeze_is_not_undone_past_a_silent_node_last_heard_on_an_earlier_version() {
    let OldSilentFreeze { mut fleet, board, controller, client, workload, old, .. } =
        frozen_past_an_old_silent_node().await;
    // The node answers again: the merge finishes.
    fleet.nodes[old].spawn();
    wait_until("the merge finished once every replica answers", Duration::from_secs(120), async || {
        let ranges = ranges_by_leader(&fleet).await;
        ranges.len() == 1 && settled(&ranges, "none")
    })
    .await;
    let events = board.snapshot().recent_events;
    assert!(!events.iter().any(|e| e.contains("freeze undone")), "a freeze was undone: {events:?}");
    controller.crash();
    // Writers that waited on the frozen range go on on the merged one for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = workload.finish_checked(&client).await;
    assert!(report.writes > 100, "the load went on: {} writes", report.writes);
}

/// The same freeze, and the node last heard on an earlier version is lost for good with its
/// disk: only a person can say so. `kvctl abort-merge --lost` is refused at once, naming the
/// node's version and the way out; `--decommissioned` undoes the freeze, the range serves
/// again from the two nodes left, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_freeze_past_a_node_on_an_earlier_version_is_undone_once_an_operator_says_its_disk_is_gone() {
    // The controller goes on trying (and being refused) meanwhile: its attempts and kvctl's take
    // turns on the ranges.
    let OldSilentFreeze { fleet, controller, client, workload, right_id, old, .. } =
        frozen_past_an_old_silent_node().await;
    let old_id = fleet.nodes[old].node_id.clone();
    let endpoints: Vec<String> = fleet.nodes.iter().map(|n| n.address.clone()).collect();
    let kvctl = |flag: &str| {
        let run = kvfleet_e2e::kvctl::run(&endpoints, &["abort-merge", &right_id.to_string(), flag, &old_id]);
        (run.succeeded, run.stdout, run.stderr)
    };

    let started = Instant::now();
    let (undone, _, refusal) = tokio::task::block_in_place(|| kvctl("--lost"));
    assert!(!undone, "undone past a node last heard on an earlier version");
    assert!(refusal.contains("last heard running a version without it"), "the refusal names why: {refusal}");
    assert!(refusal.contains("--decommissioned"), "the refusal names the way out: {refusal}");
    assert!(started.elapsed() < Duration::from_secs(30), "refused at once, not after retries: {:?}", started.elapsed());

    // (The node stays down: it is gone.)
    let (undone, said, refusal) = tokio::task::block_in_place(|| kvctl("--decommissioned"));
    assert!(undone, "kvctl abort-merge --decommissioned failed: {refusal}");
    assert!(said.contains("serves again"), "{said}");
    let (again, said, refusal) = tokio::task::block_in_place(|| kvctl("--decommissioned"));
    assert!(again && said.contains("nothing to undo"), "asked again: {said} {refusal}");
    client
        .put(bytes::Bytes::from("probe-after-undo"), bytes::Bytes::from("thawed"))
        .await
        .expect("the thawed range takes writes");
    wait_until("the right range's leader to hold it thawed", Duration::from_secs(30), async || {
        let ranges = ranges_by_leader(&fleet).await;
        ranges.iter().any(|d| d.range_id == right_id && !d.is_frozen_for_merge())
    })
    .await;
    // The writers held up by the freeze go on, on both ranges, with two of three replicas.
    let after_undo = workload.space.acked_writes();
    workload.space.wait_for_writes_past(after_undo + 50, "writes stopped after the freeze was undone").await;
    controller.crash();
    workload.finish_checked(&client).await;
}
