//! Moves of replicated ranges as membership changes, on real node processes: a replica moves to
//! a node that held none (created empty, added as a learner and caught up by a snapshot,
//! promoted in one joint change that removes the source) under load, with no write freeze and
//! every read and write checked by the history checker; the moved range then commits with the
//! new replica as a needed vote, and the removed one deletes its copy (the move made by `kvctl
//! move-replica`, as a user makes it). Interrupted anywhere
//! (the mover cut off at any instant, the leader killed, every replica crashing while it
//! applies a change), a move is finished by running it again, and nothing acknowledged is lost.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_e2e::history::{HistoryWorkload, keys};
use kvfleet_e2e::kvctl;
use kvfleet_e2e::replicated::ReplicatedFleet as Fleet;
use kvfleet_proto::v1::{ReadConsistency, ReplicaMembership};
use kvfleet_resharding::observe::NodeClients;
use kvfleet_resharding::replica_moves::move_replica;

const MOVE_DEADLINE: Duration = Duration::from_secs(60);

/// The replicas of range 1 as node `index` reports them: (node id, membership), sorted.
async fn members_on(fleet: &Fleet, index: usize) -> Option<Vec<(String, ReplicaMembership)>> {
    let ranges = fleet.ranges_on(index).await?;
    let range = ranges.into_iter().find(|d| d.range_id == 1)?;
    let mut members: Vec<_> = range.replicas.iter().map(|r| (r.node_id.clone(), r.membership())).collect();
    members.sort();
    Some(members)
}

