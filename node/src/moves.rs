//! Online range moves, the node's side (protocol in docs/architecture.md). On the source:
//! export a snapshot while capturing later writes, serve the captured tail, freeze, retire. On
//! the target: import the snapshot and tail, then take ownership at the new generation. Every
//! step that changes who may acknowledge writes is persisted before it takes effect, and the
//! target persists each move's final outcome (completed or aborted) as a fence: the source is
//! retired only once the target completed, and reactivated only once the target aborted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kvfleet_proto::RangeBounds;
use kvfleet_proto::v1::mutation::Op as MutationOp;
use kvfleet_proto::v1::*;
use parking_lot::Mutex;
use prost::Message;

use crate::error::NodeError;
use crate::node::Node;
use crate::ranges::{OwnedRange, descriptor_key, descriptor_write, leader_replica};
use crate::storage::{CF_DATA, CF_META, Capture, ExportChunk, Storage, WriteOp};
use kvfleet_proto::failpoint;

const DEFAULT_CHUNK_PAIRS: usize = 1024;
const TAIL_BATCH: u32 = 4096;
/// The import returns (and the controller freezes the source) once a tail read leaves at most
/// this many entries behind.
const CAUGHT_UP_BACKLOG: u64 = 256;
/// Bound on tail catch-up rounds before the import reports it cannot catch up.
const MAX_CATCH_UP_ROUNDS: usize = 10_000;
/// Deadline of one tail read, and the longest wait for the next snapshot chunk: a source that
/// stalls this long fails the step rather than holding it forever.
const PEER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of a source's question to a move's target.
const ASK_TARGET_TIMEOUT: Duration = Duration::from_secs(2);
/// Metadata key prefix of the move records a target keeps: `move/` + move id (big-endian).
pub const MOVE_PREFIX: &[u8] = b"move/";

#[derive(Default)]
pub struct MoveSessions {
    exports: Mutex<HashMap<u64, ExportSession>>,
    imports: Mutex<HashMap<u64, Arc<ImportSession>>>,
    /// Held by every step that reads or writes a move's outcome on the target (ImportRange's
    /// start, CompleteImport, AbortImport): an abort must not race a completion.
    import_transition: tokio::sync::Mutex<()>,
    /// Final outcomes of the moves this node was the target of, by move id (persisted).
    records: Mutex<HashMap<u64, MoveRecord>>,
}

impl MoveSessions {
    /// The sessions of a node that just started: no export or import session survives a
    /// restart, the move records do.
    pub fn recover(storage: &Storage) -> Result<Self, NodeError> {
        let mut records = HashMap::new();
        for (key, value) in storage.meta_entries(MOVE_PREFIX)? {
            let record = MoveRecord::decode(value.as_slice())
                .map_err(|e| NodeError::Corrupt(format!("move record at {}: {e}", kvfleet_proto::display_key(&key))))?;
            records.insert(record.move_id, record);
        }
        Ok(MoveSessions { records: Mutex::new(records), ..Default::default() })
    }
}

fn move_record_write(record: &MoveRecord) -> WriteOp {
    let mut key = MOVE_PREFIX.to_vec();
    key.extend_from_slice(&record.move_id.to_be_bytes());
    WriteOp::Put { cf: CF_META, key: key.into(), value: record.encode_to_vec().into() }
}

fn move_record(move_id: u64, range_id: u64, outcome: MoveOutcome, range: Option<RangeDescriptor>) -> MoveRecord {
    let recorded_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    MoveRecord { move_id, range_id, outcome: outcome as i32, range, recorded_unix_ms }
}

fn outcome_name(outcome: MoveOutcome) -> &'static str {
    match outcome {
        MoveOutcome::Unspecified | MoveOutcome::Unknown => "unknown to it",
        MoveOutcome::Importing => "still importing",
        MoveOutcome::Completed => "completed",
        MoveOutcome::Aborted => "aborted",
    }
}

struct ExportSession {
    move_id: u64,
    /// Random, per export: tail reads must name it (see `ExportChunk.export_id`).
    export_id: u64,
    capture: Arc<Capture>,
    /// When the target last read the tail (or the export began).
    last_read: Mutex<Instant>,
}

/// One import on the target.
struct ImportSession {
    move_id: u64,
    source_address: String,
    /// Held shared by every write of copied data, exclusively by whoever cancels the import
    /// (an abort, or a new attempt of the same move): once set, nothing more of it lands, so
    /// nothing lands after the abort deleted the span either.
    cancelled: tokio::sync::RwLock<bool>,
    /// Where the tail stands. Held while applying it: two callers never apply the same
    /// entries, whose order matters.
    cursor: tokio::sync::Mutex<TailCursor>,
}

#[derive(Debug, Default)]
struct TailCursor {
    export_id: u64,
    next_seq: u64,
    /// The snapshot is copied and the tail caught up: the import can complete.
    ready: bool,
}

impl ImportSession {
    fn new(move_id: u64, source_address: String) -> Self {
        ImportSession {
            move_id,
            source_address,
            cancelled: tokio::sync::RwLock::new(false),
            cursor: tokio::sync::Mutex::new(TailCursor::default()),
        }
    }

