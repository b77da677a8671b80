//! Online range moves between two real nodes, driven step by step as the controller will drive
//! them: no acknowledged write is lost, writers see no error, the write freeze is short, and a
//! target killed mid-import or a source killed while frozen is recovered from.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_e2e::{NodeProcess, assert_all_acked_readable, client_for, wait_until};
use kvfleet_proto::v1::*;

const MOVE_ID: u64 = 7;

fn replica(node: &NodeProcess) -> Replica {
    Replica {
        node_id: node.node_id.clone(),
        address: node.address.clone(),
        role: ReplicaRole::Leader as i32,
        raft_id: 0,
        behind_entries: None,
        membership: 0,
    }
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
    import_as(target, source, range, MOVE_ID).await
}

async fn import_as(
    target: &NodeProcess,
    source: &NodeProcess,
    range: &RangeDescriptor,
    move_id: u64,
) -> Result<tonic::Response<ImportRangeResponse>, tonic::Status> {
    let request = ImportRangeRequest { range: Some(range.clone()), source_address: source.address.clone(), move_id };
    target.admin().import_range(request).await
}

/// Drives move `move_id` of range 1 from `source` to `target`; returns the write-freeze window.
async fn move_range_one(source: &NodeProcess, target: &NodeProcess, move_id: u64) -> Duration {
    let desc = range_one(source).await;
    let imported = import_as(target, source, &desc, move_id).await.expect("import").into_inner();
    assert!(imported.pairs_copied > 0);
    let frozen_at = Instant::now();
    let final_seq = source
        .admin()
        .freeze_for_move(FreezeForMoveRequest {
            range_id: 1,
            move_id,
            target: Some(replica(target)),
            new_generation: desc.generation + 1,
        })
        .await
        .expect("freeze")
        .into_inner()
        .final_seq;
    hand_off_as(source, target, move_id, final_seq, desc.generation + 1).await;
    frozen_at.elapsed()
}

/// The handoff of range 1 after the freeze: the target completes the import at
/// `new_generation`, then the source retires the range, pointing at the new owner.
async fn hand_off(source: &NodeProcess, target: &NodeProcess, final_seq: u64, new_generation: u64) {
    hand_off_as(source, target, MOVE_ID, final_seq, new_generation).await;
}

async fn hand_off_as(source: &NodeProcess, target: &NodeProcess, move_id: u64, final_seq: u64, new_generation: u64) {
    let owned = target
        .admin()
        .complete_import(CompleteImportRequest { range_id: 1, move_id, final_seq, new_generation })
        .await
        .expect("complete")
        .into_inner()
        .range
        .expect("the completed import returns the owned descriptor");
    source
        .admin()
        .retire_moved(RetireMovedRequest { range_id: 1, move_id, new_owner: Some(owned) })
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

    let freeze = move_range_one(&source, &target, MOVE_ID).await;
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

    // The source never stopped serving (it never froze): stopping its export needs no word from
    // the target. Then the target, back, records the move aborted.
    client.put(Bytes::from("during-recovery"), Bytes::from("ok")).await.unwrap();
    let abort = AbortExportRequest { range_id: 1, move_id: MOVE_ID, target_address: String::new() };
    source.admin().abort_export(abort).await.unwrap();
    target.env.clear();
    target.spawn();
    target.admin().abort_import(AbortImportRequest { range_id: 1, move_id: MOVE_ID }).await.unwrap();
    let again = import(&target, &source, &desc).await.unwrap_err();
    assert!(again.message().contains("a move id is used once"), "an aborted move never resumes: {again:?}");

    // A fresh attempt (a new move) goes through.
    move_range_one(&source, &target, MOVE_ID + 1).await;
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

    // Recovery: the capture died with the source, so the target copies the same move afresh
    // from the frozen source (complete: it takes no writes) and completes.
    import(&target, &source, &frozen).await.expect("re-import from the frozen source");
    let final_seq = source.admin().freeze_for_move(freeze).await.unwrap().into_inner().final_seq;
    assert_eq!(final_seq, 0, "a frozen source captures nothing");
    hand_off(&source, &target, final_seq, 2).await;
    let client = client_for(&[&source, &target]);
    assert_eq!(client.get(Bytes::from("last-before-freeze")).await.unwrap(), Some(Bytes::from("v")));
    client.put(Bytes::from("after"), Bytes::from("1")).await.expect("writes resume at the new owner");
}

/// Steps 1-3 of a move of range 1: import, then freeze. Returns the final sequence number.
async fn import_and_freeze(source: &NodeProcess, target: &NodeProcess, generation: u64) -> u64 {
    let desc = range_one(source).await;
    import(target, source, &desc).await.expect("import");
    let freeze = FreezeForMoveRequest {
        range_id: 1,
        move_id: MOVE_ID,
        target: Some(replica(target)),
        new_generation: generation + 1,
    };
    source.admin().freeze_for_move(freeze).await.expect("freeze").into_inner().final_seq
}

