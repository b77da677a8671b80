//! Export sessions (the source side of a move) that nothing can use any more are dropped, so
//! their captures stop growing: an abandoned export of an active range after its idle limit, an
//! export whose range was split away at once; a frozen range's export is kept.

use bytes::Bytes;
use clap::Parser;
use kvfleet_node::config::NodeConfig;
use kvfleet_node::metrics::NodeMetrics;
use kvfleet_node::node::Node;
use kvfleet_proto::v1::{ExportSnapshotRequest, ExportTailRequest, FreezeForMoveRequest, Replica, SplitRangeRequest};
use std::time::Duration;

async fn bootstrapped_node(dir: &std::path::Path) -> Node {
    let config =
        NodeConfig::parse_from(["kvfleet-node", "--node-id", "n1", "--data-dir", dir.to_str().unwrap(), "--bootstrap"]);
    Node::open(config, NodeMetrics::new(&mut prometheus_client::registry::Registry::default())).await.unwrap()
}

/// Starts an export and reads its whole snapshot (the reader thread then ends by itself).
async fn export(node: &Node, range_id: u64, generation: u64, move_id: u64) -> u64 {
    let request = ExportSnapshotRequest { range_id, generation, move_id, chunk_pairs: 0 };
    let (_, export_id, mut chunks) = node.export_snapshot(&request).await.expect("export");
    while let Some(chunk) = chunks.recv().await {
        chunk.expect("a snapshot chunk");
    }
    export_id
}

fn tail(node: &Node, range_id: u64, move_id: u64, export_id: u64) -> Result<u64, String> {
    let request = ExportTailRequest { range_id, move_id, from_seq: 1, max_entries: 10, export_id };
    node.export_tail(&request).map(|t| t.next_seq).map_err(|e| e.to_string())
}

#[tokio::test]
async fn exports_nothing_can_use_are_dropped_and_a_frozen_ranges_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let node = bootstrapped_node(dir.path()).await;
    let export_id = export(&node, 1, 1, 7).await;
    node.put(None, Bytes::from("k"), Bytes::from("v")).await.unwrap();
    assert!(tail(&node, 1, 7, export_id).is_ok());
    assert!(tail(&node, 1, 7, export_id ^ 2).unwrap_err().contains("was restarted"), "a stale export id is refused");

    // Read a moment ago: kept under a limit of a minute, dropped under a limit of zero.
    assert_eq!(node.drop_stale_exports(Duration::from_secs(60)), 0);
    assert_eq!(node.drop_stale_exports(Duration::ZERO), 1);
    assert!(tail(&node, 1, 7, export_id).unwrap_err().contains("no export"));

    // A frozen range keeps its export whatever its age.
    let export_id = export(&node, 1, 1, 8).await;
    let target = Replica {
        node_id: "n2".into(),
        address: "127.0.0.1:9".into(),
        role: 1,
        raft_id: 0,
        behind_entries: None,
        membership: 0,
    };
    let freeze = FreezeForMoveRequest { range_id: 1, move_id: 8, target: Some(target), new_generation: 2 };
    node.freeze_for_move(&freeze).await.unwrap();
    assert_eq!(node.drop_stale_exports(Duration::ZERO), 0);
    assert!(tail(&node, 1, 8, export_id).is_ok());

    // An export whose range is gone (split away) is dropped at once.
    let other = tempfile::tempdir().unwrap();
    let first = node;
    let node = bootstrapped_node(other.path()).await;
    export(&node, 1, 1, 9).await;
    let split =
        SplitRangeRequest { range_id: 1, expected_generation: 1, split_key: Bytes::from("m"), left_id: 2, right_id: 3 };
    node.split(split).await.unwrap();
    assert_eq!(node.drop_stale_exports(Duration::from_secs(3600)), 1);
    // Stop the Raft thread and the write pipelines before the process exits (RocksDB must not
    // be torn down under its own threads).
    node.shutdown().unwrap();
    first.shutdown().unwrap();
}