    /// Writes copied data unless the import was cancelled.
    async fn write(&self, storage: &Storage, ops: Vec<WriteOp>) -> Result<(), NodeError> {
        let cancelled = self.cancelled.read().await;
        if *cancelled {
            return Err(NodeError::Move(format!(
                "the import for move {} was cancelled (aborted, or replaced by a new attempt)",
                self.move_id
            )));
        }
        storage.write_deferred(ops).await
    }

    /// Stops every later write of this import; waits for the one in flight.
    async fn cancel(&self) {
        *self.cancelled.write().await = true;
    }

    async fn is_cancelled(&self) -> bool {
        *self.cancelled.read().await
    }
}

fn to_mutation(op: &WriteOp) -> Option<Mutation> {
    match op {
        WriteOp::Put { key, value, .. } => {
            Some(Mutation { op: MutationOp::Put as i32, key: key.clone(), value: value.clone() })
        }
        WriteOp::Delete { key, .. } => {
            Some(Mutation { op: MutationOp::Delete as i32, key: key.clone(), value: Bytes::new() })
        }
        WriteOp::DeleteRange { .. } => None,
    }
}

/// The write a wire mutation makes (none for one without an op: callers refuse those first).
pub(crate) fn from_mutation(mutation: &Mutation) -> Option<WriteOp> {
    match mutation.op() {
        MutationOp::Put => Some(WriteOp::put(mutation.key.clone(), mutation.value.clone())),
        MutationOp::Delete => Some(WriteOp::delete(mutation.key.clone())),
        MutationOp::Unspecified => None,
    }
}

fn rpc_error(what: &str, status: tonic::Status) -> NodeError {
    NodeError::Move(format!("{what}: {:?}: {}", status.code(), status.message()))
}

impl Node {
    /// The capture of the export of `range_id` for `move_id` (and, if `export_id` is not 0,
    /// that very export).
    fn export_session(&self, range_id: u64, move_id: u64, export_id: u64) -> Result<Arc<Capture>, NodeError> {
        let exports = self.moves.exports.lock();
        match exports.get(&range_id) {
            Some(session) if session.move_id == move_id && (export_id == 0 || session.export_id == export_id) => {
                *session.last_read.lock() = Instant::now();
                Ok(session.capture.clone())
            }
            Some(session) if session.move_id == move_id => Err(NodeError::Move(format!(
                "the export of range {range_id} for move {move_id} was restarted since this import began (export \
                 {export_id}, now {}): its tail is numbered afresh; abort the import and move again",
                session.export_id
            ))),
            _ => Err(NodeError::Move(format!("no export of range {range_id} for move {move_id} on this node"))),
        }
    }

    /// Source: starts capturing the range's writes and streams a snapshot of it. The capture
    /// starts and the snapshot is taken while the range's gate is held exclusively, so every
    /// write is either in the snapshot or in the tail, never both, never neither.
    pub async fn export_snapshot(
        &self,
        request: &ExportSnapshotRequest,
    ) -> Result<(u64, u64, tokio::sync::mpsc::Receiver<ExportChunk>), NodeError> {
        let range =
            self.table.read().by_id(request.range_id).cloned().ok_or(NodeError::UnknownRange(request.range_id))?;
        refuse_replicated(&range.desc, "moving by copy")?;
        let _exclusive = range.gate.write().await;
        // A range frozen for this very move may be exported again (after a restart lost the
        // capture): it takes no writes, so a fresh snapshot is complete.
        let exportable = range.desc.state() == RangeState::Active || range.desc.frozen_for(request.move_id).is_some();
        if range.is_replaced() || range.desc.generation != request.generation || !exportable {
            return Err(NodeError::Move(format!(
                "range {} is not active at generation {} here (now {:?} at generation {})",
                request.range_id,
                request.generation,
                range.desc.state(),
                range.desc.generation
            )));
        }
        if let Some(previous) = self.moves.exports.lock().remove(&request.range_id) {
            self.storage.stop_capture(&previous.capture);
        }
        // Registered as soon as it starts (no await in between), so that whatever happens next
        // the capture is found and stopped by an abort or by `drop_stale_exports`.
        let capture = self.storage.start_capture(range.desc.start_key.clone(), range.desc.end_key.clone());
        let export_id = rand::random::<u64>() | 1;
        let tail_from = capture.next_seq();
        let session =
            ExportSession { move_id: request.move_id, export_id, capture, last_read: Mutex::new(Instant::now()) };
        self.moves.exports.lock().insert(request.range_id, session);
        let chunk_pairs = match request.chunk_pairs {
            0 => DEFAULT_CHUNK_PAIRS,
            n => n as usize,
        };
        let (taken, chunks) =
            self.storage.stream_snapshot(range.desc.start_key.clone(), range.desc.end_key.clone(), chunk_pairs);
        if taken.await.is_err() {
            self.stop_export(request.range_id, request.move_id);
            return Err(NodeError::Move("the snapshot reader stopped".into()));
        }
        tracing::info!(range_id = request.range_id, move_id = request.move_id, export_id, "export started");
        Ok((tail_from, export_id, chunks))
    }

    /// Source: the target is still reading the snapshot of this export (a long copy is not an
    /// abandoned export).
    pub fn touch_export(&self, range_id: u64, export_id: u64) {
        if let Some(session) = self.moves.exports.lock().get(&range_id).filter(|s| s.export_id == export_id) {
            *session.last_read.lock() = Instant::now();
        }
    }

