//! Ownership: a node serves only keys in ranges it owns at the current generation, answers a
//! typed NotOwner (in the status details) otherwise, forwards one hop when asked, and the client
//! recovers from stale routing on its own.

use bytes::Bytes;
use kvfleet_e2e::{NodeProcess, client_for};
use kvfleet_proto::errors::not_owner_detail;
use kvfleet_proto::v1::{GetRequest, ListRangesRequest, PublishRoutingRequest, PutRequest, RequestHeader};

fn header(range_id: u64, generation: u64, allow_forward: bool) -> Option<RequestHeader> {
    Some(RequestHeader { range_id, generation, allow_forward })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_generation_gets_not_owner_with_the_current_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start("n1", dir.path(), &["--bootstrap"]);
    let mut kv = node.kv();
    kv.put(PutRequest { header: header(1, 1, false), key: Bytes::from("z1"), value: Bytes::from("v") })
        .await
        .expect("put at gen 1");
    node.split(1, "m", 3).await;

    let status = kv
        .get(GetRequest { header: header(1, 1, false), key: Bytes::from("z1"), consistency: 0, max_staleness_ms: 0 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let detail = not_owner_detail(&status).expect("typed NotOwner detail");
    let hint = detail.hint.expect("hint");
    assert_eq!((hint.range_id, hint.generation), (3, 2));
    assert_eq!(hint.leader().unwrap().node_id, "n1");
    assert_eq!(detail.node_id, "n1");

    // With the hint's routing the request is served.
    let found = kv
        .get(GetRequest { header: header(3, 2, false), key: Bytes::from("z1"), consistency: 0, max_staleness_ms: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(found.found);
    assert_eq!(found.header.unwrap().range_id, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_recovers_from_a_stale_cache() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start("n1", dir.path(), &["--bootstrap"]);
    let client = node.client();
    client.put(Bytes::from("a"), Bytes::from("1")).await.unwrap();
    client.put(Bytes::from("z"), Bytes::from("2")).await.unwrap();
    assert_eq!(client.cached_ranges().len(), 1);
    node.split(1, "m", 3).await;
    // The client still routes to range 1 at generation 1; it must learn the split and retry.
    assert_eq!(client.get(Bytes::from("z")).await.unwrap(), Some(Bytes::from("2")));
    assert_eq!(client.get(Bytes::from("a")).await.unwrap(), Some(Bytes::from("1")));
    let ids: Vec<u64> = client.cached_ranges().iter().map(|r| r.range_id).collect();
    // A split keeps the range's id (and Raft group) for its left half.
    assert_eq!(ids, vec![1, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_own_the_key_hints_or_forwards() {
    let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let owner = NodeProcess::start("n1", dir1.path(), &["--bootstrap"]);
    let other = NodeProcess::start("n2", dir2.path(), &[]);
    let mut kv = other.kv();

    // Knows nothing yet: NotOwner without a hint.
    let status = kv
        .get(GetRequest { header: None, key: Bytes::from("k"), consistency: 0, max_staleness_ms: 0 })
        .await
        .unwrap_err();
    let detail = not_owner_detail(&status).expect("typed NotOwner");
    assert!(detail.hint.is_none());
    assert!(status.message().contains("knows no owner"), "{}", status.message());

    // Publish the cluster map to n2: now it points at n1, and forwards when allowed.
    let map = owner.admin().list_ranges(ListRangesRequest {}).await.unwrap().into_inner().ranges;
    other.admin().publish_routing(PublishRoutingRequest { ranges: map }).await.unwrap();
    let status = kv.put(PutRequest { header: None, key: Bytes::from("k"), value: Bytes::from("v") }).await.unwrap_err();
    let hint = not_owner_detail(&status).and_then(|d| d.hint).expect("hint after publish");
    assert_eq!(hint.leader().unwrap().address, owner.address);

    let put = kv
        .put(PutRequest { header: header(0, 0, true), key: Bytes::from("k"), value: Bytes::from("v") })
        .await
        .expect("forwarded put")
        .into_inner();
    assert_eq!(put.header.unwrap().node_id, "n1", "served by the owner");
    let got = owner
        .kv()
        .get(GetRequest { header: None, key: Bytes::from("k"), consistency: 0, max_staleness_ms: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, Bytes::from("v"));

    // A client that only knows n2 learns the owner from n2's routing hints.
    let client = client_for(&[&other]);
    assert_eq!(client.get(Bytes::from("k")).await.unwrap(), Some(Bytes::from("v")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rides_out_a_node_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::start("n1", dir.path(), &["--bootstrap"]);
    let client = node.client();
    client.put(Bytes::from("k"), Bytes::from("before")).await.unwrap();
    node.kill9();
    let restart = tokio::task::spawn_blocking(move || {
        std::thread::sleep(std::time::Duration::from_millis(500));
        node.spawn();
        node
    });
    // Issued while the node is down: retried with backoff until it is back.
    client.put(Bytes::from("k"), Bytes::from("after")).await.expect("put across restart");
    let node = restart.await.unwrap();
    assert_eq!(node.client().get(Bytes::from("k")).await.unwrap(), Some(Bytes::from("after")));
}
