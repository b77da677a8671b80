//! Network partitions between replicated node processes (three nodes on loopback; a proxy in
//! front of each node drops what a cut forbids, see `kvfleet_e2e::partition`), under writers and
//! readers checked by the history checker, with extra readers that know only the first leader
//! and keep asking it through the partition: a link cut between the leader and one follower
//! changes nothing; a leader cut off from both followers acknowledges nothing and, once its
//! lease has run out, serves no read older than what the majority's new leader acknowledged,
//! while the majority elects and goes on; after healing, every acknowledged write is there. A
//! split proposed by a cut-off leader never happens, and the majority's leader splits instead.
//! Five replicas split two against three behave the same way, whichever side the leader is on.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_client::{Client, ClientConfig};
use kvfleet_e2e::NodeProcess;
use kvfleet_e2e::history::{HistoryWorkload, keys};
use kvfleet_e2e::replicated::ReplicatedFleet as Fleet;
use kvfleet_proto::v1::SplitRangeRequest;

/// A client that knows only `node` (it follows the hints `node` gives, nothing else).
fn client_of(node: &NodeProcess) -> Client {
    let mut config = ClientConfig::new([node.address.clone()]);
    config.deadline = Duration::from_secs(5);
    config.attempt_timeout = Duration::from_secs(1);
    Client::new(config).expect("client config")
}

