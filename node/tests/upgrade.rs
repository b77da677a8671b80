//! A data directory written by an earlier version, whose ranges were single copies of the
//! retired freeze-and-copy protocol (no Raft group, no log): at start, the node adopts each
//! active one as a Raft group of itself alone, data and all, and that sticks across a restart;
//! it refuses to start, naming the range and what to do, while one is in the middle of such a
//! move. Real RocksDB, the node's real Raft thread; no gRPC.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use kvfleet_node::config::{Durability, NodeConfig};
use kvfleet_node::metrics::NodeMetrics;
use kvfleet_node::node::Node;
use kvfleet_node::ranges::{NODE_ID_KEY, bootstrap_descriptor, descriptor_write};
use kvfleet_node::replica::ReadMode;
use kvfleet_node::storage::{CF_META, Storage, WriteOp};
use kvfleet_proto::v1::{RangeDescriptor, RangeState, ReplicaMembership};
use prometheus_client::registry::Registry;

fn metrics() -> NodeMetrics {
    NodeMetrics::new(&mut Registry::default())
}

fn config(dir: &Path) -> NodeConfig {
    let dir = dir.to_str().expect("a UTF-8 path");
    NodeConfig::try_parse_from(["kvfleet-node", "--node-id", "n1", "--data-dir", dir, "--listen", "127.0.0.1:1"])
        .expect("a valid configuration")
}

/// What an earlier version left in `dir`: node n1 holding `ranges` and the data `pairs`.
async fn write_earlier_version(dir: &Path, ranges: &[RangeDescriptor], pairs: &[(&str, &str)]) {
    let storage =
        Storage::open(dir, Durability::Sync, Duration::from_secs(1), 4096, metrics().storage).expect("a store opens");
    let mut ops = vec![WriteOp::Put { cf: CF_META, key: Bytes::from_static(NODE_ID_KEY), value: Bytes::from("n1") }];
    ops.extend(ranges.iter().map(descriptor_write));
    ops.extend(pairs.iter().map(|(k, v)| WriteOp::put(Bytes::from(k.to_string()), Bytes::from(v.to_string()))));
    storage.write_durable(ops).await.expect("written");
    storage.shutdown().expect("shut down");
}

/// Two single copies from a split of range 1, and range 1's tombstone, as the earlier
/// version's split left them (its replicas carry no Raft id).
fn split_single_copies() -> Vec<RangeDescriptor> {
    let whole = bootstrap_descriptor("n1", "127.0.0.1:1");
    let left = RangeDescriptor { range_id: 10, end_key: Bytes::from("m"), generation: 2, ..whole.clone() };
    let right = RangeDescriptor { range_id: 11, start_key: Bytes::from("m"), generation: 2, ..whole.clone() };
    let retired =
        RangeDescriptor { state: RangeState::Retired as i32, generation: 2, successors: vec![10, 11], ..whole };
    assert!(!left.is_raft_group() && !right.is_raft_group(), "the earlier version's shape");
    vec![left, right, retired]
}

async fn read(node: &Node, key: &str) -> Option<Bytes> {
    let read = node.get(None, key.as_bytes(), ReadMode::Linearizable);
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("a read within 10 s").expect("a read").1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_copies_of_an_earlier_version_become_raft_groups_with_their_data() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    write_earlier_version(dir.path(), &split_single_copies(), &[("a", "old-a"), ("q", "old-q")]).await;

    let node = Node::open(config(dir.path()), metrics()).await.expect("the node starts");
    let mut ranges = node.owned_ranges();
    ranges.sort_by_key(|r| r.range_id);
    assert_eq!(ranges.iter().map(|r| r.range_id).collect::<Vec<_>>(), [10, 11], "{ranges:?}");
    for range in &ranges {
        assert!(range.is_raft_group(), "range {} adopted: {range:?}", range.range_id);
        assert_eq!(range.replicas.len(), 1);
        assert_eq!(
            (range.replicas[0].node_id.as_str(), range.replicas[0].membership()),
            ("n1", ReplicaMembership::Voter)
        );
        assert_eq!(range.generation, 2, "the keys and generation stay");
    }
    // The data is there, and the ranges take writes through their logs.
    assert_eq!(read(&node, "a").await.as_deref(), Some(&b"old-a"[..]));
    assert_eq!(read(&node, "q").await.as_deref(), Some(&b"old-q"[..]));
    let write = node.put(None, Bytes::from("q"), Bytes::from("new-q"));
    tokio::time::timeout(Duration::from_secs(10), write).await.expect("a write within 10 s").expect("a write");
    assert_eq!(read(&node, "q").await.as_deref(), Some(&b"new-q"[..]));
    node.shutdown().expect("shut down");
    drop(node);

    // Adopted for good: a restart opens the groups from their logs.
    let node = Node::open(config(dir.path()), metrics()).await.expect("the node starts again");
    assert!(node.owned_ranges().iter().all(RangeDescriptor::is_raft_group));
    assert_eq!(read(&node, "q").await.as_deref(), Some(&b"new-q"[..]));
    assert_eq!(read(&node, "a").await.as_deref(), Some(&b"old-a"[..]));
    node.shutdown().expect("shut down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_left_in_the_middle_of_an_earlier_versions_move_refuses_to_start() {
    for (state, side) in [(RangeState::Frozen, "frozen, moving it away"), (RangeState::Importing, "importing it")] {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut ranges = split_single_copies();
        ranges[1].state = state as i32;
        write_earlier_version(dir.path(), &ranges, &[("q", "old-q")]).await;
        let refused = match Node::open(config(dir.path()), metrics()).await {
            Ok(node) => panic!("started with range 11 {state:?}: {:?}", node.owned_ranges()),
            Err(error) => error.to_string(),
        };
        assert!(refused.contains("range 11 [m, +inf)"), "{refused}");
        assert!(refused.contains(side) && refused.contains("earlier version"), "{refused}");
    }
}
