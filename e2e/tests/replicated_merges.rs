//! Merges of replicated ranges on real node processes (three nodes on loopback, every range a
//! Raft group of all three): `kvctl merge` freezes the right range through its log and merges it
//! into the left one through the left one's log, with no data copied; the two ranges led by
//! different nodes first; under a checked history of writes and linearizable and follower reads
//! (no read goes back in time, nothing acknowledged is lost); then the merged range survives its
//! leader's loss. And every replica crashing at every step of a merge (applying the freeze,
//! between the freeze and the merge, applying the merge before and after its write) comes back
//! with nothing acknowledged lost, and the merge is finished by asking again; a follower
//! crashing as it applies the merge comes back merged, a voter of the merged range.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_e2e::history::{HistoryWorkload, keys};
use kvfleet_e2e::kvctl;
use kvfleet_e2e::replicated::ReplicatedFleet as Fleet;
use kvfleet_proto::v1::{RangeDescriptor, ReadConsistency, SplitRangeRequest, TransferLeaderRequest};

/// How long the crash test waits for every node to reach its crash point.
const CATCH_UP: Duration = Duration::from_secs(90);

/// `kvctl merge <key>` against every node: the merged range (id, start, end), or kvctl's error.
fn kvctl_merge(endpoints: &[String], key: &str) -> Result<(u64, String, String), String> {
    let run = kvctl::run(endpoints, &["--output", "json", "merge", key]);
    if !run.succeeded {
        return Err(run.stderr);
    }
    let json = run.json("merge");
    let text = |field: &str| json[field].as_str().unwrap_or_default().to_string();
    Ok((json["range_id"].as_u64().unwrap_or(0), text("start"), text("end")))
}

/// Range 1 over the whole key space, as kvctl prints it (the empty start key quoted).
fn whole_key_space() -> (u64, String, String) {
    (1, "\"\"".to_string(), String::new())
}

/// Splits range 1 at `key` on its leader; the right half's id.
async fn split(fleet: &mut Fleet, key: &'static str) -> u64 {
    let leader = fleet.leader(None).await;
    let request = SplitRangeRequest { range_id: 1, split_key: Bytes::from(key), ..Default::default() };
    let answer = fleet.nodes[leader].admin().split_range(request).await.expect("the leader splits").into_inner();
    answer.right.expect("the right half").range_id
}

