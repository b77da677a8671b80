//! Online range moves between two real nodes, driven step by step as the controller will drive
//! them: no acknowledged write is lost, writers see no error, the write freeze is short, and a
//! target killed mid-import or a source killed while frozen is recovered from.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_e2e::{NodeProcess, assert_all_acked_readable, client_for};
use kvfleet_proto::v1::*;

const MOVE_ID: u64 = 7;

fn replica(node: &NodeProcess) -> Replica {
    Replica { node_id: node.node_id.clone(), address: node.address.clone(), role: ReplicaRole::Leader as i32 }
}

async fn range_one(node: &NodeProcess) -> RangeDescriptor {
    let ranges = node.admin().list_ranges(ListRangesRequest {}).await.unwrap().into_inner().ranges;
    ranges.into_iter().find(|r| r.range_id == 1).expect("range 1 on the source")
}

/// What a writer saw: the last acknowledged value of each key, and the errors it got.
type WriterOutcome = (HashMap<Bytes, Bytes>, Vec<String>);

/// Writers that each update their own keys in a loop, remembering the last acknowledged value.
struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<WriterOutcome>>,
}

impl Writers {
    fn start(client: kvfleet_client::Client, count: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..count)
            .map(|w| {
                let (client, stop) = (client.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut acked, mut errors) = (HashMap::new(), Vec::new());
                    for i in 0..1_000_000u64 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let key = Bytes::from(format!("w{w}-{:03}", i % 200));
                        let value = Bytes::from(format!("{w}/{i}"));
                        match client.put(key.clone(), value.clone()).await {
                            Ok(()) => {
                                acked.insert(key, value);
                            }
                            Err(error) => errors.push(error.to_string()),
                        }
                    }
                    (acked, errors)
                })
            })
            .collect();
        Writers { stop, tasks }
    }

    async fn finish(self) -> WriterOutcome {
        self.stop.store(true, Ordering::Relaxed);
        let (mut acked, mut errors) = (HashMap::new(), Vec::new());
        for task in self.tasks {
            let (a, e) = tokio::time::timeout(Duration::from_secs(60), task).await.expect("writers stop").unwrap();
            acked.extend(a);
            errors.extend(e);
        }
        (acked, errors)
    }
}

async fn preload(client: &kvfleet_client::Client, count: usize) {
    for i in 0..count {
        client.put(Bytes::from(format!("p{i:05}")), Bytes::from(vec![b'x'; 200])).await.unwrap();
    }
}

/// Step 1-2 of a move: `target` imports `range` from `source`.
async fn import(
    target: &NodeProcess,
    source: &NodeProcess,
    range: &RangeDescriptor,
) -> Result<tonic::Response<ImportRangeResponse>, tonic::Status> {
    let request =
        ImportRangeRequest { range: Some(range.clone()), source_address: source.address.clone(), move_id: MOVE_ID };
    target.admin().import_range(request).await
}

/// Drives one move of range 1 from `source` to `target`; returns the write-freeze window.
async fn move_range_one(source: &NodeProcess, target: &NodeProcess) -> Duration {
    let desc = range_one(source).await;
    let imported = import(target, source, &desc).await.expect("import").into_inner();
    assert!(imported.pairs_copied > 0);
    let frozen_at = Instant::now();
    let final_seq = source
        .admin()
        .freeze_for_move(FreezeForMoveRequest {
            range_id: 1,
            move_id: MOVE_ID,
            target: Some(replica(target)),
            new_generation: desc.generation + 1,
        })
        .await
        .expect("freeze")
        .into_inner()
        .final_seq;
    hand_off(source, target, final_seq, desc.generation + 1).await;
    frozen_at.elapsed()
}