    /// Source: the captured writes from `from_seq` on, and whether the range is frozen for this
    /// move yet (the target takes ownership only after seeing it frozen).
    pub fn export_tail(&self, request: &ExportTailRequest) -> Result<ExportTailResponse, NodeError> {
        let capture = self.export_session(request.range_id, request.move_id, request.export_id)?;
        let max = match request.max_entries {
            0 => TAIL_BATCH as usize,
            n => n as usize,
        };
        // Read before the entries: a range seen frozen here has no capture entry after them.
        let frozen_new_generation = self
            .table
            .read()
            .by_id(request.range_id)
            .and_then(|range| range.desc.frozen_for(request.move_id).map(|i| i.new_generation))
            .unwrap_or(0);
        let (entries, next_seq, backlog) = capture.read_from(request.from_seq, max);
        let entries = entries
            .iter()
            .filter_map(|(seq, op)| to_mutation(op).map(|mutation| TailEntry { seq: *seq, mutation: Some(mutation) }))
            .collect();
        Ok(ExportTailResponse { entries, next_seq, backlog, frozen_new_generation })
    }

    /// Source: stops writes to the range, persisted so a restart does not resume them, and
    /// returns the last captured sequence number.
    pub async fn freeze_for_move(&self, request: &FreezeForMoveRequest) -> Result<u64, NodeError> {
        self.export_session(request.range_id, request.move_id, 0)?;
        let range =
            self.table.read().by_id(request.range_id).cloned().ok_or(NodeError::UnknownRange(request.range_id))?;
        refuse_replicated(&range.desc, "moving by copy")?;
        let _exclusive = range.gate.write().await;
        if range.is_replaced() {
            return Err(NodeError::Move(format!("range {} changed while freezing; retry", request.range_id)));
        }
        // Again under the gate: an abort that stopped the export while this freeze waited has
        // rolled the move back, and a late freeze must not freeze the range for it.
        let capture = self.export_session(request.range_id, request.move_id, 0)?;
        if range.desc.frozen_for(request.move_id).is_some() {
            return Ok(capture.next_seq() - 1);
        }
        if range.desc.state() != RangeState::Active {
            return Err(NodeError::Move(format!(
                "range {} is {:?} here, only an active range freezes for a move",
                request.range_id,
                range.desc.state()
            )));
        }
        let target = request.target.clone().ok_or_else(|| NodeError::Invalid("freeze needs a target".into()))?;
        if request.new_generation <= range.desc.generation {
            return Err(NodeError::Invalid(format!(
                "new generation {} must be above the range's {}",
                request.new_generation, range.desc.generation
            )));
        }
        let mut frozen = range.desc.clone();
        frozen.state = RangeState::Frozen as i32;
        frozen.move_intent = Some(MoveIntent {
            move_id: request.move_id,
            target: Some(target),
            new_generation: request.new_generation,
            source_address: self.address.clone(),
        });
        failpoint::hit("freeze-before-persist");
        self.persist(&[&frozen]).await?;
        self.table.write().replace_owned(frozen);
        failpoint::hit("freeze-after-persist");
        // In-flight writes finished before the gate was ours; all of them are captured.
        Ok(capture.next_seq() - 1)
    }

    /// Asks a move's target what it persisted about the move. `address` overrides where to ask
    /// (the caller knows the target's address now); otherwise the address recorded in the
    /// intent, then the one the routing hints give the target (it may have moved since). The
    /// answer must come from the target the intent names.
    async fn ask_target(&self, intent: &MoveIntent, address: &str) -> Result<ImportOutcomeResponse, NodeError> {
        let target = intent
            .target
            .as_ref()
            .ok_or_else(|| NodeError::Corrupt(format!("the freeze for move {} records no target", intent.move_id)))?;
        let mut addresses = vec![if address.is_empty() { target.address.clone() } else { address.to_string() }];
        if address.is_empty() {
            let hinted = self
                .table
                .read()
                .routing_hints()
                .find_map(|d| d.leader().filter(|l| l.node_id == target.node_id).map(|l| l.address.clone()));
            addresses.extend(hinted.filter(|a| *a != target.address));
        }
        let mut failure = None;
        for address in addresses {
            match self.ask_target_at(intent.move_id, &target.node_id, &address).await {
                Ok(answer) => return Ok(answer),
                Err(error) => failure = Some(error),
            }
        }
        Err(failure.unwrap_or_else(|| NodeError::Move(format!("no address to ask {} at", target.node_id))))
    }

    async fn ask_target_at(
        &self,
        move_id: u64,
        target: &str,
        address: &str,
    ) -> Result<ImportOutcomeResponse, NodeError> {
        let mut request = tonic::Request::new(ImportOutcomeRequest { move_id });
        request.set_timeout(ASK_TARGET_TIMEOUT);
        let unreachable = |message: String| NodeError::PeerUnreachable {
            node: target.to_string(),
            address: address.to_string(),
            message,
        };
        let answer = self
            .peers
            .admin(address)?
            .import_outcome(request)
            .await
            .map_err(|s| unreachable(format!("{:?}: {}", s.code(), s.message())))?
            .into_inner();
        if answer.node_id != target {
            return Err(unreachable(format!(
                "that address is node {}, not the move's target {target}",
                answer.node_id
            )));
        }
        Ok(answer)
    }