/// Waits (bounded) until node `index` holds range 1 with exactly the voters `voters`.
async fn wait_for_members(fleet: &Fleet, index: usize, voters: &[usize]) {
    let mut want: Vec<_> = voters.iter().map(|&i| (fleet.nodes[i].node_id.clone(), ReplicaMembership::Voter)).collect();
    want.sort();
    let started = Instant::now();
    let mut seen = None;
    while started.elapsed() < Duration::from_secs(30) {
        seen = members_on(fleet, index).await;
        if seen.as_ref() == Some(&want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("node {index} holds range 1 as {seen:?}, expected {want:?}");
}

/// Waits (bounded) until node `index` no longer holds range 1.
async fn wait_until_gone(fleet: &Fleet, index: usize) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if fleet.ranges_on(index).await.is_some_and(|ranges| ranges.iter().all(|d| d.range_id != 1)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("node {index} still holds range 1 after it was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leaders_replica_moves_to_a_new_node_under_load_without_a_freeze_and_the_new_replica_is_a_real_voter() {
    let mut fleet = Fleet::start(3);
    let target = fleet.add_node();
    let source = fleet.leader(None).await;
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(48), 4, 4);
    workload.add_readers_with(&client, 4, 100, ReadConsistency::Follower);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // As a user moves it: `kvctl move-replica <key> --from <node> --to <node>`.
    let started = Instant::now();
    let acked_before = workload.space.acked_writes();
    let (from, to) = (fleet.nodes[source].node_id.clone(), fleet.nodes[target].node_id.clone());
    let moved = kvctl::run_async(
        &fleet.addresses(),
        &["--output", "json", "move-replica", "key010", "--from", &from, "--to", &to],
    )
    .await
    .json("move-replica");
    let took = started.elapsed();
    let acked = workload.space.acked_writes() - acked_before;
    eprintln!("moved the leader's replica in {took:?}: {acked} writes acknowledged meanwhile");
    let mut replicas: Vec<String> =
        moved["replicas"].as_array().into_iter().flatten().filter_map(|r| r.as_str().map(str::to_string)).collect();
    replicas.sort();
    let mut expected: Vec<String> = (0..4).filter(|&i| i != source).map(|i| fleet.nodes[i].node_id.clone()).collect();
    expected.sort();
    assert_eq!(replicas, expected, "kvctl printed {moved}");
    let voters: Vec<usize> = (0..4).filter(|&i| i != source).collect();
    for &index in &voters {
        wait_for_members(&fleet, index, &voters).await;
    }
    wait_until_gone(&fleet, source).await;

    // `kvctl status`, given one node, lists every replica's node (not only the leader's), each
    // with the copy it holds.
    let status =
        kvctl::run_async(&[&fleet.nodes[target].address], &["--output", "json", "status"]).await.json("status");
    let listed: Vec<(String, usize)> = status
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| (n["node_id"].as_str().unwrap_or_default().to_string(), n["ranges"].as_array().map_or(0, Vec::len)))
        .collect();
    for id in &expected {
        assert!(
            listed.iter().any(|(node, ranges)| node == id && *ranges == 1),
            "{id} not listed with its copy: {listed:?}"
        );
    }

    // The new replica is a needed vote: with one of the two other voters down, every write
    // commits on it.
    let other = voters.iter().copied().find(|&i| i != target).expect("another voter");
    let before = workload.space.acked_writes();
    fleet.nodes[other].kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    workload.space.wait_for_writes_past(before + 10, "writes stopped with the new replica as the second vote").await;
    workload.finish_checked(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_cut_off_at_any_instant_or_losing_its_leader_is_finished_by_running_it_again() {
    let mut fleet = Fleet::start(3);
    fleet.add_node();
    fleet.leader(None).await;
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(32), 4, 4);
    workload.add_readers_with(&client, 2, 200, ReadConsistency::Follower);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let clients = NodeClients::default();
    // Replicas on 0, 1, 2; node 3 holds none. Each round moves one replica to the node without
    // one, cut off after `cutoff` (the mover's crash: whatever step it was in stops there), and
    // in one round the leader is killed too; then the move is run again to its end.
    let mut holders = vec![0usize, 1, 2];
    let mut spare = 3usize;
    for (round, cutoff_ms) in [30u64, 150, 400, 900, 1600, 2500].into_iter().enumerate() {
        let leader = fleet.leader(None).await;
        let from =
            if round % 2 == 0 { leader } else { holders.iter().copied().find(|&i| i != leader).unwrap_or(leader) };
        let (source, target) = (fleet.endpoint(from), fleet.endpoint(spare));
        let seeds = fleet.addresses();
        let cut = tokio::time::timeout(
            Duration::from_millis(cutoff_ms),
            move_replica(&clients, 1, &seeds, &source, &target, MOVE_DEADLINE),
        )
        .await;
        eprintln!("round {round}: move {from} -> {spare} cut off after {cutoff_ms} ms: finished = {}", cut.is_ok());
        if round == 3 {
            let leader = fleet.leader(None).await;
            fleet.nodes[leader].kill9();
            tokio::time::sleep(Duration::from_millis(300)).await;
            fleet.nodes[leader].spawn();
        }
        let seeds = fleet.addresses();
        move_replica(&clients, 1, &seeds, &source, &target, MOVE_DEADLINE)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        holders.retain(|&i| i != from);
        holders.push(spare);
        spare = from;
        holders.sort();
        for &index in &holders {
            wait_for_members(&fleet, index, &holders).await;
        }
        wait_until_gone(&fleet, spare).await;
    }
    workload.finish_checked(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_replica_crashing_while_it_applies_a_membership_change_comes_back_in_a_valid_membership() {
    // The last two: the leader at a leadership transfer (its lease ended), and the new replica
    // between taking its first snapshot into its log and installing its data (it comes back
    // with a log and no range: the node installs and starts it at start).
    let crash_points = [
        "membership-apply-before-write",
        "membership-apply-after-write",
        "transfer-leader-after-lease-ended",
        "snapshot-install-before-data",
    ];
    for crash_at in crash_points {
        let mut fleet = Fleet::start(3);
        let target = fleet.add_node();
        fleet.leader(None).await;
        let client = fleet.client();
        let mut acked: HashMap<Bytes, Bytes> = HashMap::new();
        for i in 0..30 {
            let (key, value) = (Bytes::from(format!("key{i:03}")), Bytes::from(format!("before-{i}")));
            client.put(key.clone(), value.clone()).await.unwrap_or_else(|e| panic!("{key:?}: {e}"));
            acked.insert(key, value);
        }
        // Every node restarts armed: each aborts the first time it reaches the crash point.
        let marks = tempfile::tempdir().expect("a temporary directory");
        let mark = |index: usize| marks.path().join(format!("crashed-{index}"));
        for index in 0..4 {
            fleet.arm_crash_once(index, crash_at, &mark(index));
        }
        let source = fleet.leader(None).await;
        let clients = NodeClients::default();
        let (from, to) = (fleet.endpoint(source), fleet.endpoint(target));
        let started = Instant::now();
        let mut done = None;
        while done.is_none() && started.elapsed() < Duration::from_secs(90) {
            let seeds = fleet.addresses();
            let attempt = move_replica(&clients, 1, &seeds, &from, &to, Duration::from_secs(5)).await;
            // A node that crashed is restarted (a second after its mark: it aborts just after
            // writing it), still armed but past its one crash.
            tokio::time::sleep(Duration::from_secs(1)).await;
            fleet.restart_stopped();
            done = attempt.ok();
        }
        assert!(done.is_some(), "{crash_at}: the move did not finish");
        let crashed = (0..4).filter(|&i| mark(i).exists()).count();
        eprintln!("{crash_at}: {crashed} nodes crashed at it; the move finished in {:?}", started.elapsed());
        assert!(crashed > 0, "{crash_at}: no node reached the crash point (the test tested nothing)");
        let voters: Vec<usize> = (0..4).filter(|&i| i != source).collect();
        for &index in &voters {
            wait_for_members(&fleet, index, &voters).await;
        }
        wait_until_gone(&fleet, source).await;
        for (key, value) in &acked {
            let got = client.get(key.clone()).await.unwrap_or_else(|e| panic!("{crash_at}: {key:?}: {e}"));
            assert_eq!(got.as_ref(), Some(value), "{crash_at}: {key:?}");
        }
        client.put("after", "the move").await.unwrap_or_else(|e| panic!("{crash_at}: a write after the move: {e}"));
    }
}

/// What another operator or a user may do while a move runs: a second move of the same range to
/// another node, a third to the same target from another source, and a split, all at once under
/// a checked history. The membership changes are serialized by their version; the moves that
/// conflict are refused or end with a clear error, never with fewer voters than the range had;
/// a split is refused while a learner or a joint membership is in force (checked with a learner
/// added by hand first), and goes through otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_moves_and_a_split_during_a_move_keep_three_voters_and_every_write() {
    let mut fleet = Fleet::start(3);
    let (first, second) = (fleet.add_node(), fleet.add_node());
    fleet.leader(None).await;
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(32), 4, 4);
    workload.add_readers_with(&client, 2, 300, ReadConsistency::Follower);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A learner added by hand (the first steps of a move): a split is refused meanwhile.
    let leader = fleet.leader(None).await;
    let range = fleet.ranges_on(leader).await.and_then(|r| r.into_iter().find(|d| d.range_id == 1)).expect("range 1");
    let target = fleet.endpoint(second);
    let create = kvfleet_proto::v1::CreateReplicaRequest { range: Some(range.clone()) };
    fleet.nodes[second].admin().create_replica(create).await.expect("an empty replica");
    let learner = kvfleet_proto::v1::ReplicaChange {
        kind: kvfleet_proto::v1::replica_change::Kind::AddLearner as i32,
        replica: Some(kvfleet_proto::v1::Replica {
            node_id: target.node_id.clone(),
            address: target.address.clone(),
            ..Default::default()
        }),
    };
    let change = kvfleet_proto::v1::ChangeReplicasRequest {
        range_id: 1,
        expected_conf_version: range.conf_version,
        changes: vec![learner],
    };
    fleet.nodes[leader].admin().change_replicas(change).await.expect("a learner added");
    let split = kvfleet_proto::v1::SplitRangeRequest {
        range_id: 1,
        split_key: Bytes::from("key008"),
        right_id: 76,
        ..Default::default()
    };
    let refused = fleet.nodes[leader].admin().split_range(split).await.expect_err("no split with a learner");
    assert!(refused.message().contains("membership change is under way"), "{}", refused.message());

    let seeds = fleet.addresses();
    let clients = NodeClients::default();
    let mv = |from: usize, to: usize| {
        let (seeds, clients, source, target) =
            (seeds.clone(), clients.clone(), fleet.endpoint(from), fleet.endpoint(to));
        tokio::spawn(async move { move_replica(&clients, 1, &seeds, &source, &target, MOVE_DEADLINE).await })
    };
    let moves = [mv(0, first), mv(1, second), mv(2, first)];
    // A split while they run: refused during a membership change, else made.
    let mut split_outcomes = Vec::new();
    for _ in 0..20 {
        let leader = fleet.leader(None).await;
        let request = kvfleet_proto::v1::SplitRangeRequest {
            range_id: 1,
            split_key: Bytes::from("key016"),
            right_id: 77,
            ..Default::default()
        };
        match fleet.nodes[leader].admin().split_range(request).await {
            Ok(_) => {
                split_outcomes.push("made".to_string());
                break;
            }
            Err(status) => split_outcomes.push(status.message().to_string()),
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let mut outcomes = Vec::new();
    for handle in moves {
        outcomes.push(handle.await.expect("the mover task"));
    }
    eprintln!("moves: {outcomes:?}\nsplit attempts: {split_outcomes:?}");
    assert!(outcomes.iter().any(Result::is_ok), "no move finished: {outcomes:?}");
    for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert!(refused.message.contains("fewer than the 3"), "an unclear failure: {refused}");
    }
    assert!(
        split_outcomes
            .iter()
            .all(|o| o == "made" || o.contains("membership change is under way") || o.contains("leader")),
        "{split_outcomes:?}"
    );
    // Every range (1, and 77 if the split was made) has three voters, the same on each holder.
    // A removed source deletes its copy after the move has returned: wait for it.
    let mut holders: Vec<usize> = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        holders.clear();
        for index in 0..fleet.nodes.len() {
            if let Some(ranges) = fleet.ranges_on(index).await
                && ranges.iter().any(|d| d.range_id == 1)
            {
                holders.push(index);
            }
        }
        if holders.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(holders.len(), 3, "range 1 is held by {holders:?} 30 s after the moves");
    for &index in &holders {
        wait_for_members(&fleet, index, &holders).await;
    }
    workload.finish_checked(&client).await;
}

/// A single copy (a Raft group of one voter) moves by the same membership changes, with no
/// freeze: the target is added as a learner and caught up, then the source promotes it and
/// leaves in one joint membership, hands its leadership over inside it, and the new leader
/// leaves the joint membership. Moved back and forth between two nodes under a checked history
/// (linearizable readers), each round with every node armed to crash once at one step of the
/// way (a membership change about to be written or just written, the lease ended for the
/// hand-over, the snapshot taken but not installed), and with the mover cut off once: every
/// move is finished by running it again, nothing acknowledged is lost and no read goes back in
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_copy_moves_through_a_crash_at_every_step_and_loses_nothing() {
    let mut fleet = Fleet::start(1);
    fleet.add_node();
    fleet.leader(None).await;
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(32), 4, 4);
    workload.add_readers(&client, 2, 500);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let clients = NodeClients::default();
    let crash_points = [
        "membership-apply-before-write",
        "membership-apply-after-write",
        "transfer-leader-after-lease-ended",
        "snapshot-install-before-data",
        "",
    ];
    let marks = tempfile::tempdir().expect("a temporary directory");
    let mut holder = 0usize;
    for (round, crash_at) in crash_points.into_iter().enumerate() {
        let (from, to) = (holder, 1 - holder);
        let mark = |index: usize| marks.path().join(format!("round-{round}-node-{index}"));
        if !crash_at.is_empty() {
            for index in 0..2 {
                fleet.arm_crash_once(index, crash_at, &mark(index));
            }
            fleet.leader(None).await;
        } else {
            // The mover itself cut off in the middle, then run again.
            let seeds = fleet.addresses();
            let (source, target) = (fleet.endpoint(from), fleet.endpoint(to));
            let cut = tokio::time::timeout(
                Duration::from_millis(700),
                move_replica(&clients, 1, &seeds, &source, &target, MOVE_DEADLINE),
            )
            .await;
            eprintln!("round {round}: the move cut off after 700 ms: finished = {}", cut.is_ok());
        }
        let acked_before = workload.space.acked_writes();
        let started = Instant::now();
        let mut done = None;
        while done.is_none() && started.elapsed() < Duration::from_secs(90) {
            let seeds = fleet.addresses();
            let (source, target) = (fleet.endpoint(from), fleet.endpoint(to));
            let attempt = move_replica(&clients, 1, &seeds, &source, &target, Duration::from_secs(5)).await;
            if let Err(error) = &attempt {
                eprintln!("round {round} ({crash_at}): {error}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            fleet.restart_stopped();
            done = attempt.ok();
        }
        let moved = done.unwrap_or_else(|| panic!("round {round} ({crash_at}): the move did not finish in 90 s"));
        let crashed: Vec<usize> = (0..2).filter(|&i| mark(i).exists()).collect();
        eprintln!(
            "round {round} ({crash_at}): moved {from} -> {to} in {:?}, nodes crashed: {crashed:?}, {} writes acknowledged meanwhile",
            started.elapsed(),
            workload.space.acked_writes() - acked_before
        );
        assert!(crash_at.is_empty() || !crashed.is_empty(), "{crash_at}: no node reached the crash point");
        assert_eq!(moved.replicas.len(), 1, "round {round}: one copy after the move: {moved:?}");
        wait_for_members(&fleet, to, &[to]).await;
        wait_until_gone(&fleet, from).await;
        holder = to;
    }
    let acked_before = workload.space.acked_writes();
    tokio::time::sleep(Duration::from_secs(1)).await;
    workload.space.wait_for_writes_past(acked_before, "writes go on after the last move").await;
    let report = workload.finish_checked(&client).await;
    assert!(report.writes > 100, "the load went on: {} writes", report.writes);
}

/// The target of a single copy's move installs its first snapshot slowly (its Raft thread held
/// 1.5 s between taking the snapshot and installing it: a slow disk), while the mover, waiting
/// for it, asks it again and again to create its replica. The snapshot is installed once, by
/// the Raft thread: the target does not abort on a file another install took, no write applied
/// after the snapshot is taken back by a second ingest of it, and no read goes back in time once
/// the target leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_slow_to_install_its_snapshot_installs_it_once_while_the_mover_asks_again() {
    let mut fleet = Fleet::start(1);
    let target = fleet.add_node();
    let marks = tempfile::tempdir().expect("a temporary directory");
    let paused = marks.path().join("paused");
    fleet.arm_pause_once(target, "snapshot-install-before-data", 1500, &paused);
    fleet.leader(None).await;
    let client = fleet.client();
    let workload = HistoryWorkload::start(client.clone(), keys(32), 4, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let clients = NodeClients::default();
    let seeds = fleet.addresses();
    let (source, to) = (fleet.endpoint(0), fleet.endpoint(target));
    let moved = move_replica(&clients, 1, &seeds, &source, &to, MOVE_DEADLINE).await.expect("the move finishes");
    assert_eq!(moved.replicas.len(), 1, "one copy after the move: {moved:?}");
    assert!(paused.exists(), "the target's snapshot install was held");
    assert!(fleet.nodes[target].is_running(), "the target did not abort while it installed its snapshot");
    wait_for_members(&fleet, target, &[target]).await;
    wait_until_gone(&fleet, 0).await;
    // Reads of every key from the new leader, each after a write acknowledged before it.
    let acked_before = workload.space.acked_writes();
    tokio::time::sleep(Duration::from_secs(2)).await;
    workload.space.wait_for_writes_past(acked_before, "writes go on after the move").await;
    let report = workload.finish_checked(&client).await;
    assert!(report.writes > 100 && report.reads > 100, "the load went on: {report:?}");
}
