//! Range ids people read and type: the resharding loop hands them out in order (1 at bootstrap,
//! then 2, 3, ...), also for splits and merges made by hand with `kvctl`, saved before it answers,
//! so a loop killed with -9 right after a reservation never hands the same ids out again. A loop
//! refuses ids for a node of another fleet, and bad requests are refused naming the limit.

use std::time::Duration;

use kvfleet_e2e::kvctl::KvctlRun;
use kvfleet_e2e::{Playground, assert_one_owner_per_key, wait_until};
use kvfleet_proto::v1::ReserveRangeIdsRequest;
use kvfleet_proto::v1::controller_client::ControllerClient;

/// Runs kvctl against the playground, asking `controller` for new range ids.
fn kvctl(playground: &Playground, controller: &str, args: &[&str]) -> KvctlRun {
    kvfleet_e2e::kvctl::run(
        &playground.addresses(),
        &[&["--controller", controller, "--output", "json"], args].concat(),
    )
}

/// The range ids a successful kvctl split or merge printed (JSON).
fn printed_ids(playground: &Playground, args: &[&str]) -> Vec<u64> {
    let json = kvctl(playground, &playground.control, args).json(&format!("{args:?}"));
    let views = json.as_array().cloned().unwrap_or_else(|| vec![json.clone()]);
    views.iter().map(|v| v["range_id"].as_u64().unwrap_or_else(|| panic!("no range_id in {v}"))).collect()
}

async fn reserve(playground: &Playground, count: u32, node_address: &str) -> Result<u64, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", playground.control))
        .expect("valid address")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .connect_lazy();
    let request = ReserveRangeIdsRequest { count, node_address: node_address.to_string() };
    ControllerClient::new(channel).reserve_range_ids(request).await.map(|r| r.into_inner().first)
}

async fn range_ids(playground: &Playground) -> Vec<u64> {
    let mut ids: Vec<u64> = playground.status().await.ranges.iter().map(|r| r.range_id).collect();
    ids.sort_unstable();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_made_splits_and_merges_take_the_next_ids_from_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    // One node: nothing moves, so the ids below are the loop's sequence and nothing else.
    let mut playground = Playground::start(&dir.path().join("fleet"), 1, &["--interval-secs", "0.5"], &[]);
    wait_until("range 1", Duration::from_secs(30), async || range_ids(&playground).await == [1]).await;

    // A range is a Raft group (of one voter here): the left half of a split and a merge keep
    // the left range's id, the right half of a split takes the next one.
    assert_eq!(printed_ids(&playground, &["split", "user5"]), [1, 2]);
    assert_eq!(printed_ids(&playground, &["merge", "user1"]), [1]);
    assert_eq!(printed_ids(&playground, &["split", "user3"]), [1, 3]);

    // Reserved and never used, then the loop is killed at once: a restarted loop skips them
    // although no node ever saw them (they were saved before the answer).
    let node = playground.addresses()[0].clone();
    assert_eq!(reserve(&playground, 2, &node).await.expect("a reservation"), 4);
    playground.kill9_controller();
    playground.spawn();
    assert_eq!(printed_ids(&playground, &["split", "user7"]), [3, 6]);
    wait_until("the loop sees ranges 1, 3 and 6", Duration::from_secs(30), async || {
        range_ids(&playground).await == [1, 3, 6]
    })
    .await;
    assert_one_owner_per_key(&playground.addresses()).await;

    // Ids for a node of another fleet, or too many at once: refused, naming why.
    let foreign = reserve(&playground, 2, "127.0.0.1:1").await.unwrap_err();
    assert_eq!(foreign.code(), tonic::Code::FailedPrecondition);
    assert!(foreign.message().contains("127.0.0.1:1 is not one of this resharding loop's nodes"), "{foreign:?}");
    let too_many = reserve(&playground, 17, &node).await.unwrap_err();
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument);
    assert_eq!(too_many.message(), "count must be between 1 and 16 (got 17)");

    // A loop named with --controller that does not answer: kvctl refuses, and nothing splits.
    let refused = kvctl(&playground, "127.0.0.1:1", &["split", "user8"]);
    assert!(!refused.succeeded && refused.stderr.contains("127.0.0.1:1"), "{refused:?}");
    assert_eq!(range_ids(&playground).await, [1, 3, 6]);
    assert_eq!(playground.stop().code(), Some(0));
}