    /// Source: the target owns the range now. Checks that with the target, then retires the
    /// range here (pointing at the new owner), lets waiting requests go on to NotOwner, and
    /// deletes the local copy.
    pub async fn retire_moved(&self, request: &RetireMovedRequest) -> Result<(), NodeError> {
        let new_owner =
            request.new_owner.clone().ok_or_else(|| NodeError::Invalid("retire needs the new owner".into()))?;
        let range = self.table.read().by_id(request.range_id).cloned();
        let Some(range) = range else {
            return self.already_retired(request.range_id, &new_owner);
        };
        let _exclusive = range.gate.write().await;
        if range.is_replaced() {
            return Err(NodeError::Move(format!("range {} changed while retiring; retry", request.range_id)));
        }
        let Some(intent) = range.desc.frozen_for(request.move_id).cloned() else {
            return Err(NodeError::Move(format!(
                "range {} is not frozen for move {} here; refusing to retire it",
                request.range_id, request.move_id
            )));
        };
        let target = intent.target.clone().unwrap_or_default();
        let owner_ok = new_owner.leader().is_some_and(|l| l.node_id == target.node_id)
            && new_owner.generation == intent.new_generation
            && new_owner.start_key == range.desc.start_key
            && new_owner.end_key == range.desc.end_key;
        if !owner_ok {
            return Err(NodeError::Invalid(format!(
                "the new owner's descriptor does not match move {} (target {} at generation {})",
                request.move_id, target.node_id, intent.new_generation
            )));
        }
        // Deleting the only other copy of the data on a caller's word alone would be a loss if
        // the caller were wrong: the target itself must say it completed this move.
        let address = new_owner.leader().map_or("", |l| l.address.as_str());
        let answer = self.ask_target(&intent, address).await?;
        let completed = answer.outcome() == MoveOutcome::Completed
            && answer.range.as_ref().is_some_and(|r| r.generation == intent.new_generation);
        if !completed {
            return Err(NodeError::Move(format!(
                "target {} reports move {} {}, not completed at generation {}: refusing to retire range {}",
                target.node_id,
                request.move_id,
                outcome_name(answer.outcome()),
                intent.new_generation,
                request.range_id
            )));
        }
        self.retire_frozen(&range, &intent, new_owner).await
    }

    /// A retire for a range no longer owned here: fine if it went to that owner already (a
    /// retried call, or the source resolved the freeze by itself).
    fn already_retired(&self, range_id: u64, new_owner: &RangeDescriptor) -> Result<(), NodeError> {
        let table = self.table.read();
        let Some(tombstone) = table.retired(range_id) else {
            return Err(NodeError::UnknownRange(range_id));
        };
        let same_owner = tombstone.leader().map(|l| &l.node_id) == new_owner.leader().map(|l| &l.node_id)
            && tombstone.generation == new_owner.generation;
        if same_owner {
            return Ok(());
        }
        Err(NodeError::Move(format!(
            "range {range_id} is no longer owned here: it was retired at generation {} (successors {:?}, owner {})",
            tombstone.generation,
            tombstone.successors,
            tombstone.leader().map_or("this node", |l| l.node_id.as_str())
        )))
    }

    /// Retires a range frozen for `intent` whose target completed the move. The caller holds the
    /// range's gate exclusively and has checked the target's outcome.
    async fn retire_frozen(
        &self,
        range: &Arc<OwnedRange>,
        intent: &MoveIntent,
        new_owner: RangeDescriptor,
    ) -> Result<(), NodeError> {
        let mut tombstone = new_owner;
        tombstone.state = RangeState::Retired as i32;
        tombstone.move_intent = None;
        let ops = vec![
            descriptor_write(&tombstone),
            WriteOp::DeleteRange { cf: CF_DATA, start: range.desc.start_key.clone(), end: range.desc.end_key.clone() },
        ];
        // Requests waiting on the frozen range go on (to NotOwner, then the target) before the
        // tombstone's fsync: the target already owns the range durably, and a source that
        // crashes before the fsync restarts frozen, which the controller's recovery (or the
        // source itself) retires.
        self.table.write().retire_moved(tombstone);
        failpoint::hit("retire-before-persist");
        self.storage.write_durable(ops).await?;
        self.stop_export(range.desc.range_id, intent.move_id);
        self.update_range_gauge();
        let to = intent.target.as_ref().map_or("", |t| t.node_id.as_str());
        tracing::info!(
            range_id = range.desc.range_id,
            move_id = intent.move_id,
            to,
            generation = intent.new_generation,
            "range moved away"
        );
        Ok(())
    }

    fn stop_export(&self, range_id: u64, move_id: u64) {
        let mut exports = self.moves.exports.lock();
        if exports.get(&range_id).is_some_and(|s| s.move_id == move_id)
            && let Some(session) = exports.remove(&range_id)
        {
            self.storage.stop_capture(&session.capture);
        }
    }

