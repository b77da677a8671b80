//! Replicated ranges on real node processes: range 1 is a Raft group of three (or five) nodes
//! (`--initial-replicas`), driven over real gRPC between the nodes. Each test attacks one
//! promise: a leader killed under load is replaced and no acknowledged write is lost, and no
//! read goes back in time; a paused (SIGSTOP) leader that wakes up after a new leader took
//! writes serves no stale read; a node cut off from the majority acknowledges neither reads nor
//! writes; a whole fleet killed at once comes back with every acknowledged write; follower
//! reads never miss an acknowledged write; five replicas survive two kills; a follower the
//! leader's compacted log cannot catch up gets a snapshot, even across crashes while installing
//! it; reads of bounded staleness are never older than their bound, and need no leader within
//! it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_e2e::history::{HistoryWorkload, keys};
use kvfleet_e2e::replicated::ReplicatedFleet as Fleet;
use kvfleet_proto::v1::{GetRequest, ReadConsistency};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_killed_under_load_is_replaced_and_no_acknowledged_write_is_lost() {
    let mut fleet = Fleet::start(3);
    let leader = fleet.leader(None).await;
    let client = fleet.client();
    let workload = HistoryWorkload::start(client.clone(), keys(24), 4, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = workload.space.acked_writes();
    assert!(before_kill > 0, "no write was acknowledged before the kill");

    fleet.nodes[leader].kill9();
    let killed = Instant::now();
    client.put("probe", "after the kill").await.expect("writes resume after the leader's kill -9");
    let resumed = killed.elapsed();
    let new_leader = fleet.leader(Some(leader)).await;
    eprintln!("kill -9 of the leader: writes resumed after {resumed:?}, node {new_leader} leads");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The killed node comes back as a follower and catches up from the log.
    fleet.nodes[leader].spawn();
    tokio::time::sleep(Duration::from_secs(2)).await;
    workload.space.wait_for_writes_past(before_kill + 20, "writes did not go on after the failover").await;
    let (report, space) = workload.finish().await;
    assert!(report.violations.is_empty(), "history violations: {:?}", report.violations);
    let wrong = space.verify_final(&client).await;
    assert!(wrong.is_empty(), "acknowledged writes lost: {wrong:?}");

    // Then the new leader dies too: the restarted node and the third must hold every
    // acknowledged write (the restarted one only if it caught up, or it cannot be elected).
    fleet.nodes[new_leader].kill9();
    let wrong = space.verify_final(&client).await;
    assert!(wrong.is_empty(), "after the second leader's kill -9: {wrong:?}");
    assert!(
        report.writes > 0 && report.reads > 0,
        "the workload neither wrote nor read: {} writes, {} reads",
        report.writes,
        report.reads
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_leader_serves_no_stale_read_and_a_cut_off_node_acknowledges_nothing() {
    let mut fleet = Fleet::start(3);
    let leader = fleet.leader(None).await;
    let client = fleet.client();
    client.put("k", "old").await.expect("the first write");

    // A connection to the leader, open before it is paused.
    let mut paused = fleet.nodes[leader].kv();
    let first = paused
        .get(GetRequest { header: None, key: Bytes::from("k"), consistency: 0, max_staleness_ms: 0 })
        .await
        .expect("a read on the leader");
    assert_eq!(first.into_inner().value, Bytes::from("old"));

    // Paused past its election timeout, the leader is replaced; the new leader takes a write.
    fleet.nodes[leader].signal("-STOP");
    client.put("k", "new").await.expect("the others elect a leader and take the write");
    let new_leader = fleet.leader(Some(leader)).await;

    // Reads reach the paused leader and wait in its socket; it wakes up still believing it
    // leads, with "old" in its data: none of them may answer "old".
    let reads: Vec<_> = (0..16)
        .map(|_| {
            let mut kv = paused.clone();
            tokio::spawn(async move {
                let request = GetRequest { header: None, key: Bytes::from("k"), consistency: 0, max_staleness_ms: 0 };
                tokio::time::timeout(Duration::from_secs(5), kv.get(request)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.nodes[leader].signal("-CONT");
    for read in reads {
        if let Ok(Ok(answer)) = read.await.expect("the read task") {
            assert_eq!(answer.into_inner().value, Bytes::from("new"), "the woken leader served a stale read");
        }
    }

    // Cut off from both others, a node acknowledges neither writes nor linearizable reads.
    let alone = (0..3).find(|&i| i != new_leader).expect("a node other than the leader");
    for index in (0..3).filter(|&i| i != alone) {
        fleet.nodes[index].kill9();
    }
    assert!(!fleet.acknowledges_a_write(alone, "k").await, "a node without a majority acknowledged a write");
    let mut kv = fleet.nodes[alone].kv();
    let read = tokio::time::timeout(
        Duration::from_secs(4),
        kv.get(GetRequest { header: None, key: Bytes::from("k"), consistency: 0, max_staleness_ms: 0 }),
    )
    .await;
    assert!(!matches!(read, Ok(Ok(_))), "a node without a majority served a linearizable read: {read:?}");

    // The majority back: the acknowledged value, never the refused one.
    for index in (0..3).filter(|&i| i != alone) {
        fleet.nodes[index].spawn();
    }
    let value = client.get("k").await.expect("the majority serves again");
    assert_eq!(value, Some(Bytes::from("new")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_killed_at_once_comes_back_with_every_acknowledged_write() {
    let mut fleet = Fleet::start(3);
    fleet.leader(None).await;
    let client = fleet.client();
    let written = keys(200);
    for key in &written {
        client.put(key.clone(), key.clone()).await.expect("write");
    }
    for node in &mut fleet.nodes {
        node.kill9();
    }
    for node in &mut fleet.nodes {
        node.spawn();
    }
    fleet.leader(None).await;
    let client = fleet.client();
    for key in &written {
        let value = client.get(key.clone()).await.expect("read after the restart");
        assert_eq!(value.as_ref(), Some(key), "{key:?} after kill -9 of every node");
    }
}

/// A node of a replicated fleet stops promptly on SIGTERM: its peers' Raft streams (which never
/// end on their own) end when it stops, instead of holding the graceful shutdown for its whole
/// grace period (10 s). Every write acknowledged before is still there after it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replicated_node_stops_on_sigterm_without_waiting_out_its_grace_period() {
    let mut fleet = Fleet::start(3);
    let leader = fleet.leader(None).await;
    let client = fleet.client();
    let written = keys(100);
    for key in &written {
        client.put(key.clone(), key.clone()).await.expect("write");
    }
    // Streams from both peers are open and busy with probes; stop a follower, then the leader.
    let follower = (leader + 1) % 3;
    for index in [follower, leader] {
        let started = Instant::now();
        let status = fleet.nodes[index].terminate();
        let took = started.elapsed();
        assert!(status.success(), "node {index} exited with {status:?} after SIGTERM");
        assert!(took < Duration::from_secs(6), "node {index} took {took:?} to stop (its grace period is 10 s)");
        fleet.nodes[index].spawn();
    }
    fleet.leader(None).await;
    let client = fleet.client();
    for key in &written {
        let value = client.get(key.clone()).await.expect("read after the restarts");
        assert_eq!(value.as_ref(), Some(key), "{key:?} after two restarts");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_reads_are_served_by_followers_and_never_miss_an_acknowledged_write() {
    let mut fleet = Fleet::start(3);
    let leader = fleet.leader(None).await;
    let client = fleet.client();
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let mut on_followers: Vec<_> =
        followers.iter().map(|&i| (fleet.nodes[i].node_id.clone(), fleet.nodes[i].kv())).collect();
    let follower_read = || GetRequest {
        header: None,
        key: Bytes::from("k"),
        consistency: ReadConsistency::Follower as i32,
        max_staleness_ms: 0,
    };
    for version in 1..=100u64 {
        client.put("k", version.to_string()).await.expect("write");
        // Acknowledged before the read starts: a follower must not answer anything older.
        let (node_id, kv) = &mut on_followers[version as usize % 2];
        let answer = kv.get(follower_read()).await.expect("a follower read").into_inner();
        assert_eq!(answer.value, Bytes::from(version.to_string()), "follower {node_id} after write {version}");
        assert_eq!(answer.header.map(|h| h.node_id).as_deref(), Some(node_id.as_str()), "served by the follower");
    }
    // The default (linearizable) read on a follower points at the leader instead.
    let (_, kv) = &mut on_followers[0];
    let status = kv
        .get(GetRequest { header: None, key: Bytes::from("k"), consistency: 0, max_staleness_ms: 0 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    // Through the client, follower reads spread over the replicas and see the last write.
    for _ in 0..20 {
        let value = client.get_with("k", ReadConsistency::Follower).await.expect("a follower read via the client");
        assert_eq!(value, Some(Bytes::from("100")));
    }
    // With the leader gone, a follower read is refused (no leader to confirm), never stale.
    fleet.nodes[leader].kill9();
    let (_, kv) = &mut on_followers[0];
    let read = tokio::time::timeout(Duration::from_secs(3), kv.get(follower_read())).await;
    if let Ok(Ok(answer)) = read {
        assert_eq!(answer.into_inner().value, Bytes::from("100"), "a follower read after the leader died");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_replicas_survive_two_kills_and_refuse_writes_after_a_third() {
    let mut fleet = Fleet::start(5);
    let leader = fleet.leader(None).await;
    let client = fleet.client();
    let workload = HistoryWorkload::start(client.clone(), keys(16), 2, 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The leader and one follower: three of five remain, a majority.
    let follower = (0..5).find(|&i| i != leader).expect("a follower");
    fleet.nodes[leader].kill9();
    fleet.nodes[follower].kill9();
    client.put("probe", "two of five down").await.expect("three of five still take writes");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (report, space) = workload.finish().await;
    assert!(report.violations.is_empty(), "history violations: {:?}", report.violations);
    let wrong = space.verify_final(&client).await;
    assert!(wrong.is_empty(), "acknowledged writes lost: {wrong:?}");

    // A third down: two of five cannot commit, and say so rather than acknowledge.
    let third = fleet.leader(Some(leader)).await;
    fleet.nodes[third].kill9();
    let survivor = (0..5).find(|&i| fleet.nodes[i].is_running()).expect("a node still runs");
    assert!(!fleet.acknowledges_a_write(survivor, "probe").await, "two of five acknowledged a write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_the_compacted_log_gets_a_snapshot_even_across_crashes_while_installing_it() {
    // Logs keep 20 applied entries: a follower down for 100 writes can only catch up by snapshot.
    let mut fleet = Fleet::start_with(3, &["--raft-log-keep-entries", "20"]);
    let leader = fleet.leader(None).await;
    let (lagging, other) = ((leader + 1) % 3, (leader + 2) % 3);
    let client = fleet.client();
    let mut acked = std::collections::HashMap::new();
    let mut deleted = std::collections::HashSet::new();
    let write = async |acked: &mut std::collections::HashMap<Bytes, Bytes>, key: String, value: String| {
        client.put(key.clone(), value.clone()).await.unwrap_or_else(|e| panic!("write {key}: {e}"));
        acked.insert(Bytes::from(key), Bytes::from(value));
    };
    for i in 0..50 {
        write(&mut acked, format!("key{i:03}"), format!("first-{i}")).await;
    }
    // Each round: the follower misses 100 writes (overwrites and new keys) and deletes of keys it
    // holds, the leader compacts, and the follower restarts armed to crash at one step
    // of installing the snapshot; it must crash there (the snapshot path was taken), then come
    // back clean and finish the install at start.
    for (round, crash_at) in ["snapshot-install-before-data", "snapshot-install-before-applied"].iter().enumerate() {
        fleet.nodes[lagging].kill9();
        for i in 0..100 {
            let key = format!("key{:03}", (i * 7 + round * 13) % 120);
            write(&mut acked, key, format!("round{round}-{i}")).await;
        }
        for i in (round..50).step_by(5) {
            let key = Bytes::from(format!("key{i:03}"));
            client.delete(key.clone()).await.unwrap_or_else(|e| panic!("delete {key:?}: {e}"));
            acked.remove(&key);
            deleted.insert(key);
        }
        // Compaction runs once a second (given five, for a loaded machine).
        tokio::time::sleep(Duration::from_secs(5)).await;
        fleet.nodes[lagging].env = vec![("KVFLEET_CRASH_AT".into(), crash_at.to_string())];
        fleet.nodes[lagging].spawn();
        assert!(
            fleet.nodes[lagging].exits_within(Duration::from_secs(30)).await,
            "the restarted follower never reached {crash_at}: it did not install a snapshot"
        );
        fleet.nodes[lagging].kill9();
        fleet.nodes[lagging].env.clear();
        fleet.nodes[lagging].spawn();
    }
    // Without the other follower, the leader needs the one that took the snapshot to commit.
    fleet.nodes[other].kill9();
    for i in 0..20 {
        write(&mut acked, format!("after{i:02}"), format!("after-{i}")).await;
    }
    deleted.retain(|key| !acked.contains_key(key));
    assert!(!deleted.is_empty(), "the test deletes keys the follower held");
    // Its own data holds every acknowledged write (follower reads are served from it).
    let mut kv = fleet.nodes[lagging].kv();
    for (key, value) in &acked {
        let request = GetRequest {
            header: None,
            key: key.clone(),
            consistency: ReadConsistency::Follower as i32,
            max_staleness_ms: 0,
        };
        let answer = kv.get(request).await.expect("a read on the follower that took the snapshot").into_inner();
        assert_eq!(&answer.value, value, "key {key:?} on the follower that took the snapshot");
    }
    for key in &deleted {
        let request = GetRequest {
            header: None,
            key: key.clone(),
            consistency: ReadConsistency::Follower as i32,
            max_staleness_ms: 0,
        };
        let answer = kv.get(request).await.expect("a read on the follower that took the snapshot").into_inner();
        assert!(!answer.found, "key {key:?} was deleted while the follower was down, and it still has it");
    }
    // And with the leader gone, it and the other follower still hold everything.
    fleet.nodes[leader].kill9();
    fleet.nodes[other].spawn();
    kvfleet_e2e::assert_all_acked_readable(&client, &acked).await;
}

/// Reads of bounded staleness: served by followers, under load and a follower's kill -9 never
/// older than their bound (the history checker notes each key's acknowledged version and reads
/// it a bound later); with the leader paused, a follower that was current within the bound
/// still answers at once (no round trip to the leader), while a follower read cannot; a bound
/// of 0 or over 60 s is refused with the limit named.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_reads_stay_within_their_bound_and_need_no_leader_within_it() {
    let mut fleet = Fleet::start(3);
    let leader = fleet.leader(None).await;
    let client = fleet.client();
    let bound = Duration::from_millis(300);
    let mut workload = HistoryWorkload::start(client.clone(), keys(24), 4, 2);
    workload.add_stale_readers(&client, 6, 500, bound);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    fleet.nodes[follower].kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.nodes[follower].spawn();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (report, _) = workload.finish().await;
    assert!(report.violations.is_empty(), "history violations: {:?}", report.violations);
    assert!(report.reads > 100 && report.writes > 0, "{} reads, {} writes", report.reads, report.writes);

    // A follower known current a moment ago answers a read of a 60 s bound with the leader
    // paused.
    let other = (0..3).find(|&i| i != leader && i != follower).expect("another follower");
    client.put("k", "last").await.expect("a write");
    let mut kv = fleet.nodes[other].kv();
    let read = |consistency: ReadConsistency, max_staleness_ms: u32| GetRequest {
        header: None,
        key: Bytes::from("k"),
        consistency: consistency as i32,
        max_staleness_ms,
    };
    // A follower read (a read index) makes the follower current as of after the write; a read
    // of a 60 s bound may then be served from it alone.
    let answer = kv.get(read(ReadConsistency::Follower, 0)).await.expect("a follower read").into_inner();
    assert_eq!(answer.value, Bytes::from("last"), "a follower read sees the acknowledged write");
    fleet.nodes[leader].signal("-STOP");
    let started = Instant::now();
    let answer = kv.get(read(ReadConsistency::Stale, 60_000)).await.expect("a stale read, leader paused");
    assert_eq!(answer.into_inner().value, Bytes::from("last"));
    // No round trip to the paused leader (it would never answer): served locally.
    assert!(started.elapsed() < Duration::from_secs(2), "served locally: {:?}", started.elapsed());
    let follower_read =
        tokio::time::timeout(Duration::from_millis(500), kv.get(read(ReadConsistency::Follower, 0))).await;
    assert!(!matches!(follower_read, Ok(Ok(_))), "a follower read needs the paused leader: {follower_read:?}");
    fleet.nodes[leader].signal("-CONT");

    for bad in [0, 60_001] {
        let status = kv.get(read(ReadConsistency::Stale, bad)).await.expect_err("a bad bound is refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("from 1 to 60000"), "{}", status.message());
    }
}
