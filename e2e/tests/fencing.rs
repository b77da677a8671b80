//! Operator fencing on a real node: admin calls carry the operator's epoch; once a newer epoch
//! has spoken to a node (even only to read), an older operator can change nothing there, and the
//! node remembers that across a kill -9.

use std::time::Duration;

use kvfleet_e2e::NodeProcess;
use kvfleet_proto::OPERATOR_EPOCH_HEADER;
use kvfleet_proto::v1::{ListRangesRequest, PublishRoutingRequest, SplitRangeRequest};
use tonic::Code;

fn from_epoch<T>(message: T, epoch: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(epoch) = epoch {
        request.metadata_mut().insert(OPERATOR_EPOCH_HEADER, epoch.parse().expect("an ASCII header value"));
    }
    request.set_timeout(Duration::from_secs(10));
    request
}

fn split(range_id: u64, key: &str) -> SplitRangeRequest {
    SplitRangeRequest {
        range_id,
        expected_generation: 0,
        split_key: bytes::Bytes::copy_from_slice(key.as_bytes()),
        left_id: 0,
        right_id: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_changes_from_an_operator_older_than_one_it_has_seen() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::start("n1", dir.path(), &["--bootstrap"]);
    let mut admin = node.admin();

    // A node that never saw an epoch obeys calls that carry none (the playground, kvctl).
    let halves = admin.split_range(from_epoch(split(1, "m"), None)).await.expect("no operator yet").into_inner();
    let right = halves.right.expect("a right half").range_id;

    // Operator epoch 3 only reads (its first round): that alone fences off epoch 2.
    let listed = admin.list_ranges(from_epoch(ListRangesRequest {}, Some("3"))).await.expect("a read").into_inner();
    assert_eq!(listed.operator_epoch, 3, "the node reports the newest epoch it has seen");
    let stale = admin.split_range(from_epoch(split(right, "t"), Some("2"))).await.expect_err("epoch 2 is deposed");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(
        stale.message().contains("epoch 2") && stale.message().contains("epoch 3"),
        "the refusal names both epochs: {}",
        stale.message()
    );
    let unnamed = admin.split_range(from_epoch(split(right, "t"), None)).await.expect_err("no epoch is the oldest");
    assert_eq!(unnamed.code(), Code::FailedPrecondition);
    let routing = admin.publish_routing(from_epoch(PublishRoutingRequest { ranges: vec![] }, Some("1"))).await;
    assert_eq!(routing.expect_err("routing is a change too").code(), Code::FailedPrecondition);
    // Reads from the deposed operator are still answered (they change nothing).
    admin.list_ranges(from_epoch(ListRangesRequest {}, Some("2"))).await.expect("a read from an old epoch");
    let garbage = admin.list_ranges(from_epoch(ListRangesRequest {}, Some("three"))).await.expect_err("not a number");
    assert_eq!(garbage.code(), Code::InvalidArgument);
    assert!(garbage.message().contains(OPERATOR_EPOCH_HEADER), "{}", garbage.message());

    // The fence is persisted before the call that raised it proceeds: it survives kill -9.
    node.kill9();
    node.spawn();
    let mut admin = node.admin();
    let after = admin.split_range(from_epoch(split(right, "t"), Some("2"))).await.expect_err("still deposed");
    assert_eq!(after.code(), Code::FailedPrecondition);
    let current = admin.split_range(from_epoch(split(right, "t"), Some("3"))).await.expect("the current operator");
    assert!(current.into_inner().left.is_some());
    let listed = admin.list_ranges(from_epoch(ListRangesRequest {}, None)).await.expect("a read").into_inner();
    assert_eq!(listed.operator_epoch, 3);
    assert_eq!(listed.ranges.len(), 3, "exactly the two splits that were allowed happened");
}