/// The handoff of range 1 after the freeze: the target completes the import at
/// `new_generation`, then the source retires the range, pointing at the new owner.
async fn hand_off(source: &NodeProcess, target: &NodeProcess, final_seq: u64, new_generation: u64) {
    let owned = target
        .admin()
        .complete_import(CompleteImportRequest { range_id: 1, move_id: MOVE_ID, final_seq, new_generation })
        .await
        .expect("complete")
        .into_inner()
        .range
        .expect("the completed import returns the owned descriptor");
    source
        .admin()
        .retire_moved(RetireMovedRequest { range_id: 1, move_id: MOVE_ID, new_owner: Some(owned) })
        .await
        .expect("retire");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_move_under_load_loses_nothing_and_writers_see_no_error() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = NodeProcess::start("n1", d1.path(), &["--bootstrap"]);
    let target = NodeProcess::start("n2", d2.path(), &[]);
    let client = client_for(&[&source, &target]);
    preload(&client, 2_000).await;
    let writers = Writers::start(client.clone(), 8);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let freeze = move_range_one(&source, &target).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (acked, errors) = writers.finish().await;

    assert!(errors.is_empty(), "writers saw errors: {:?}", &errors[..errors.len().min(5)]);
    assert!(acked.len() > 100);
    assert_all_acked_readable(&client, &acked).await;
    for i in (0..2_000).step_by(97) {
        assert!(client.get(Bytes::from(format!("p{i:05}"))).await.unwrap().is_some(), "preloaded key {i} lost");
    }
    let source_ranges = source.admin().list_ranges(ListRangesRequest {}).await.unwrap().into_inner().ranges;
    assert!(source_ranges.is_empty(), "the source still owns {source_ranges:?}");
    let moved = range_one(&target).await;
    assert_eq!((moved.generation, moved.state()), (2, RangeState::Active));
    println!("write freeze window: {freeze:?}");
    assert!(freeze < Duration::from_secs(2), "freeze window {freeze:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_killed_mid_import_is_aborted_and_the_move_retried() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = NodeProcess::start("n1", d1.path(), &["--bootstrap"]);
    let mut target = NodeProcess::start_with_env("n2", d2.path(), &[], &[("KVFLEET_CRASH_AT", "import-mid-snapshot")]);
    let client = client_for(&[&source]);
    preload(&client, 3_000).await;
    let desc = range_one(&source).await;
    let outcome = import(&target, &source, &desc).await;
    assert!(outcome.is_err(), "the target should have died mid-import");
    assert!(!target.wait_for_exit(Duration::from_secs(10)).success());

    // The source never stopped serving; the controller aborts both sides.
    client.put(Bytes::from("during-recovery"), Bytes::from("ok")).await.unwrap();
    source.admin().abort_export(AbortExportRequest { range_id: 1, move_id: MOVE_ID }).await.unwrap();
    target.env.clear();
    target.spawn();
    target.admin().abort_import(AbortImportRequest { range_id: 1, move_id: MOVE_ID }).await.unwrap();

    // A fresh attempt goes through.
    move_range_one(&source, &target).await;
    let client = client_for(&[&source, &target]);
    assert_eq!(client.get(Bytes::from("during-recovery")).await.unwrap(), Some(Bytes::from("ok")));
    for i in (0..3_000).step_by(101) {
        assert!(client.get(Bytes::from(format!("p{i:05}"))).await.unwrap().is_some(), "preloaded key {i} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_killed_while_frozen_stays_frozen_and_the_move_completes() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut source = NodeProcess::start("n1", d1.path(), &["--bootstrap"]);
    let target = NodeProcess::start("n2", d2.path(), &[]);
    let client = client_for(&[&source, &target]);
    preload(&client, 1_000).await;
    client.put(Bytes::from("last-before-freeze"), Bytes::from("v")).await.unwrap();
    let desc = range_one(&source).await;
    import(&target, &source, &desc).await.unwrap();
    let freeze =
        FreezeForMoveRequest { range_id: 1, move_id: MOVE_ID, target: Some(replica(&target)), new_generation: 2 };
    source.admin().freeze_for_move(freeze.clone()).await.unwrap();

    source.kill9();
    source.spawn();
    // Restarted, it must not take writes for the frozen range (only one node may ack them).
    let frozen = range_one(&source).await;
    assert_eq!(frozen.state(), RangeState::Frozen);
    assert_eq!(frozen.move_intent.as_ref().map(|i| i.move_id), Some(MOVE_ID), "{frozen:?}");
    let mut kv = source.kv();
    let write = kv.put(PutRequest { header: None, key: Bytes::from("k"), value: Bytes::from("v") }).await.unwrap_err();
    assert_eq!(write.code(), tonic::Code::Unavailable, "{write:?}");

    // Recovery: the capture died with the source, so the target copies afresh from the frozen
    // source (complete: it takes no writes) and completes.
    target.admin().abort_import(AbortImportRequest { range_id: 1, move_id: MOVE_ID }).await.unwrap();
    import(&target, &source, &frozen).await.expect("re-import from the frozen source");
    let final_seq = source.admin().freeze_for_move(freeze).await.unwrap().into_inner().final_seq;
    assert_eq!(final_seq, 0, "a frozen source captures nothing");
    hand_off(&source, &target, final_seq, 2).await;
    let client = client_for(&[&source, &target]);
    assert_eq!(client.get(Bytes::from("last-before-freeze")).await.unwrap(), Some(Bytes::from("v")));
    client.put(Bytes::from("after"), Bytes::from("1")).await.expect("writes resume at the new owner");
}