/// Hands the leadership of `range_id` to a node other than the one leading range 1.
async fn lead_elsewhere(fleet: &mut Fleet, range_id: u64) -> usize {
    let left_leader = fleet.leader(None).await;
    let target = (left_leader + 1) % fleet.nodes.len();
    for _ in 0..20 {
        let leader = fleet.leader_of(range_id, None).await;
        if leader != left_leader {
            return leader;
        }
        let request = TransferLeaderRequest { range_id, to_node_id: fleet.endpoint(target).node_id };
        let _ = fleet.nodes[leader].admin().transfer_leader(request).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("range {range_id} stays led by node {left_leader}, which leads range 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merge_goes_through_both_logs_under_load_and_the_merged_range_survives_its_leaders_loss() {
    let mut fleet = Fleet::start(3);
    fleet.leader(None).await;
    let client = fleet.client();
    let right_id = split(&mut fleet, "key024").await;
    let right_leader = lead_elsewhere(&mut fleet, right_id).await;
    let mut workload = HistoryWorkload::start(client.clone(), keys(48), 4, 4);
    workload.add_readers_with(&client, 4, 100, ReadConsistency::Follower);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = Instant::now();
    let merged = kvctl_merge(&fleet.addresses(), "key000").unwrap_or_else(|e| panic!("kvctl merge: {e}"));
    eprintln!("merged in {:?} (the right range was led by node {right_leader})", started.elapsed());
    assert_eq!(merged, whole_key_space(), "range 1 takes the whole key space");
    for index in 0..3 {
        fleet.wait_for_ranges(index, &[(1, b"", b"")]).await;
    }
    let after_merge = workload.space.acked_writes();
    tokio::time::sleep(Duration::from_secs(2)).await;
    workload.space.wait_for_writes_past(after_merge, "writes stopped after the merge").await;

    // Asked again, the merge has nothing left to do and says so.
    let again = kvctl_merge(&fleet.addresses(), "key000");
    assert!(again.is_err(), "a second merge of the last range answered {again:?}");

    // The merged range is one Raft group on all three nodes: its leader's loss is survived.
    let leader = fleet.leader(None).await;
    fleet.nodes[leader].kill9();
    let after_kill = workload.space.acked_writes();
    tokio::time::sleep(Duration::from_secs(4)).await;
    workload.space.wait_for_writes_past(after_kill, "writes stopped after the merged range's leader was killed").await;
    let (report, space) = workload.finish().await;
    assert!(report.violations.is_empty(), "history violations: {:?}", report.violations);
    assert!(report.writes > 0 && report.reads > 0, "the workload neither wrote nor read");
    let wrong = space.verify_final(&client).await;
    assert!(wrong.is_empty(), "acknowledged writes lost: {wrong:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_replica_crashing_at_every_step_of_a_merge_comes_back_with_every_write_and_the_merge_finishes() {
    let steps = [
        ("merge-freeze-apply-before-write", true),
        ("merge-after-freeze", false),
        ("merge-apply-before-write", true),
        ("merge-apply-after-write", true),
    ];
    for (crash_at, on_every_replica) in steps {
        let mut fleet = Fleet::start(3);
        fleet.leader(None).await;
        let client = fleet.client();
        let right_id = split(&mut fleet, "key020").await;
        let mut acked: HashMap<Bytes, Bytes> = HashMap::new();
        for i in 0..40 {
            let (key, value) = (Bytes::from(format!("key{i:03}")), Bytes::from(format!("before-{i}")));
            client.put(key.clone(), value.clone()).await.unwrap_or_else(|e| panic!("{key:?}: {e}"));
            acked.insert(key, value);
        }
        // Every node restarts armed: each aborts the first time it reaches the step.
        let marks = tempfile::tempdir().expect("a temporary directory");
        let mark = |index: usize| marks.path().join(format!("crashed-{index}"));
        for index in 0..3 {
            fleet.arm_crash_once(index, crash_at, &mark(index));
        }
        fleet.leader(None).await;
        fleet.leader_of(right_id, None).await;
        // kvctl retries while nodes crash; they are restarted meanwhile.
        let endpoints = fleet.addresses();
        let first = std::thread::spawn(move || kvctl_merge(&endpoints, "key000"));
        let started = Instant::now();
        let crashed = |index: usize| mark(index).exists();
        while started.elapsed() < CATCH_UP && if on_every_replica { !(0..3).all(crashed) } else { !(0..3).any(crashed) }
        {
            fleet.restart_stopped();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // A node writes its mark just before it aborts: let the last ones die first.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let reached = (0..3).filter(|&index| crashed(index)).count();
        assert!(reached == 3 || (!on_every_replica && reached >= 1), "{reached} nodes reached {crash_at}");
        fleet.restart_stopped();
        // kvctl finished the merge, or else, asked again (as often as it takes while elections
        // settle), it does.
        let first = tokio::task::spawn_blocking(move || first.join().expect("kvctl's thread")).await.expect("joined");
        eprintln!("{crash_at}: the first kvctl merge answered {first:?}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let merged = loop {
            match kvctl_merge(&fleet.addresses(), "key000") {
                Ok(merged) => break Some(merged),
                Err(_) if fleet.ranges_on(0).await.is_some_and(|r| r.len() == 1 && r[0].end_key.is_empty()) => {
                    break None;
                }
                Err(error) if Instant::now() > deadline => panic!("the merge never finished after {crash_at}: {error}"),
                Err(_) => {
                    // A node that died after the first second is brought back too.
                    fleet.restart_stopped();
                    tokio::time::sleep(Duration::from_secs(1)).await
                }
            }
        };
        if let Some(merged) = merged {
            assert_eq!(merged, whole_key_space(), "after {crash_at}");
        }
        for index in 0..3 {
            fleet.wait_for_ranges(index, &[(1, b"", b"")]).await;
        }
        // Nothing acknowledged is lost, and the merged range takes writes on both sides.
        kvfleet_e2e::assert_all_acked_readable(&client, &acked).await;
        for i in (0..40).step_by(3) {
            let (key, value) = (Bytes::from(format!("key{i:03}")), Bytes::from(format!("after-{i}")));
            client.put(key.clone(), value.clone()).await.unwrap_or_else(|e| panic!("{key:?} after {crash_at}: {e}"));
            acked.insert(key, value);
        }
        kvfleet_e2e::assert_all_acked_readable(&client, &acked).await;
        eprintln!("{crash_at}: merged after the crash, nothing lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_crashing_as_it_applies_a_merge_comes_back_merged_and_votes_after_writes_it_missed() {
    // Logs keep 20 applied entries: a replica down for 100 writes is past what the log keeps.
    let mut fleet = Fleet::start_with(3, &["--raft-log-keep-entries", "20"]);
    fleet.leader(None).await;
    let client = fleet.client();
    let right_id = split(&mut fleet, "key020").await;
    let left_leader = fleet.leader(None).await;
    let lagging = (left_leader + 1) % 3;
    let other = (left_leader + 2) % 3;
    // The lagging follower crashes as it applies the merge (after applying the freeze).
    let marks = tempfile::tempdir().expect("a temporary directory");
    let mark = marks.path().join("crashed");
    fleet.arm_crash_once(lagging, "merge-apply-before-write", &mark);
    fleet.leader_of(right_id, None).await;
    let mut acked: HashMap<Bytes, Bytes> = HashMap::new();
    for i in 0..40 {
        let (key, value) = (Bytes::from(format!("key{i:03}")), Bytes::from(format!("before-{i}")));
        client.put(key.clone(), value.clone()).await.unwrap_or_else(|e| panic!("{key:?}: {e}"));
        acked.insert(key, value);
    }
    let merged = kvctl_merge(&fleet.addresses(), "key000").unwrap_or_else(|e| panic!("kvctl merge: {e}"));
    assert_eq!(merged, whole_key_space());
    let started = Instant::now();
    while !mark.exists() && started.elapsed() < CATCH_UP {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(mark.exists(), "the lagging follower never applied the merge");
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.nodes[lagging].kill9();
    // 100 writes on both sides of the old boundary while it is down: the log moves past the merge.
    for i in 0..100 {
        let (key, value) = (Bytes::from(format!("key{:03}", i % 40)), Bytes::from(format!("while-down-{i}")));
        client.put(key.clone(), value.clone()).await.unwrap_or_else(|e| panic!("{key:?}: {e}"));
        acked.insert(key, value);
    }
    fleet.nodes[lagging].spawn();
    // It comes back with the merged range (its own log has the merge; the writes it missed come
    // from the log or a snapshot), its copy of the right range retired.
    fleet.wait_for_ranges(lagging, &[(1, b"", b"")]).await;
    // It is a real voter of the merged range: with the other follower down, writes commit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.nodes[other].kill9();
    for key in ["key005", "key030"] {
        let value = Bytes::from(format!("{key} with the lagging replica"));
        client.put(key, value.clone()).await.unwrap_or_else(|e| panic!("{key} without node {other}: {e}"));
        acked.insert(Bytes::from(key), value);
    }
    kvfleet_e2e::assert_all_acked_readable(&client, &acked).await;
}

/// Every range as its leader reports it, asking every node of the fleet.
async fn led_ranges(fleet: &Fleet) -> Vec<RangeDescriptor> {
    let mut found: Vec<RangeDescriptor> = Vec::new();
    for (index, node) in fleet.nodes.iter().enumerate() {
        let Some(ranges) = fleet.ranges_on(index).await else { continue };
        for desc in ranges {
            let leads = kvfleet_resharding::observe::leads(&desc, &node.node_id);
            if leads && !found.iter().any(|d| d.range_id == desc.range_id) {
                found.push(desc);
            }
        }
    }
    found.sort_by(|a, b| a.start_key.cmp(&b.start_key));
    found
}

/// `led_ranges` once they tile the key space (a range whose leader is being elected is missing
/// for a moment); fails after 30 s.
async fn tiled_led_ranges(fleet: &Fleet) -> Vec<RangeDescriptor> {
    let started = Instant::now();
    loop {
        let ranges = led_ranges(fleet).await;
        if kvfleet_e2e::tile_the_key_space(&ranges) {
            return ranges;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the led ranges do not tile the key space: {ranges:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A merge raced, in every round, by a split of its left range and by a second merger of the
/// same pair (another operator, or kvctl by hand), under a checked history: whatever wins, no
/// acknowledged write is lost, no read goes back in time, a range frozen for a merge is always
/// finished (into whichever range ends where it starts), and the ranges tile the key space.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merges_raced_by_splits_and_a_second_merger_keep_every_write_and_a_tiled_key_space() {
    let mut fleet = Fleet::start(3);
    fleet.leader(None).await;
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(48), 4, 2);
    workload.add_readers_with(&client, 2, 900, ReadConsistency::Follower);
    let clients = kvfleet_resharding::observe::NodeClients::default();
    let seeds = fleet.addresses();
    for round in 0..3 {
        // Two neighbours: the range holding key040 and the one before it.
        let mut ranges = tiled_led_ranges(&fleet).await;
        let holding = |ranges: &[RangeDescriptor], key: &[u8]| {
            let holds = |d: &&RangeDescriptor| {
                d.start_key.as_ref() <= key && (d.end_key.is_empty() || key < d.end_key.as_ref())
            };
            ranges.iter().find(holds).cloned()
        };
        let splitting = Instant::now();
        let right = loop {
            match holding(&ranges, b"key040") {
                Some(desc) if !desc.start_key.is_empty() => break desc,
                Some(whole) => {
                    assert!(
                        splitting.elapsed() < Duration::from_secs(30),
                        "round {round}: key036 not split off in 30 s"
                    );
                    let leader = fleet.leader_of(whole.range_id, None).await;
                    let request = SplitRangeRequest {
                        range_id: whole.range_id,
                        split_key: Bytes::from("key036"),
                        ..Default::default()
                    };
                    let _ = fleet.nodes[leader].admin().split_range(request).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    ranges = tiled_led_ranges(&fleet).await;
                }
                None => panic!("round {round}: no range holds key040 in {ranges:?}"),
            }
        };
        let left = ranges.iter().find(|d| d.end_key == right.start_key).expect("the left neighbour").clone();
        let left_leader = fleet.leader_of(left.range_id, None).await;
        // A key strictly inside the left range, for the racing split.
        let inside = |k: &String| left.start_key.as_ref() < k.as_bytes() && k.as_bytes() < left.end_key.as_ref();
        let candidates: Vec<String> = (1..48).map(|i| format!("key{i:03}")).filter(inside).collect();
        let Some(split_key) = candidates.get(candidates.len() / 2).cloned() else {
            panic!("round {round}: no key inside the left range {left:?}");
        };
        // Race: two mergers of the pair, and a split of the left range.
        let first = kvfleet_resharding::replica_merges::merge_replicated(
            &clients,
            left.range_id,
            right.range_id,
            &seeds,
            Duration::from_secs(30),
        );
        let second = kvfleet_resharding::replica_merges::merge_replicated(
            &clients,
            left.range_id,
            right.range_id,
            &seeds,
            Duration::from_secs(30),
        );
        let mut admin = fleet.nodes[left_leader].admin();
        let split = async {
            // Before the merge starts, during it, after it.
            tokio::time::sleep(Duration::from_millis([0, 150, 400][round])).await;
            let request = SplitRangeRequest {
                range_id: left.range_id,
                split_key: Bytes::from(split_key.clone()),
                ..Default::default()
            };
            admin.split_range(request).await
        };
        let (first, second, split) = tokio::join!(first, second, split);
        eprintln!(
            "round {round}: merges {:?} / {:?}, split of the left range {:?}",
            first.as_ref().map(|d| d.range_id).map_err(|e| e.message.clone()),
            second.as_ref().map(|d| d.range_id).map_err(|e| e.message.clone()),
            split.as_ref().map(|_| ()).map_err(|s| s.message().to_string())
        );
        // A range left frozen is finished by asking again (its left neighbour is whichever range
        // ends where it starts).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ranges = led_ranges(&fleet).await;
            let tiles = kvfleet_e2e::tile_the_key_space(&ranges);
            let frozen = ranges.iter().find(|d| d.merge_freeze_index > 0);
            match frozen {
                None if tiles => break,
                Some(frozen) => {
                    let left = ranges.iter().find(|d| d.end_key == frozen.start_key).map_or(0, |d| d.range_id);
                    let finished = kvfleet_resharding::replica_merges::merge_replicated(
                        &clients,
                        left,
                        frozen.range_id,
                        &seeds,
                        Duration::from_secs(10),
                    )
                    .await;
                    eprintln!(
                        "round {round}: finishing frozen range {}: {:?}",
                        frozen.range_id,
                        finished.map(|d| d.range_id)
                    );
                }
                None => {}
            }
            assert!(Instant::now() < deadline, "round {round}: the ranges never settled: {ranges:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let (report, space) = workload.finish().await;
    assert!(report.violations.is_empty(), "history violations: {:?}", report.violations);
    assert!(report.writes > 100 && report.reads > 100, "{} writes, {} reads", report.writes, report.reads);
    let wrong = space.verify_final(&client).await;
    assert!(wrong.is_empty(), "acknowledged writes lost: {wrong:?}");
}
