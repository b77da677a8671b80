//! Splits of replicated ranges on real node processes (three nodes on loopback, range 1 a Raft
//! group of all three): a split goes through the range's log, so every replica applies it at the
//! same index, even one that was down when it was made; the new range is a Raft group of its
//! own; writes and reads go on during the split and never go back in time; and every replica
//! crashing at either step of applying the split (before its write, after it) comes back with
//! the split made and nothing acknowledged lost; both halves of a five-replica range survive
//! two replicas' loss.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_e2e::history::{HistoryWorkload, keys};
use kvfleet_e2e::kvctl;
use kvfleet_e2e::replicated::ReplicatedFleet as Fleet;
use kvfleet_proto::v1::{GetRequest, RangeDescriptor, ReadConsistency, SplitRangeRequest};

/// How long the crash test waits for every node to reach its crash point.
const CATCH_UP: Duration = Duration::from_secs(90);

/// `kvctl split <key>` against every node: the halves it printed (id, start, end).
fn kvctl_split(fleet: &Fleet, key: &str) -> Vec<(u64, String, String)> {
    // No resharding loop runs (none answers at kvctl's default): the node picks the new id.
    let json = kvctl::run(&fleet.addresses(), &["--output", "json", "split", key]).json(&format!("split {key}"));
    let halves = json.as_array().cloned().unwrap_or_default();
    halves
        .iter()
        .map(|v| {
            let text = |field: &str| v[field].as_str().unwrap_or_default().to_string();
            (v["range_id"].as_u64().unwrap_or(0), text("start"), text("end"))
        })
        .collect()
}