async fn outcome(target: &NodeProcess) -> ImportOutcomeResponse {
    target.admin().import_outcome(ImportOutcomeRequest { move_id: MOVE_ID }).await.expect("import outcome").into_inner()
}

async fn owned(node: &NodeProcess) -> Vec<RangeDescriptor> {
    node.admin().list_ranges(ListRangesRequest {}).await.unwrap().into_inner().ranges
}

/// A GET straight to one node (no client routing, no forwarding).
async fn get_from(node: &NodeProcess, key: &str) -> Result<Option<Bytes>, tonic::Status> {
    let response = node
        .kv()
        .get(GetRequest { header: None, key: Bytes::from(key.to_string()), consistency: 0, max_staleness_ms: 0 })
        .await?
        .into_inner();
    Ok(response.found.then_some(response.value))
}

/// A source owning range 1 with `k = v1`, an empty target, and a client for both.
async fn source_and_target_with_k_v1() -> ([tempfile::TempDir; 2], NodeProcess, NodeProcess, kvfleet_client::Client) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let source = NodeProcess::start("n1", dirs[0].path(), &["--bootstrap"]);
    let target = NodeProcess::start("n2", dirs[1].path(), &[]);
    let client = client_for(&[&source, &target]);
    client.put(Bytes::from("k"), Bytes::from("v1")).await.unwrap();
    (dirs, source, target, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_move_is_final_whatever_the_new_owner_does_next() {
    let (_dirs, source, target, client) = source_and_target_with_k_v1().await;
    let final_seq = import_and_freeze(&source, &target, 1).await;
    let complete = CompleteImportRequest { range_id: 1, move_id: MOVE_ID, final_seq, new_generation: 2 };
    target.admin().complete_import(complete).await.expect("complete");
    // The controller dies here (no RetireMoved). The new owner takes a write, then splits the
    // range: range 1 no longer exists anywhere under that id.
    let put = PutRequest { header: None, key: Bytes::from("k"), value: Bytes::from("v2") };
    target.kv().put(put).await.expect("the new owner acknowledges writes");
    target.split(1, "m", 10, 11).await;

    // The source's stale copy answers no read: not v1, ever (asked within the second after the
    // handoff, before the source settles by itself).
    let read = get_from(&source, "k").await;
    assert!(!matches!(&read, Ok(Some(v)) if v == "v1"), "the frozen source served a stale read: {read:?}");

    // The target's record of the move outlives the range id; nothing can undo it, and a
    // controller that lost its state learns not to hand that move id (or those range ids) out
    // again.
    let listed = target.admin().list_ranges(ListRangesRequest {}).await.unwrap().into_inner();
    assert_eq!((listed.max_move_id, listed.max_range_id), (MOVE_ID, 11));
    let answer = outcome(&target).await;
    assert_eq!(answer.outcome(), MoveOutcome::Completed);
    assert_eq!(answer.range.as_ref().map(|r| (r.range_id, r.generation)), Some((1, 2)));
    let abort = target.admin().abort_import(AbortImportRequest { range_id: 1, move_id: MOVE_ID }).await.unwrap_err();
    assert_eq!(abort.code(), tonic::Code::FailedPrecondition);
    assert!(abort.message().contains("completed move cannot be aborted"), "{}", abort.message());
    let abort = AbortExportRequest { range_id: 1, move_id: MOVE_ID, target_address: String::new() };
    let refused = source.admin().abort_export(abort.clone()).await;
    // Refused while frozen; once the source settled by itself it reports the handoff.
    let refused = refused.expect_err("the stale copy must never be reactivated");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("never reactivated") || refused.message().contains("handed to n2"),
        "{refused:?}"
    );

    // With no controller at all, the source learns the outcome from the target and retires.
    wait_until("the source to retire its stale copy", Duration::from_secs(15), async || {
        owned(&source).await.is_empty()
    })
    .await;
    let refused = source.admin().abort_export(abort).await.expect_err("a handed-over range has no export to abort");
    assert!(refused.message().contains("handed to n2"), "{refused:?}");
    assert_eq!(client.get(Bytes::from("k")).await.unwrap(), Some(Bytes::from("v2")));
    let import = ImportRangeRequest {
        range: Some(RangeDescriptor { range_id: 1, ..Default::default() }),
        source_address: source.address.clone(),
        move_id: MOVE_ID,
    };
    let reused = target.admin().import_range(import).await.unwrap_err();
    assert!(reused.message().contains("a move id is used once"), "{reused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_wait_on_a_frozen_range_and_follow_the_handoff() {
    let (_dirs, source, target, client) = source_and_target_with_k_v1().await;
    let final_seq = import_and_freeze(&source, &target, 1).await;

    let started = Instant::now();
    let waiting = tokio::spawn({
        let mut kv = source.kv();
        async move { kv.get(GetRequest { header: None, key: Bytes::from("k"), consistency: 0, max_staleness_ms: 0 }).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a read on a frozen range must wait, not answer from the frozen copy");
    hand_off(&source, &target, final_seq, 2).await;
    let answer = waiting.await.unwrap();
    let status = answer.expect_err("after the handoff the source no longer serves the key");
    let hint = kvfleet_proto::errors::not_owner_detail(&status).and_then(|d| d.hint).expect("a NotOwner hint");
    assert_eq!((hint.leader().unwrap().node_id.as_str(), hint.generation), ("n2", 2));
    assert!(started.elapsed() < Duration::from_secs(4), "the read was released by the retire, not a timeout");
    assert_eq!(client.get(Bytes::from("k")).await.unwrap(), Some(Bytes::from("v1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_checks_the_other_side_before_it_acts() {
    let (_dirs, source, target, client) = source_and_target_with_k_v1().await;

    // Complete without a freeze: the source still acknowledges writes, so the target refuses.
    let desc = range_one(&source).await;
    import(&target, &source, &desc).await.expect("import");
    let early = CompleteImportRequest { range_id: 1, move_id: MOVE_ID, final_seq: 0, new_generation: 2 };
    let refused = target.admin().complete_import(early).await.unwrap_err();
    assert!(refused.message().contains("has not frozen range 1 for move"), "{refused:?}");
    assert!(owned(&target).await.is_empty(), "the target took ownership: {:?}", owned(&target).await);

    // Freeze, then retire without the target completing: refused, the data stays.
    let freeze =
        FreezeForMoveRequest { range_id: 1, move_id: MOVE_ID, target: Some(replica(&target)), new_generation: 2 };
    source.admin().freeze_for_move(freeze).await.expect("freeze");
    let mut forged = desc.clone();
    forged.generation = 2;
    forged.replicas = vec![replica(&target)];
    let retire = RetireMovedRequest { range_id: 1, move_id: MOVE_ID, new_owner: Some(forged) };
    let refused = source.admin().retire_moved(retire).await.unwrap_err();
    assert!(refused.message().contains("not completed"), "{refused:?}");
    assert_eq!(owned(&source).await[0].state(), RangeState::Frozen);

    // Unfreezing before the target is fenced is refused; after AbortImport it goes through.
    let abort = AbortExportRequest { range_id: 1, move_id: MOVE_ID, target_address: String::new() };
    let refused = source.admin().abort_export(abort.clone()).await.unwrap_err();
    assert!(refused.message().contains("abort the import on n2 first"), "{refused:?}");
    target.admin().abort_import(AbortImportRequest { range_id: 1, move_id: MOVE_ID }).await.expect("abort import");
    assert_eq!(outcome(&target).await.outcome(), MoveOutcome::Aborted);
    source.admin().abort_export(abort).await.expect("abort export once fenced");
    assert_eq!(owned(&source).await[0].state(), RangeState::Active);
    client.put(Bytes::from("k"), Bytes::from("v2")).await.expect("writes resume on the source");
    assert_eq!(client.get(Bytes::from("k")).await.unwrap(), Some(Bytes::from("v2")));
    // The aborted move can never complete, whatever a late caller sends.
    let late = CompleteImportRequest { range_id: 1, move_id: MOVE_ID, final_seq: 0, new_generation: 2 };
    let refused = target.admin().complete_import(late).await.unwrap_err();
    assert!(refused.message().contains("was aborted on this node"), "{refused:?}");

    // An export stopped by an abort cannot be frozen for afterwards (a late freeze of a move that
    // was rolled back), and the range stays active.
    let export = ExportSnapshotRequest { range_id: 1, generation: 1, move_id: MOVE_ID + 3, chunk_pairs: 0 };
    let mut chunks = source.admin().export_snapshot(export).await.expect("export").into_inner();
    while chunks.message().await.expect("snapshot chunk").is_some() {}
    let abort = AbortExportRequest { range_id: 1, move_id: MOVE_ID + 3, target_address: String::new() };
    source.admin().abort_export(abort).await.expect("an active range's export stops without asking the target");
    let late =
        FreezeForMoveRequest { range_id: 1, move_id: MOVE_ID + 3, target: Some(replica(&target)), new_generation: 2 };
    let refused = source.admin().freeze_for_move(late).await.unwrap_err();
    assert!(refused.message().contains("no export of range 1 for move 10"), "{refused:?}");
    assert_eq!(owned(&source).await[0].state(), RangeState::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_source_whose_target_aborted_unfreezes_without_a_controller() {
    let (_dirs, source, target, client) = source_and_target_with_k_v1().await;
    import_and_freeze(&source, &target, 1).await;
    // The controller fenced the target and died before unfreezing the source.
    target.admin().abort_import(AbortImportRequest { range_id: 1, move_id: MOVE_ID }).await.expect("abort import");
    wait_until("the source to unfreeze", Duration::from_secs(15), async || {
        owned(&source).await.first().is_some_and(|d| d.state() == RangeState::Active)
    })
    .await;
    client.put(Bytes::from("k"), Bytes::from("v2")).await.expect("writes resume");
    assert_eq!(client.get(Bytes::from("k")).await.unwrap(), Some(Bytes::from("v2")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_of_overlapping_keys_exclude_each_other() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = NodeProcess::start("n1", d1.path(), &["--bootstrap"]);
    let mut target = NodeProcess::start_with_env("n2", d2.path(), &[], &[("KVFLEET_CRASH_AT", "import-mid-snapshot")]);
    let client = client_for(&[&source]);
    preload(&client, 2_000).await;
    // Move 7 of range 1 dies mid-copy: its import stays persisted on the target.
    let whole = range_one(&source).await;
    import(&target, &source, &whole).await.expect_err("the target dies mid-import");
    assert!(!target.wait_for_exit(Duration::from_secs(10)).success());
    target.env.clear();
    target.spawn();
    // Meanwhile the source splits range 1 and another move wants the right half on the same
    // target: refused while move 7's import of overlapping keys exists (they would write over
    // each other, and aborting one would delete the other's data).
    source.split(1, "p", 2, 3).await;
    let right = owned(&source).await.into_iter().find(|d| d.range_id == 3).unwrap();
    let refused = import_as(&target, &source, &right, MOVE_ID + 1).await.unwrap_err();
    assert!(refused.message().contains("is importing range 1"), "{refused:?}");
    // A completion for another move than the import's is refused too.
    let wrong = CompleteImportRequest { range_id: 1, move_id: MOVE_ID + 1, final_seq: 0, new_generation: 2 };
    let refused = target.admin().complete_import(wrong).await.unwrap_err();
    assert!(refused.message().contains("was lost"), "{refused:?}");
    // Once move 7 is aborted (by its move id, even under a wrong range id), the other move goes
    // through and nothing is lost.
    target.admin().abort_import(AbortImportRequest { range_id: 999, move_id: MOVE_ID }).await.expect("abort");
    let left = target.admin().list_ranges(ListRangesRequest {}).await.unwrap().into_inner().importing;
    assert!(left.is_empty(), "move 7's import is gone: {left:?}");
    import_as(&target, &source, &right, MOVE_ID + 1).await.expect("import once the overlap is gone");
    let freeze = FreezeForMoveRequest {
        range_id: 3,
        move_id: MOVE_ID + 1,
        target: Some(replica(&target)),
        new_generation: right.generation + 1,
    };
    let final_seq = source.admin().freeze_for_move(freeze).await.unwrap().into_inner().final_seq;
    let complete =
        CompleteImportRequest { range_id: 3, move_id: MOVE_ID + 1, final_seq, new_generation: right.generation + 1 };
    let owner = target.admin().complete_import(complete).await.expect("complete").into_inner().range;
    let retire = RetireMovedRequest { range_id: 3, move_id: MOVE_ID + 1, new_owner: owner };
    source.admin().retire_moved(retire).await.expect("retire");
    let client = client_for(&[&source, &target]);
    for i in (0..2_000).step_by(37) {
        assert!(client.get(Bytes::from(format!("p{i:05}"))).await.unwrap().is_some(), "preloaded key {i} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_source_finds_its_target_at_a_new_address() {
    let (_dirs, source, mut target, _) = source_and_target_with_k_v1().await;
    let final_seq = import_and_freeze(&source, &target, 1).await;
    let complete = CompleteImportRequest { range_id: 1, move_id: MOVE_ID, final_seq, new_generation: 2 };
    target.admin().complete_import(complete).await.expect("complete");
    // The controller dies; the target restarts elsewhere (a rescheduled pod).
    let old_address = target.address.clone();
    target.kill9();
    target.address = "127.0.0.1:0".into();
    target.spawn();
    assert_ne!(target.address, old_address);
    let answer = outcome(&target).await;
    let owner = answer.range.clone().expect("the completed descriptor");
    assert_eq!(owner.leader().unwrap().address, target.address, "the record names the target where it is now");
    // The source learns the new address from the routing hints a controller publishes, and
    // settles by itself.
    source.admin().publish_routing(PublishRoutingRequest { ranges: vec![owner] }).await.expect("publish");
    wait_until("the source to retire its copy", Duration::from_secs(15), async || owned(&source).await.is_empty())
        .await;
    let client = client_for(&[&source, &target]);
    assert_eq!(client.get(Bytes::from("k")).await.unwrap(), Some(Bytes::from("v1")));
}