    /// Source: abandons an export. The capture stops; a range frozen for this move becomes
    /// active again at its generation, but only once its target says it aborted the move (a
    /// persisted fence): a copy whose target completed the move is stale and is never
    /// reactivated.
    pub async fn abort_export(&self, request: &AbortExportRequest) -> Result<(), NodeError> {
        let range = self.table.read().by_id(request.range_id).cloned();
        let Some(range) = range else {
            self.stop_export(request.range_id, request.move_id);
            let table = self.table.read();
            let handed_over = table
                .retired(request.range_id)
                .and_then(|t| t.leader().map(|l| (l.node_id.clone(), t.generation)))
                .filter(|(owner, _)| *owner != self.config.node_id);
            if let Some((owner, generation)) = handed_over {
                return Err(NodeError::Move(format!(
                    "range {} was handed to {owner} at generation {generation}; there is no export left to abort",
                    request.range_id
                )));
            }
            return Ok(());
        };
        // Under the gate, so that a freeze for this move waiting on it sees the export gone.
        let _exclusive = range.gate.write().await;
        self.stop_export(request.range_id, request.move_id);
        if range.is_replaced() {
            return Err(NodeError::Move(format!("range {} changed while aborting; retry", request.range_id)));
        }
        let Some(intent) = range.desc.frozen_for(request.move_id).cloned() else {
            return Ok(());
        };
        let answer = self.ask_target(&intent, &request.target_address).await?;
        let target = intent.target.as_ref().map_or("", |t| t.node_id.as_str());
        match answer.outcome() {
            MoveOutcome::Aborted => self.unfreeze(&range, &intent).await,
            MoveOutcome::Completed => Err(NodeError::Move(format!(
                "target {target} completed move {} and owns range {} since generation {}: this copy is stale and is \
                 never reactivated (retire it instead)",
                request.move_id, request.range_id, intent.new_generation
            ))),
            other => Err(NodeError::Move(format!(
                "target {target} reports move {} {}: abort the import on {target} first, so that it can never \
                 complete",
                request.move_id,
                outcome_name(other)
            ))),
        }
    }

    /// Makes a range frozen for `intent` active again. The caller holds the range's gate
    /// exclusively and has the target's word that it aborted the move.
    async fn unfreeze(&self, range: &Arc<OwnedRange>, intent: &MoveIntent) -> Result<(), NodeError> {
        let mut active = range.desc.clone();
        active.state = RangeState::Active as i32;
        active.move_intent = None;
        self.persist(&[&active]).await?;
        self.table.write().replace_owned(active);
        tracing::info!(range_id = range.desc.range_id, move_id = intent.move_id, "move aborted, range active again");
        Ok(())
    }

    /// Source: settles freezes that outlived their move's driver (the controller died between
    /// two steps). For each range frozen here longer than `older_than`, asks the target: if it
    /// completed the move, the range is retired here; if it aborted it, the range is active
    /// again; otherwise (still importing, unknown, unreachable) it stays frozen for the
    /// controller to settle. Both outcomes are final on the target, so acting on them is safe
    /// whatever the controller does meanwhile. Returns how many freezes were settled.
    pub async fn settle_stale_freezes(&self, older_than: Duration) -> usize {
        let frozen: Vec<Arc<OwnedRange>> = self
            .table
            .read()
            .owned()
            .filter(|r| r.desc.state() == RangeState::Frozen && r.since.elapsed() >= older_than)
            .cloned()
            .collect();
        let mut settled = 0;
        for range in frozen {
            let Some(intent) = range.desc.move_intent.clone() else { continue };
            let answer = match self.ask_target(&intent, "").await {
                Ok(answer) => answer,
                Err(error) => {
                    tracing::debug!(range_id = range.desc.range_id, %error, "frozen range: cannot ask the target");
                    continue;
                }
            };
            let _exclusive = range.gate.write().await;
            if range.is_replaced() {
                continue;
            }
            let outcome = answer.outcome();
            let result = match (outcome, answer.range) {
                (MoveOutcome::Completed, Some(owner)) if owner.generation == intent.new_generation => {
                    self.retire_frozen(&range, &intent, owner).await
                }
                (MoveOutcome::Aborted, _) => self.unfreeze(&range, &intent).await,
                _ => continue,
            };
            match result {
                Ok(()) => {
                    settled += 1;
                    tracing::warn!(
                        range_id = range.desc.range_id,
                        move_id = intent.move_id,
                        outcome = outcome_name(outcome),
                        "settled a freeze nobody finished, from the target's record of the move"
                    );
                }
                Err(error) => tracing::warn!(range_id = range.desc.range_id, %error, "settling a freeze failed"),
            }
        }
        settled
    }

    /// Source: drops export sessions nothing can use any more, whose captures would only grow:
    /// those of ranges no longer owned here (split, merged or moved away since), and those of
    /// active ranges whose target has not read the tail for `idle_limit` (a move abandoned by a
    /// controller that lost its state; a later move exports afresh). A frozen range keeps its
    /// export: its move may still complete.
    pub fn drop_stale_exports(&self, idle_limit: Duration) -> usize {
        let stale: Vec<ExportSession> = {
            let table = self.table.read();
            let mut exports = self.moves.exports.lock();
            let gone: Vec<u64> = exports
                .iter()
                .filter(|(id, session)| match table.by_id(**id) {
                    None => true,
                    Some(range) => {
                        range.desc.state() == RangeState::Active && session.last_read.lock().elapsed() >= idle_limit
                    }
                })
                .map(|(id, _)| *id)
                .collect();
            gone.iter().filter_map(|id| exports.remove(id)).collect()
        };
        for session in &stale {
            self.storage.stop_capture(&session.capture);
            tracing::info!(move_id = session.move_id, "dropped an export nothing can use any more");
        }
        stale.len()
    }