async fn split(fleet: &Fleet, on: usize, range_id: u64, key: &'static str) -> [RangeDescriptor; 2] {
    let request = SplitRangeRequest { range_id, expected_generation: 0, split_key: Bytes::from(key), right_id: 0 };
    let answer = fleet.nodes[on].admin().split_range(request).await.expect("the leader splits").into_inner();
    let (Some(left), Some(right)) = (answer.left, answer.right) else { panic!("a split answered without halves") };
    assert_eq!(left.range_id, range_id, "a replicated range keeps its id for the left half");
    assert_eq!((left.end_key.as_ref(), right.start_key.as_ref()), (key.as_bytes(), key.as_bytes()));
    assert_eq!(right.replicas.len(), fleet.nodes.len(), "the new range has the same replicas");
    [left, right]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_goes_through_the_log_under_load_and_a_replica_down_during_it_makes_it_from_the_log() {
    let mut fleet = Fleet::start(3);
    let leader = fleet.leader(None).await;
    let (lagging, other) = ((leader + 1) % 3, (leader + 2) % 3);
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(48), 4, 4);
    workload.add_readers_with(&client, 4, 100, ReadConsistency::Follower);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A follower misses both splits and the writes around them.
    fleet.nodes[lagging].kill9();
    let [_, right] = split(&fleet, leader, 1, "key016").await;
    let split_done = Instant::now();
    let right_leader = fleet.leader_of(right.range_id, None).await;
    eprintln!("the new range had a leader {:?} after the split answered", split_done.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The second split as a user makes it: kvctl finds the range holding the key and its leader.
    assert!(right_leader < 3);
    let halves = kvctl_split(&fleet, "key032");
    assert_eq!(halves[0], (right.range_id, "key016".to_string(), "key032".to_string()), "{halves:?}");
    assert_eq!((halves[1].1.as_str(), halves[1].2.as_str()), ("key032", ""), "{halves:?}");
    let far_right = RangeDescriptor { range_id: halves[1].0, ..Default::default() };
    fleet.leader_of(far_right.range_id, None).await;
    let before_restart = workload.space.acked_writes();
    tokio::time::sleep(Duration::from_secs(2)).await;
    workload.space.wait_for_writes_past(before_restart, "writes stopped after the splits").await;

    // It comes back, replays range 1's log, and applies both splits where the others did.
    fleet.nodes[lagging].spawn();
    let expected: [(u64, &[u8], &[u8]); 3] =
        [(1, b"", b"key016"), (right.range_id, b"key016", b"key032"), (far_right.range_id, b"key032", b"")];
    for index in 0..3 {
        fleet.wait_for_ranges(index, &expected).await;
    }
    // It holds a replica of each new group: with the other follower down, every range still
    // commits (the lagging node is the only second vote), and so does the first leader's loss
    // afterwards with the other follower back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.nodes[other].kill9();
    for key in ["key000-probe", "key020-probe", "key040-probe"] {
        client.put(key, "with the lagging replica").await.unwrap_or_else(|e| panic!("{key} without {other}: {e}"));
    }
    fleet.nodes[other].spawn();
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.nodes[leader].kill9();
    let after_kill = workload.space.acked_writes();
    tokio::time::sleep(Duration::from_secs(3)).await;
    workload.space.wait_for_writes_past(after_kill, "writes stopped after the first leader's kill -9").await;
    let (report, space) = workload.finish().await;
    assert!(report.violations.is_empty(), "history violations: {:?}", report.violations);
    assert!(report.writes > 0 && report.reads > 0, "the workload neither wrote nor read");
    let wrong = space.verify_final(&client).await;
    assert!(wrong.is_empty(), "acknowledged writes lost: {wrong:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_replica_crashing_at_either_step_of_applying_a_split_comes_back_split_with_every_write() {
    for crash_at in ["split-apply-before-write", "split-apply-after-write"] {
        let mut fleet = Fleet::start(3);
        fleet.leader(None).await;
        let client = fleet.client();
        let mut acked: HashMap<Bytes, Bytes> = HashMap::new();
        for i in 0..40 {
            let (key, value) = (Bytes::from(format!("key{i:03}")), Bytes::from(format!("before-{i}")));
            client.put(key.clone(), value.clone()).await.unwrap_or_else(|e| panic!("{key:?}: {e}"));
            acked.insert(key, value);
        }
        // Every node restarts armed: each aborts the first time it applies the split (a node
        // whose peers crashed first may learn of the commit only after they are back).
        let marks = tempfile::tempdir().expect("a temporary directory");
        let mark = |index: usize| marks.path().join(format!("crashed-{index}"));
        for index in 0..3 {
            fleet.arm_crash_once(index, crash_at, &mark(index));
        }
        let leader = fleet.leader(None).await;
        let request = SplitRangeRequest { range_id: 1, split_key: Bytes::from("key020"), ..Default::default() };
        let mut admin = fleet.nodes[leader].admin();
        let answer = tokio::time::timeout(Duration::from_secs(20), admin.split_range(request)).await;
        assert!(!matches!(answer, Ok(Ok(_))), "the leader answered a split it crashed applying ({crash_at})");
        let started = Instant::now();
        while (0..3).any(|index| !mark(index).exists()) && started.elapsed() < CATCH_UP {
            fleet.restart_stopped();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // A node writes its mark just before it aborts: let the last ones die before restarting
        // whichever is down.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for index in 0..3 {
            assert!(mark(index).exists(), "node {index} never reached {crash_at}");
        }
        fleet.restart_stopped();
        // Each comes back with the split made (replayed from the log, or found in its write).
        // (It learns of the commit from peers that are restarting too.)
        let mut ranges = None;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            ranges = fleet.ranges_on(leader).await;
            if ranges.as_ref().is_some_and(|r| r.iter().any(|d| d.start_key.as_ref() == b"key020")) {
                break;
            }
            fleet.restart_stopped();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let ranges = ranges.unwrap_or_default();
        let right = ranges.iter().find(|d| d.start_key.as_ref() == b"key020");
        let right = right.unwrap_or_else(|| panic!("the split's right half, 60 s after the restarts: {ranges:?}"));
        let expected: [(u64, &[u8], &[u8]); 2] = [(1, b"", b"key020"), (right.range_id, b"key020", b"")];
        for index in 0..3 {
            fleet.wait_for_ranges(index, &expected).await;
        }
        // Both halves take writes, and nothing acknowledged before the crash is lost.
        for i in (0..40).step_by(3) {
            let (key, value) = (Bytes::from(format!("key{i:03}")), Bytes::from(format!("after-{i}")));
            client.put(key.clone(), value.clone()).await.unwrap_or_else(|e| panic!("{key:?} after {crash_at}: {e}"));
            acked.insert(key, value);
        }
        kvfleet_e2e::assert_all_acked_readable(&client, &acked).await;
        // The new range is a Raft group of its own: its leader's loss is survived too.
        let right_leader = fleet.leader_of(right.range_id, None).await;
        fleet.nodes[right_leader].kill9();
        client.put("key030", "after the right leader's loss").await.expect("the right half elects again");
        acked.insert(Bytes::from("key030"), Bytes::from("after the right leader's loss"));
        kvfleet_e2e::assert_all_acked_readable(&client, &acked).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_down_during_a_split_gets_it_from_the_log_or_else_a_snapshot_that_narrows_its_range() {
    // Logs keep 20 applied entries: a replica down for 100 writes is past what the log keeps.
    let mut fleet = Fleet::start_with(3, &["--raft-log-keep-entries", "20"]);
    let leader = fleet.leader(None).await;
    let (lagging, other) = ((leader + 1) % 3, (leader + 2) % 3);
    let client = fleet.client();
    let mut acked: HashMap<Bytes, Bytes> = HashMap::new();
    let mut write = async |key: String, value: String| {
        client.put(key.clone(), value.clone()).await.unwrap_or_else(|e| panic!("write {key}: {e}"));
        acked.insert(Bytes::from(key), Bytes::from(value));
    };

    // The replicas that applied the split keep range 1's log from where the one that is down
    // stopped until it has the split entry: it makes the split from the log.
    fleet.nodes[lagging].kill9();
    let [_, right] = split(&fleet, leader, 1, "key050").await;
    for i in 0..100 {
        write(format!("key{:03}", i % 100), format!("a-{i}")).await;
    }
    // The leader says how far behind each replica is: the one that is down, by every write to
    // range 1 since it went.
    let reported = fleet.ranges_on(leader).await.expect("the leader answers");
    let range_1 = reported.iter().find(|d| d.range_id == 1).expect("range 1 on its leader");
    let behind = |index: usize| {
        let node_id = &fleet.nodes[index].node_id;
        range_1.replicas.iter().find(|r| &r.node_id == node_id).and_then(|r| r.behind_entries)
    };
    assert_eq!(behind(leader), Some(0), "the leader lacks nothing");
    assert!(behind(lagging).is_some_and(|n| n >= 50), "the replica that is down: {:?}", behind(lagging));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    fleet.nodes[lagging].spawn();
    let both: [(u64, &[u8], &[u8]); 2] = [(1, b"", b"key050"), (right.range_id, b"key050", b"")];
    fleet.wait_for_ranges(lagging, &both).await;

    // A replica that missed a split after the replicas that kept the log for it restarted
    // (the hold is in memory) gets a snapshot from its new leader instead: it takes the range's
    // narrower keys, and holds no replica of the split's new range.
    fleet.nodes[lagging].kill9();
    let [_, middle] = split(&fleet, leader, 1, "key025").await;
    for i in 0..100 {
        write(format!("key{:03}", i % 25), format!("b-{i}")).await;
    }
    write("key030".into(), "in the middle".into()).await;
    fleet.nodes[other].kill9();
    fleet.nodes[other].spawn();
    for i in 0..100 {
        write(format!("key{:03}", i % 25), format!("c-{i}")).await;
    }
    // Compaction runs once a second (given five, for a loaded machine).
    tokio::time::sleep(Duration::from_secs(5)).await;
    fleet.nodes[leader].kill9();
    fleet.nodes[lagging].spawn();
    let narrowed: [(u64, &[u8], &[u8]); 2] = [(1, b"", b"key025"), (right.range_id, b"key050", b"")];
    fleet.wait_for_ranges(lagging, &narrowed).await;
    let mut kv = fleet.nodes[lagging].kv();
    for i in 0..25 {
        let key = Bytes::from(format!("key{i:03}"));
        let request = GetRequest {
            header: None,
            key: key.clone(),
            consistency: ReadConsistency::Follower as i32,
            max_staleness_ms: 0,
        };
        let answer = kv.get(request).await.unwrap_or_else(|e| panic!("{key:?} on the narrowed replica: {e}"));
        assert_eq!(Some(&answer.into_inner().value), acked.get(&key), "{key:?} on the narrowed replica");
    }
    let request = GetRequest {
        header: None,
        key: Bytes::from("key030"),
        consistency: ReadConsistency::Follower as i32,
        max_staleness_ms: 0,
    };
    let refused = kv.get(request).await.expect_err("the narrowed replica serves a key it no longer has");
    assert!(refused.message().contains("owns no range"), "{refused:?}");

    // With the old leader back, the middle range has its two replicas again; nothing is lost.
    fleet.nodes[leader].spawn();
    fleet.leader_of(middle.range_id, None).await;
    kvfleet_e2e::assert_all_acked_readable(&client, &acked).await;
    assert!(fleet.nodes[other].is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_halves_of_a_split_five_replica_range_survive_the_loss_of_two_replicas() {
    let mut fleet = Fleet::start(5);
    let leader = fleet.leader(None).await;
    let client = fleet.client();
    let workload = HistoryWorkload::start(client.clone(), keys(40), 4, 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let [_, right] = split(&fleet, leader, 1, "key020").await;
    fleet.leader_of(right.range_id, None).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Two of five down, the leader of both halves among them: each half elects and goes on.
    let other = (leader + 1) % 5;
    fleet.nodes[leader].kill9();
    fleet.nodes[other].kill9();
    let after_kills = workload.space.acked_writes();
    for key in ["key005-probe", "key030-probe"] {
        client.put(key, "three of five").await.unwrap_or_else(|e| panic!("{key} with two of five down: {e}"));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    workload.space.wait_for_writes_past(after_kills, "writes stopped with two of five down").await;
    let (report, space) = workload.finish().await;
    assert!(report.violations.is_empty(), "history violations: {:?}", report.violations);
    let wrong = space.verify_final(&client).await;
    assert!(wrong.is_empty(), "acknowledged writes lost: {wrong:?}");
}
