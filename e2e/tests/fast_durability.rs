//! `fast` durability on replicated ranges (real node processes on loopback): a write is
//! acknowledged once the leader's log holds it. Under a checked history of writers and
//! linearizable readers (through a follower's kill -9), no read is older than an acknowledged
//! write: the leader serves reads only once it has applied what it acknowledged. And the loss
//! window as documented: a leader cut off from its followers acknowledges writes in `fast` mode
//! (none in `majority` mode) until it steps down, and they are gone once the majority has
//! elected another leader and the partition heals. Splits and merges under load lose no write
//! acknowledged early.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_e2e::history::{HistoryWorkload, keys};
use kvfleet_e2e::replicated::ReplicatedFleet as Fleet;
use kvfleet_proto::v1::SplitRangeRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fast_acknowledgements_are_read_back_under_a_checked_history_through_a_followers_kill() {
    let mut fleet = Fleet::start_with(3, &["--replication-durability", "fast"]);
    let leader = fleet.leader(None).await;
    let client = fleet.client();
    let workload = HistoryWorkload::start(client.clone(), keys(32), 4, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let follower = (leader + 1) % 3;
    fleet.nodes[follower].kill9();
    let before = workload.space.acked_writes();
    tokio::time::sleep(Duration::from_secs(2)).await;
    workload.space.wait_for_writes_past(before, "writes stopped with a follower down").await;
    fleet.nodes[follower].spawn();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (report, space) = workload.finish().await;
    assert!(report.violations.is_empty(), "history violations: {:?}", report.violations);
    assert!(report.writes > 100 && report.reads > 100, "{} writes, {} reads", report.writes, report.reads);
    let wrong = space.verify_final(&client).await;
    assert!(wrong.is_empty(), "acknowledged writes lost without losing a leader: {wrong:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_leader_loses_what_it_acknowledged_in_fast_mode_and_acknowledges_nothing_in_majority_mode() {
    for mode in ["fast", "majority"] {
        let mut fleet = Fleet::start_partitionable_with(3, &["--replication-durability", mode]);
        let leader = fleet.leader(None).await;
        let client = fleet.client();
        client.put("before", "the partition").await.expect("a write before the partition");
        // In fast mode the write may be acknowledged before the followers have it: give them
        // time to (milliseconds on loopback), so that only the write after the cut is at risk.
        tokio::time::sleep(Duration::from_secs(1)).await;
        fleet.partitions.as_ref().expect("a partitionable fleet").isolate(leader, 3);
        let cut_at = Instant::now();
        // The cut-off leader still leads until check-quorum steps it down (about an election
        // timeout): in fast mode it acknowledges what it alone logged meanwhile.
        let acknowledged = fleet.acknowledges_a_write(leader, "minority").await;
        eprintln!(
            "{mode}: the cut-off leader acknowledged a write: {acknowledged} ({:?} after the cut)",
            cut_at.elapsed()
        );
        assert_eq!(acknowledged, mode == "fast", "{mode}: acknowledged by a leader cut off from its followers");
        let new_leader = fleet.leader(Some(leader)).await;
        client.put("after", "the new leader").await.expect("the majority takes writes");
        fleet.partitions.as_ref().expect("a partitionable fleet").heal();
        eprintln!("{mode}: node {new_leader} leads; healed {:?} after the cut", cut_at.elapsed());
        // The old leader follows the new one; its unreplicated tail is replaced.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let lost = client.get("minority").await.expect("a read after healing");
        assert_eq!(lost, None, "{mode}: a write only the cut-off leader logged was applied");
        let kept = client.get("before").await.expect("a read after healing");
        assert_eq!(kept.as_deref(), Some(&b"the partition"[..]), "{mode}: a replicated write was lost");
    }
}

/// Splits and merges through the log under load in `fast` mode: no write acknowledged early is
/// ordered after a split or freeze that refuses it (every acknowledged write is read back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn splits_and_merges_under_load_in_fast_mode_lose_no_acknowledged_write() {
    let mut fleet = Fleet::start_with(3, &["--replication-durability", "fast"]);
    fleet.leader(None).await;
    let client = fleet.client();
    let workload = HistoryWorkload::start(client.clone(), keys(32), 6, 2);
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let request = SplitRangeRequest { range_id: 1, split_key: Bytes::from("key016"), ..Default::default() };
        let leader = fleet.leader(None).await;
        let right = fleet.nodes[leader].admin().split_range(request).await.expect("a split under load").into_inner();
        let right_id = right.right.expect("the right half").range_id;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let endpoints = fleet.addresses();
        let merged = kvfleet_resharding::replica_merges::merge_replicated(
            &kvfleet_resharding::observe::NodeClients::default(),
            1,
            right_id,
            &endpoints,
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("merge {round}: {e}"));
        assert!(merged.end_key.is_empty(), "round {round}: merged into {merged:?}");
    }
    let (report, space) = workload.finish().await;
    assert!(report.violations.is_empty(), "history violations: {:?}", report.violations);
    assert!(report.writes > 100, "{} writes", report.writes);
    let wrong = space.verify_final(&client).await;
    assert!(wrong.is_empty(), "acknowledged writes lost without losing a leader: {wrong:?}");
}