    /// Target: what this node persisted about a move. The descriptor names this node at the
    /// address it has now (it may have changed since the move).
    pub fn import_outcome(&self, move_id: u64) -> ImportOutcomeResponse {
        let node_id = self.config.node_id.clone();
        let here = |mut desc: RangeDescriptor| {
            for replica in desc.replicas.iter_mut().filter(|r| r.node_id == self.config.node_id) {
                replica.address = self.address.clone();
            }
            desc
        };
        // Records first: a completing import records its outcome before it stops importing.
        if let Some(record) = self.moves.records.lock().get(&move_id) {
            return ImportOutcomeResponse { node_id, outcome: record.outcome, range: record.range.clone().map(here) };
        }
        let importing = self.importing_for(None, move_id);
        match importing {
            Some(desc) => {
                ImportOutcomeResponse { node_id, outcome: MoveOutcome::Importing as i32, range: Some(here(desc)) }
            }
            None => ImportOutcomeResponse { node_id, outcome: MoveOutcome::Unknown as i32, range: None },
        }
    }

    /// The highest move id this node recorded an outcome for.
    pub fn max_recorded_move_id(&self) -> u64 {
        self.moves.records.lock().keys().copied().max().unwrap_or(0)
    }

    fn move_record_of(&self, move_id: u64) -> Option<MoveRecord> {
        self.moves.records.lock().get(&move_id).cloned()
    }

    /// The importing descriptor of `move_id` (of range `range_id`, if given).
    fn importing_for(&self, range_id: Option<u64>, move_id: u64) -> Option<RangeDescriptor> {
        let table = self.table.read();
        let of_move = |d: &&RangeDescriptor| d.move_intent.as_ref().is_some_and(|i| i.move_id == move_id);
        match range_id {
            Some(id) => table.importing(id).filter(of_move).cloned(),
            None => table.all_importing().find(of_move).cloned(),
        }
    }

    /// The import session of `move_id` for `range_id`, if this node runs one.
    fn import_session(&self, range_id: u64, move_id: u64) -> Option<Arc<ImportSession>> {
        self.moves.imports.lock().get(&range_id).filter(|s| s.move_id == move_id).cloned()
    }

    /// Target: records the import (persisted, so a restart knows of it), clears the span, copies
    /// the source's snapshot and catches up its tail. Returns once the backlog is small.
    pub async fn import_range(&self, request: &ImportRangeRequest) -> Result<ImportRangeResponse, NodeError> {
        let source = request.range.clone().ok_or_else(|| NodeError::Invalid("import needs the range".into()))?;
        refuse_replicated(&source, "moving by copy")?;
        let session = Arc::new(ImportSession::new(request.move_id, request.source_address.clone()));
        let mut cursor = session.cursor.lock().await;
        {
            let _transition = self.moves.import_transition.lock().await;
            if let Some(record) = self.move_record_of(request.move_id) {
                return Err(NodeError::Move(format!(
                    "move {} was {} on this node already; a move id is used once: start a new move",
                    request.move_id,
                    outcome_name(record.outcome())
                )));
            }
            if let Some(owned) = self.table.read().owned_overlapping(&source) {
                return Err(NodeError::Move(format!(
                    "this node already owns range {} {}, which overlaps {} {}",
                    owned.desc.range_id,
                    owned.desc.span(),
                    source.range_id,
                    source.span()
                )));
            }
            // Two imports of overlapping keys would write over each other, and aborting one would
            // delete the other's data. The same move may start again (a retry), cancelling its
            // earlier attempt.
            let same_attempt = |d: &RangeDescriptor| {
                d.range_id == source.range_id && d.move_intent.as_ref().is_some_and(|i| i.move_id == request.move_id)
            };
            let other = self.table.read().all_importing().find(|d| d.overlaps(&source) && !same_attempt(d)).cloned();
            if let Some(other) = other {
                let other_move = other.move_intent.as_ref().map_or(0, |i| i.move_id);
                return Err(NodeError::Move(format!(
                    "this node is importing range {} {} for move {other_move}, which overlaps {} {}: that import must \
                     complete or be aborted first",
                    other.range_id,
                    other.span(),
                    source.range_id,
                    source.span()
                )));
            }
            let earlier = self.moves.imports.lock().remove(&source.range_id);
            if let Some(earlier) = earlier {
                earlier.cancel().await;
            }
            let mut importing = source.clone();
            importing.state = RangeState::Importing as i32;
            importing.replicas = vec![leader_replica(&self.config.node_id, &self.address)];
            importing.move_intent = Some(MoveIntent {
                move_id: request.move_id,
                target: importing.replicas.first().cloned(),
                new_generation: 0,
                source_address: request.source_address.clone(),
            });
            let ops = vec![
                descriptor_write(&importing),
                WriteOp::DeleteRange { cf: CF_DATA, start: source.start_key.clone(), end: source.end_key.clone() },
            ];
            self.storage.write_durable(ops).await?;
            self.table.write().start_import(importing);
            self.moves.imports.lock().insert(source.range_id, session.clone());
        }

        let started = Instant::now();
        let mut admin = self.peers.admin(&request.source_address)?;
        let export = ExportSnapshotRequest {
            range_id: source.range_id,
            generation: source.generation,
            move_id: request.move_id,
            chunk_pairs: 0,
        };
        let mut stream = admin.export_snapshot(export).await.map_err(|s| rpc_error("export snapshot", s))?.into_inner();
        let (mut pairs, mut bytes) = (0u64, 0u64);
        cursor.next_seq = 1;
        let next_chunk = async |stream: &mut tonic::Streaming<kvfleet_proto::v1::ExportChunk>| {
            let chunk = tokio::time::timeout(PEER_READ_TIMEOUT, stream.message())
                .await
                .map_err(|_| NodeError::Move(format!("the source sent no snapshot data for {PEER_READ_TIMEOUT:?}")))?;
            chunk.map_err(|s| rpc_error("reading the snapshot", s))
        };
        while let Some(chunk) = next_chunk(&mut stream).await? {
            cursor.next_seq = chunk.tail_from_seq.max(1);
            cursor.export_id = chunk.export_id;
            pairs += chunk.pairs.len() as u64;
            bytes += chunk.pairs.iter().map(|kv| (kv.key.len() + kv.value.len()) as u64).sum::<u64>();
            let ops = chunk.pairs.into_iter().map(|kv| WriteOp::put(kv.key, kv.value)).collect();
            session.write(&self.storage, ops).await?;
            failpoint::hit("import-mid-snapshot");
        }
        self.catch_up(&mut admin, source.range_id, &session, &mut cursor, None).await?;
        // Made durable now, outside the write freeze: the fsync at the handoff then covers only
        // the tail, so the freeze does not grow with the range's size.
        self.storage.sync_wal().await?;
        if session.is_cancelled().await {
            return Err(NodeError::Move(format!("move {} was aborted while its data was copied", request.move_id)));
        }
        cursor.ready = true;
        tracing::info!(
            range_id = source.range_id,
            pairs,
            bytes,
            took = ?started.elapsed(),
            "snapshot imported, tail caught up"
        );
        Ok(ImportRangeResponse { pairs_copied: pairs, bytes_copied: bytes, next_seq: cursor.next_seq })
    }

