//! What OK promises: acknowledged writes and range descriptors survive kill -9 (sync mode, and
//! async mode for a process crash), and SIGTERM drains in-flight requests before exiting.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kvfleet_e2e::{NodeProcess, assert_all_acked_readable};
use tokio::sync::Mutex;

/// Runs `writers` tasks that put distinct keys until stopped; returns the acknowledged writes.
async fn write_until_killed(node: &mut NodeProcess, writers: usize, run_for: Duration) -> HashMap<Bytes, Bytes> {
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let kv = node.kv();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut kv = kv;
            for i in 0..1_000_000u64 {
                let key = Bytes::from(format!("w{writer:02}-{i:08}"));
                let value = Bytes::from(format!("value-{writer}-{i}"));
                let request = kvfleet_proto::v1::PutRequest { header: None, key: key.clone(), value: value.clone() };
                match kv.put(request).await {
                    Ok(_) => {
                        acked.lock().await.insert(key, value);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(run_for).await;
    node.kill9();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
    }
    Arc::try_unwrap(acked).expect("writers finished").into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_keeps_every_acknowledged_write_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::start("n1", dir.path(), &["--bootstrap", "--durability", "sync"]);
    // Split first, so descriptors other than the bootstrap range must survive too.
    let client = node.client();
    let ranges_before = {
        let mut admin = node.admin();
        admin
            .split_range(kvfleet_proto::v1::SplitRangeRequest {
                range_id: 1,
                split_key: Bytes::from("w08"),
                right_id: 3,
                ..Default::default()
            })
            .await
            .expect("split");
        let mut ranges = admin.list_ranges(kvfleet_proto::v1::ListRangesRequest {}).await.unwrap().into_inner().ranges;
        ranges.sort_by_key(|r| r.range_id);
        ranges
    };
    drop(client);

    let acked = write_until_killed(&mut node, 16, Duration::from_millis(1500)).await;
    assert!(acked.len() > 100, "too few writes acknowledged to mean anything: {}", acked.len());

    node.spawn();
    assert_all_acked_readable(&node.client(), &acked).await;
    let mut ranges_after =
        node.admin().list_ranges(kvfleet_proto::v1::ListRangesRequest {}).await.unwrap().into_inner().ranges;
    ranges_after.sort_by_key(|r| r.range_id);
    assert_eq!(
        ranges_before
            .iter()
            .map(|r| (r.range_id, r.generation, r.start_key.clone(), r.end_key.clone()))
            .collect::<Vec<_>>(),
        ranges_after
            .iter()
            .map(|r| (r.range_id, r.generation, r.start_key.clone(), r.end_key.clone()))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_survives_a_process_crash() {
    // async mode acknowledges once the write is in the WAL in the OS page cache: a process crash
    // (unlike a power loss) loses nothing.
    let dir = tempfile::tempdir().unwrap();
    let mut node =
        NodeProcess::start("n1", dir.path(), &["--bootstrap", "--durability", "async", "--fsync-interval-ms", "60000"]);
    let acked = write_until_killed(&mut node, 16, Duration::from_millis(1000)).await;
    assert!(acked.len() > 100, "too few writes acknowledged: {}", acked.len());
    node.spawn();
    assert_all_acked_readable(&node.client(), &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_writes_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::start("n1", dir.path(), &["--bootstrap", "--durability", "async"]);
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let mut kv = node.kv();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..100_000u32 {
                let key = Bytes::from(format!("t{writer}-{i:06}"));
                let request =
                    kvfleet_proto::v1::PutRequest { header: None, key: key.clone(), value: Bytes::from_static(b"v") };
                if kv.put(request).await.is_err() {
                    break;
                }
                acked.push(key);
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = node.terminate();
        (status, node)
    })
    .await
    .unwrap();
    let (status, mut node) = status;
    assert!(status.success(), "node exited with {status:?} after SIGTERM");
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(tokio::time::timeout(Duration::from_secs(30), task).await.expect("writers stop").unwrap());
    }
    assert!(!acked.is_empty());
    node.spawn();
    let client = node.client();
    for key in &acked {
        assert!(client.get(key.clone()).await.unwrap().is_some(), "lost {key:?}");
    }
}