/// After healing: the history has no violation, every acknowledged write is there, and the
/// write a minority took into its log ("minority", see `acknowledges_a_write`) never committed.
async fn assert_nothing_lost_and_no_minority_write(workload: HistoryWorkload, client: &Client) {
    let (report, space) = workload.finish().await;
    assert!(report.violations.is_empty(), "history violations: {:?}", report.violations);
    assert!(report.writes > 0 && report.reads > 0, "the workload neither wrote nor read");
    let wrong = space.verify_final(client).await;
    assert!(wrong.is_empty(), "acknowledged writes lost: {wrong:?}");
    let minority = client.get("minority").await.expect("a read after healing");
    assert_eq!(minority, None, "a write no majority logged was applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_its_followers_acknowledges_nothing_serves_nothing_stale_and_the_majority_goes_on() {
    let mut fleet = Fleet::start_partitionable(3);
    let leader = fleet.leader(None).await;
    let (follower, other) = ((leader + 1) % 3, (leader + 2) % 3);
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(24), 4, 2);
    workload.add_readers(&client_of(&fleet.nodes[leader]), 4, 100);
    tokio::time::sleep(Duration::from_secs(2)).await;
    workload.space.wait_for_writes_past(0, "nothing acknowledged before the partitions").await;

    // One link cut: the follower that no longer hears the leader asks for votes, and the other
    // follower, which still hears the leader, refuses them (pre-vote, check-quorum).
    let partitions = fleet.partitions.as_ref().expect("a partitionable fleet");
    partitions.cut(leader, follower);
    let before = workload.space.acked_writes();
    tokio::time::sleep(Duration::from_secs(4)).await;
    workload.space.wait_for_writes_past(before, "writes stopped with one link cut").await;
    assert_eq!(fleet.leader(None).await, leader, "one cut link deposed the leader");
    fleet.partitions.as_ref().expect("a partitionable fleet").heal();

    // The leader cut off from both: the majority elects and takes writes; the old leader
    // acknowledges nothing, and the readers that know only it get no stale answer.
    fleet.partitions.as_ref().expect("a partitionable fleet").isolate(leader, 3);
    let cut_at = Instant::now();
    let new_leader = fleet.leader(Some(leader)).await;
    assert!(new_leader == follower || new_leader == other);
    client.put("probe", "after the partition").await.expect("the majority takes writes");
    eprintln!("leader cut off: node {new_leader} leads and took a write {:?} after the cut", cut_at.elapsed());
    let during = workload.space.acked_writes();
    assert!(!fleet.acknowledges_a_write(leader, "minority").await, "the cut-off leader acknowledged a write");
    tokio::time::sleep(Duration::from_secs(3)).await;
    workload.space.wait_for_writes_past(during, "the majority's writes stopped").await;

    // Healed: the old leader follows the new one.
    fleet.partitions.as_ref().expect("a partitionable fleet").heal();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_nothing_lost_and_no_minority_write(workload, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_proposed_by_a_cut_off_leader_never_happens_and_the_majority_splits_instead() {
    let mut fleet = Fleet::start_partitionable(3);
    let leader = fleet.leader(None).await;
    let client = fleet.client();
    let mut acked = std::collections::HashMap::new();
    for i in 0..30 {
        let (key, value) = (Bytes::from(format!("key{i:03}")), Bytes::from(format!("before-{i}")));
        client.put(key.clone(), value.clone()).await.unwrap_or_else(|e| panic!("{key:?}: {e}"));
        acked.insert(key, value);
    }
    // The leader, cut off, proposes a split: it cannot commit, and is not answered OK.
    fleet.partitions.as_ref().expect("a partitionable fleet").isolate(leader, 3);
    let request = SplitRangeRequest { range_id: 1, split_key: Bytes::from("key015"), ..Default::default() };
    let mut admin = fleet.nodes[leader].admin();
    let answer = tokio::time::timeout(Duration::from_secs(15), admin.split_range(request)).await;
    assert!(!matches!(answer, Ok(Ok(_))), "a cut-off leader answered a split OK: {answer:?}");
    // The majority elects and takes writes meanwhile.
    let new_leader = fleet.leader(Some(leader)).await;
    for i in 30..40 {
        let (key, value) = (Bytes::from(format!("key{i:03}")), Bytes::from(format!("majority-{i}")));
        client.put(key.clone(), value.clone()).await.unwrap_or_else(|e| panic!("{key:?}: {e}"));
        acked.insert(key, value);
    }
    // Healed: the split entry the old leader appended is replaced by the new leader's log, on it
    // too. Nobody split.
    fleet.partitions.as_ref().expect("a partitionable fleet").heal();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let whole: [(u64, &[u8], &[u8]); 1] = [(1, b"", b"")];
    for index in 0..3 {
        fleet.wait_for_ranges(index, &whole).await;
    }
    // The new leader splits at the same key; every node applies it, the old leader too.
    let request = SplitRangeRequest { range_id: 1, split_key: Bytes::from("key015"), ..Default::default() };
    let answer = fleet.nodes[new_leader].admin().split_range(request).await.expect("the new leader splits");
    let right = answer.into_inner().right.expect("the right half");
    let halves: [(u64, &[u8], &[u8]); 2] = [(1, b"", b"key015"), (right.range_id, b"key015", b"")];
    for index in 0..3 {
        fleet.wait_for_ranges(index, &halves).await;
    }
    kvfleet_e2e::assert_all_acked_readable(&client, &acked).await;
}

/// Cuts every node of `side` off from every node not in it, among `count` nodes.
fn split_apart(fleet: &Fleet, side: &[usize], count: usize) {
    let partitions = fleet.partitions.as_ref().expect("a partitionable fleet");
    for &a in side {
        for b in (0..count).filter(|b| !side.contains(b)) {
            partitions.cut(a, b);
        }
    }
}

/// Five replicas split two against three, the leader on the side of two (with readers that
/// know only it): those two acknowledge nothing and, once the lease has run out, serve no stale
/// read, while the three elect and go on. Healed, then split again with the leader among the
/// three: its writers do not notice. Every acknowledged write is there at the end (checked
/// history), and the write the side of two took into its log never is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_replicas_split_two_against_three_go_on_on_the_side_of_three_only() {
    let mut fleet = Fleet::start_partitionable(5);
    let leader = fleet.leader(None).await;
    let client = fleet.client();
    let mut workload = HistoryWorkload::start(client.clone(), keys(24), 4, 2);
    workload.add_readers(&client_of(&fleet.nodes[leader]), 4, 100);
    tokio::time::sleep(Duration::from_secs(2)).await;
    workload.space.wait_for_writes_past(0, "nothing acknowledged before the partitions").await;

    let two = [leader, (leader + 1) % 5];
    split_apart(&fleet, &two, 5);
    let cut_at = Instant::now();
    let new_leader = fleet.leader(Some(leader)).await;
    assert!(!two.contains(&new_leader), "node {new_leader} leads from the side of two");
    client.put("probe", "after the partition").await.expect("the side of three takes writes");
    eprintln!("two against three: node {new_leader} leads and took a write {:?} after the cut", cut_at.elapsed());
    for index in two {
        assert!(!fleet.acknowledges_a_write(index, "minority").await, "node {index} of the side of two acknowledged");
    }
    let during = workload.space.acked_writes();
    tokio::time::sleep(Duration::from_secs(3)).await;
    workload.space.wait_for_writes_past(during, "the side of three stopped taking writes").await;
    fleet.partitions.as_ref().expect("a partitionable fleet").heal();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The leader on the side of three this time: nothing changes for the writers.
    let leader = fleet.leader(None).await;
    split_apart(&fleet, &[(leader + 1) % 5, (leader + 2) % 5], 5);
    let before = workload.space.acked_writes();
    tokio::time::sleep(Duration::from_secs(4)).await;
    workload.space.wait_for_writes_past(before, "writes stopped with the leader among three").await;
    assert_eq!(fleet.leader(None).await, leader, "a side of two deposed the leader");
    fleet.partitions.as_ref().expect("a partitionable fleet").heal();
    tokio::time::sleep(Duration::from_secs(3)).await;

    assert_nothing_lost_and_no_minority_write(workload, &client).await;
}