    /// Applies tail entries until the backlog is small, or (with `until`) through that sequence.
    /// Reads at least once; returns the last read's `frozen_new_generation`.
    async fn catch_up(
        &self,
        admin: &mut crate::peers::PeerAdmin,
        range_id: u64,
        session: &ImportSession,
        cursor: &mut TailCursor,
        until: Option<u64>,
    ) -> Result<u64, NodeError> {
        for _ in 0..MAX_CATCH_UP_ROUNDS {
            let request = ExportTailRequest {
                range_id,
                move_id: session.move_id,
                from_seq: cursor.next_seq,
                max_entries: TAIL_BATCH,
                export_id: cursor.export_id,
            };
            let mut request = tonic::Request::new(request);
            request.set_timeout(PEER_READ_TIMEOUT);
            let tail = admin.export_tail(request).await.map_err(|s| rpc_error("reading the tail", s))?.into_inner();
            let ops: Vec<WriteOp> =
                tail.entries.iter().filter_map(|e| e.mutation.as_ref().and_then(from_mutation)).collect();
            if !ops.is_empty() {
                session.write(&self.storage, ops).await?;
            }
            cursor.next_seq = tail.next_seq.max(cursor.next_seq);
            let done = match until {
                None => tail.backlog <= CAUGHT_UP_BACKLOG,
                // The source is frozen: its log is final. Read all of it (past `last` too, if
                // the caller's number was low) or stop at an empty read.
                Some(last) => (cursor.next_seq > last && tail.backlog == 0) || tail.entries.is_empty(),
            };
            if done {
                return Ok(tail.frozen_new_generation);
            }
        }
        Err(NodeError::Move(format!("range {range_id}: the tail did not catch up in {MAX_CATCH_UP_ROUNDS} rounds")))
    }

