//! Who may administer a real node: admin calls carry the operator's epoch (once a newer epoch
//! has spoken to a node, even only to read, an older operator can change nothing there, and the
//! node remembers that across a kill -9), and the cluster's admin token (without it, nothing).

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

const TOKEN: &str = "5f0c1b2e9a8d7c6b5a4f3e2d1c0b9a88";

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ASCII"));
    }
    request.set_timeout(Duration::from_secs(10));
    request
}

/// Nodes started with the cluster's admin token refuse admin calls without it (with an error
/// that says what is missing), serve the data API and range metadata to anyone, and a move
/// between two of them works: the controller sends the token, and so do the nodes on their calls
/// to each other (Raft messages and snapshots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_clusters_token_and_moves_still_work() {
    use kvfleet_proto::admin_auth::AdminToken;
    use kvfleet_resharding::observe::NodeClients;
    use kvfleet_resharding::replica_moves::{Endpoint, move_replica};

    let dir = tempfile::tempdir().unwrap();
    let env = [("KVFLEET_ADMIN_TOKEN", TOKEN)];
    let source = NodeProcess::start_with_env("n1", &dir.path().join("n1"), &["--bootstrap"], &env);
    let target = NodeProcess::start_with_env("n2", &dir.path().join("n2"), &[], &env);

    let mut admin = source.admin();
    let bare = admin.split_range(with_token(split(1, "m"), None)).await.expect_err("no token");
    assert_eq!(bare.code(), Code::Unauthenticated);
    assert!(bare.message().contains("admin token"), "{}", bare.message());
    let wrong = admin.split_range(with_token(split(1, "m"), Some(&TOKEN.replace('5', "6")))).await;
    assert_eq!(wrong.expect_err("another cluster's token").code(), Code::Unauthenticated);
    // Range metadata is open (clients route with it), but an epoch from a caller without the
    // token is ignored: a stranger cannot fence the operator off.
    let mut stranger = with_token(ListRangesRequest {}, None);
    stranger.metadata_mut().insert(OPERATOR_EPOCH_HEADER, "999".parse().unwrap());
    let listed = admin.list_ranges(stranger).await.expect("metadata is open").into_inner();
    assert_eq!(listed.operator_epoch, 0, "the stranger's epoch was ignored");
    // So is the Raft transport, both ways of calling it: a stranger's Raft messages are refused.
    let mut raft = kvfleet_proto::v1::raft_transport_client::RaftTransportClient::new(source.channel());
    let batch =
        || kvfleet_proto::v1::RaftBatch { from_node_id: "stranger".into(), from_raft_id: 99, ..Default::default() };
    let called = raft.deliver(batch()).await.expect_err("a Deliver call without the token");
    assert_eq!(called.code(), Code::Unauthenticated, "{called:?}");
    let streamed = raft.deliver_stream(futures::stream::iter([batch()])).await.expect_err("a stream without the token");
    assert_eq!(streamed.code(), Code::Unauthenticated, "{streamed:?}");
    // The data API stays open.
    let client = kvfleet_e2e::client_for(&[&source, &target]);
    for i in 0..200 {
        client.put(format!("key{i:03}"), format!("value{i}")).await.expect("a write without any token");
    }

    let listed = admin.list_ranges(with_token(ListRangesRequest {}, Some(TOKEN))).await.expect("with the token");
    let range = listed.into_inner().ranges.remove(0);
    let endpoint = |node: &NodeProcess| Endpoint { node_id: node.node_id.clone(), address: node.address.clone() };
    let (from, to) = (endpoint(&source), endpoint(&target));
    let seeds = [source.address.clone()];
    let without = move_replica(&NodeClients::default(), range.range_id, &seeds, &from, &to, Duration::from_secs(3))
        .await
        .expect_err("a controller without the token moves nothing");
    assert!(without.to_string().contains("admin token"), "{without}");
    let clients = NodeClients::new(Default::default(), AdminToken::new(TOKEN).unwrap());
    let moved = move_replica(&clients, range.range_id, &seeds, &from, &to, Duration::from_secs(60))
        .await
        .expect("the move, with the token on every call (the target fetches its snapshot with it too)");
    let replicas: Vec<&str> = moved.replicas.iter().map(|r| r.node_id.as_str()).collect();
    assert_eq!(replicas, ["n2"], "{moved:?}");
    for i in 0..200 {
        let value = client.get(format!("key{i:03}")).await.expect("a read after the move");
        assert_eq!(value.as_deref(), Some(format!("value{i}").as_bytes()), "key{i:03}");
    }
}

/// A node with its own admin port (`--admin-listen`, as on Kubernetes, where a NetworkPolicy
/// opens it to the operator alone): changes are taken there only; the data port still answers
/// metadata and the reads peers make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_an_admin_port_takes_changes_there_only() {
    let dir = tempfile::tempdir().unwrap();
    let port = kvfleet_e2e::control_plane::free_port();
    let admin_listen = format!("127.0.0.1:{port}");
    let node = NodeProcess::start("n1", dir.path(), &["--bootstrap", "--admin-listen", &admin_listen]);

    let mut data_port = node.admin();
    let refused = data_port.split_range(from_epoch(split(1, "m"), None)).await.expect_err("not on the data port");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains(&format!("admin port ({port})")), "{}", refused.message());
    let listed = data_port.list_ranges(from_epoch(ListRangesRequest {}, None)).await.expect("metadata stays here");
    assert_eq!(listed.into_inner().ranges.len(), 1, "the refused split changed nothing");

    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{admin_listen}")).unwrap().connect().await.unwrap();
    let mut admin_port = kvfleet_proto::v1::admin_client::AdminClient::new(channel);
    admin_port.split_range(from_epoch(split(1, "m"), None)).await.expect("a change on the admin port");
    let listed = data_port.list_ranges(from_epoch(ListRangesRequest {}, None)).await.expect("metadata");
    assert_eq!(listed.into_inner().ranges.len(), 2);
}