    /// Target: applies the rest of the tail (the source is frozen), then owns the range at the
    /// new generation. One fsync makes the copied data, the ownership and the move's record
    /// durable together. Refused unless the source reports the range frozen for this move at
    /// this generation: only then is this node the only one that may acknowledge writes.
    pub async fn complete_import(&self, request: &CompleteImportRequest) -> Result<RangeDescriptor, NodeError> {
        if let Some(settled) = self.settled_completion(request) {
            return settled;
        }
        let lost = || {
            NodeError::Move(format!(
                "the import of range {} for move {} was lost (restart?): abort it and move again",
                request.range_id, request.move_id
            ))
        };
        let session = self.import_session(request.range_id, request.move_id).ok_or_else(lost)?;
        let importing = self.importing_for(Some(request.range_id), request.move_id).ok_or_else(lost)?;
        // The tail is pulled without the transition lock (a paused source must not hold up other
        // moves' steps here); the cursor lock keeps a concurrent retry from applying it twice.
        let mut cursor = session.cursor.lock().await;
        // A concurrent call that held the cursor may have completed the move meanwhile.
        if let Some(settled) = self.settled_completion(request) {
            return settled;
        }
        if !cursor.ready {
            return Err(NodeError::Move(format!(
                "the import of range {} for move {} has not finished copying",
                request.range_id, request.move_id
            )));
        }
        let mut admin = self.peers.admin(&session.source_address)?;
        let frozen_generation =
            self.catch_up(&mut admin, request.range_id, &session, &mut cursor, Some(request.final_seq)).await?;
        if cursor.next_seq <= request.final_seq {
            return Err(NodeError::Move(format!(
                "range {}: the tail ends at {} but the source froze at {}",
                request.range_id,
                cursor.next_seq - 1,
                request.final_seq
            )));
        }
        if frozen_generation != request.new_generation {
            return Err(NodeError::Move(format!(
                "the source has not frozen range {} for move {} at generation {} (it reports {}): refusing to take \
                 ownership while it may still acknowledge writes",
                request.range_id, request.move_id, request.new_generation, frozen_generation
            )));
        }
        let _transition = self.moves.import_transition.lock().await;
        if let Some(settled) = self.settled_completion(request) {
            return settled;
        }
        if session.is_cancelled().await {
            return Err(NodeError::Move(format!("the import for move {} was cancelled meanwhile", request.move_id)));
        }
        let mut owned = importing.clone();
        owned.state = RangeState::Active as i32;
        owned.generation = request.new_generation;
        owned.move_intent = None;
        let record = move_record(request.move_id, request.range_id, MoveOutcome::Completed, Some(owned.clone()));
        failpoint::hit("complete-before-persist");
        self.storage.write_durable(vec![descriptor_write(&owned), move_record_write(&record)]).await?;
        self.moves.records.lock().insert(request.move_id, record);
        self.table.write().activate_import(owned.clone(), self.new_load());
        self.moves.imports.lock().remove(&request.range_id);
        self.update_range_gauge();
        tracing::info!(range_id = owned.range_id, generation = owned.generation, span = %owned.span(), "range moved in");
        Ok(owned)
    }

    /// A completion already decided by the move's record: a retried call for a completed move
    /// answers as the first did; an aborted move never completes.
    fn settled_completion(&self, request: &CompleteImportRequest) -> Option<Result<RangeDescriptor, NodeError>> {
        let record = self.move_record_of(request.move_id)?;
        let outcome = record.outcome();
        let owned = record.range.filter(|r| {
            outcome == MoveOutcome::Completed
                && r.range_id == request.range_id
                && r.generation == request.new_generation
        });
        Some(owned.ok_or_else(|| {
            NodeError::Move(format!(
                "move {} was {} on this node; it cannot complete now",
                request.move_id,
                outcome_name(outcome)
            ))
        }))
    }

    /// Target: records the move as aborted (so it can never complete here, and a late import
    /// for it is refused), stops and forgets its import and deletes what was copied. Refused for
    /// a move this node completed: the range is owned here, whatever happened to it since.
    pub async fn abort_import(&self, request: &AbortImportRequest) -> Result<(), NodeError> {
        let _transition = self.moves.import_transition.lock().await;
        let recorded = self.move_record_of(request.move_id);
        if let Some(record) = recorded.as_ref().filter(|r| r.outcome() == MoveOutcome::Completed) {
            let generation = record.range.as_ref().map_or(0, |r| r.generation);
            return Err(NodeError::Move(format!(
                "move {} completed on this node: range {} has been owned here since generation {generation}; a \
                 completed move cannot be aborted",
                request.move_id, record.range_id
            )));
        }
        // The move's import, whatever range id the caller named.
        let importing = self.importing_for(None, request.move_id);
        let range_id = importing.as_ref().map_or(request.range_id, |d| d.range_id);
        if let Some(session) = self.import_session(range_id, request.move_id) {
            // Waits for a write of copied data in flight; none lands after this.
            session.cancel().await;
        }
        let record = recorded.is_none().then(|| move_record(request.move_id, range_id, MoveOutcome::Aborted, None));
        let mut ops: Vec<WriteOp> = record.iter().map(move_record_write).collect();
        if let Some(importing) = &importing {
            ops.push(WriteOp::Delete { cf: CF_META, key: descriptor_key(importing.range_id) });
            match self.table.read().owned_overlapping(importing) {
                // Cannot happen (imports never overlap owned ranges); if it did, stray copied
                // data is the lesser harm.
                Some(owned) => tracing::error!(
                    range_id = importing.range_id,
                    owned = owned.desc.range_id,
                    "an aborted import overlaps an owned range; its copied data is left in place"
                ),
                None => ops.push(WriteOp::DeleteRange {
                    cf: CF_DATA,
                    start: importing.start_key.clone(),
                    end: importing.end_key.clone(),
                }),
            }
        }
        if !ops.is_empty() {
            self.storage.write_durable(ops).await?;
        }
        if let Some(record) = record {
            self.moves.records.lock().insert(request.move_id, record);
        }
        if importing.is_some() {
            self.table.write().forget_import(range_id);
        }
        let mut imports = self.moves.imports.lock();
        if imports.get(&range_id).is_some_and(|s| s.move_id == request.move_id) {
            imports.remove(&range_id);
        }
        tracing::info!(range_id, move_id = request.move_id, "import aborted");
        Ok(())
    }
}

/// Refuses `action` on a replicated range: its replicas change by membership changes (not built
/// yet), never by the single-copy protocols.
pub(crate) fn refuse_replicated(desc: &RangeDescriptor, action: &'static str) -> Result<(), NodeError> {
    if desc.is_raft_group() {
        return Err(NodeError::ReplicatedRange { range_id: desc.range_id, replicas: desc.replicas.len(), action });
    }
    Ok(())
}
