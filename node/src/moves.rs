//! Online range moves, the node's side (protocol in docs/architecture.md). On the source:
//! export a snapshot while capturing later writes, serve the captured tail, freeze, retire. On
//! the target: import the snapshot and tail, then take ownership at the new generation. Every
//! step that changes who may acknowledge writes is persisted before it takes effect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_proto::v1::admin_client::AdminClient;
use kvfleet_proto::v1::mutation::Op as MutationOp;
use kvfleet_proto::v1::*;
use parking_lot::Mutex;
use tonic::transport::Endpoint;

use crate::error::NodeError;
use crate::node::Node;
use crate::ranges::{descriptor_key, descriptor_write, leader_replica};
use crate::storage::{CF_DATA, CF_META, Capture, ExportChunk, WriteOp};
use kvfleet_proto::failpoint;

const DEFAULT_CHUNK_PAIRS: usize = 1024;
const TAIL_BATCH: u32 = 4096;
/// The import returns (and the controller freezes the source) once a tail read leaves at most
/// this many entries behind.
const CAUGHT_UP_BACKLOG: u64 = 256;
/// Bound on tail catch-up rounds before the import reports it cannot catch up.
const MAX_CATCH_UP_ROUNDS: usize = 10_000;

#[derive(Default)]
pub struct MoveSessions {
    exports: Mutex<HashMap<u64, ExportSession>>,
    imports: Mutex<HashMap<u64, ImportSession>>,
    /// Held by CompleteImport and AbortImport: an abort from a restarted controller must not
    /// delete the data of an import completing at the same instant.
    import_transition: tokio::sync::Mutex<()>,
}

struct ExportSession {
    move_id: u64,
    capture: Arc<Capture>,
}

#[derive(Clone)]
struct ImportSession {
    move_id: u64,
    source_address: String,
    next_seq: u64,
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

fn from_mutation(mutation: &Mutation) -> Option<WriteOp> {
    match mutation.op() {
        MutationOp::Put => Some(WriteOp::put(mutation.key.clone(), mutation.value.clone())),
        MutationOp::Delete => Some(WriteOp::delete(mutation.key.clone())),
        MutationOp::Unspecified => None,
    }
}

fn admin_client(address: &str) -> Result<AdminClient<tonic::transport::Channel>, NodeError> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| NodeError::Move(format!("bad source address {address:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    Ok(AdminClient::new(endpoint.connect_lazy()).max_decoding_message_size(64 << 20))
}

fn rpc_error(what: &str, status: tonic::Status) -> NodeError {
    NodeError::Move(format!("{what}: {:?}: {}", status.code(), status.message()))
}

impl Node {
    fn export_session(&self, range_id: u64, move_id: u64) -> Result<Arc<Capture>, NodeError> {
        let exports = self.moves.exports.lock();
        match exports.get(&range_id) {
            Some(session) if session.move_id == move_id => Ok(session.capture.clone()),
            _ => Err(NodeError::Move(format!("no export of range {range_id} for move {move_id} on this node"))),
        }
    }

    /// Source: starts capturing the range's writes and streams a snapshot of it. The capture
    /// starts and the snapshot is taken while the range's gate is held exclusively, so every
    /// write is either in the snapshot or in the tail, never both, never neither.
    pub async fn export_snapshot(
        &self,
        request: &ExportSnapshotRequest,
    ) -> Result<(u64, tokio::sync::mpsc::Receiver<ExportChunk>), NodeError> {
        let range =
            self.table.read().by_id(request.range_id).cloned().ok_or(NodeError::UnknownRange(request.range_id))?;
        let _exclusive = range.gate.write().await;
        // A range frozen for this very move may be exported again (after a restart lost the
        // capture): it takes no writes, so a fresh snapshot is complete.
        let frozen_for_this_move = range.desc.state() == RangeState::Frozen
            && range.desc.move_intent.as_ref().is_some_and(|i| i.move_id == request.move_id);
        let exportable = range.desc.state() == RangeState::Active || frozen_for_this_move;
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
        let capture = self.storage.start_capture(range.desc.start_key.clone(), range.desc.end_key.clone());
        let chunk_pairs = match request.chunk_pairs {
            0 => DEFAULT_CHUNK_PAIRS,
            n => n as usize,
        };
        let (taken, chunks) =
            self.storage.stream_snapshot(range.desc.start_key.clone(), range.desc.end_key.clone(), chunk_pairs);
        taken.await.map_err(|_| NodeError::Move("the snapshot reader stopped".into()))?;
        let tail_from = capture.next_seq();
        self.moves.exports.lock().insert(request.range_id, ExportSession { move_id: request.move_id, capture });
        tracing::info!(range_id = request.range_id, move_id = request.move_id, "export started");
        Ok((tail_from, chunks))
    }

    /// Source: the captured writes from `from_seq` on.
    pub fn export_tail(&self, request: &ExportTailRequest) -> Result<ExportTailResponse, NodeError> {
        let capture = self.export_session(request.range_id, request.move_id)?;
        let max = match request.max_entries {
            0 => TAIL_BATCH as usize,
            n => n as usize,
        };
        let (entries, next_seq, backlog) = capture.read_from(request.from_seq, max);
        let entries = entries
            .iter()
            .filter_map(|(seq, op)| to_mutation(op).map(|mutation| TailEntry { seq: *seq, mutation: Some(mutation) }))
            .collect();
        Ok(ExportTailResponse { entries, next_seq, backlog })
    }

    /// Source: stops writes to the range, persisted so a restart does not resume them, and
    /// returns the last captured sequence number.
    pub async fn freeze_for_move(&self, request: &FreezeForMoveRequest) -> Result<u64, NodeError> {
        let capture = self.export_session(request.range_id, request.move_id)?;
        let range =
            self.table.read().by_id(request.range_id).cloned().ok_or(NodeError::UnknownRange(request.range_id))?;
        let _exclusive = range.gate.write().await;
        let already_frozen = range.desc.state() == RangeState::Frozen
            && range.desc.move_intent.as_ref().is_some_and(|i| i.move_id == request.move_id);
        if already_frozen {
            return Ok(capture.next_seq() - 1);
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

    /// Source: the target owns the range now. Retire it here (pointing at the new owner), let
    /// waiting writers go on to NotOwner, and delete the local copy.
    pub async fn retire_moved(&self, request: &RetireMovedRequest) -> Result<(), NodeError> {
        let new_owner =
            request.new_owner.clone().ok_or_else(|| NodeError::Invalid("retire needs the new owner".into()))?;
        let range = self.table.read().by_id(request.range_id).cloned();
        let Some(range) = range else {
            // Already retired (a retried call): nothing to do.
            return Ok(());
        };
        let _exclusive = range.gate.write().await;
        let intent = range.desc.move_intent.clone().filter(|i| i.move_id == request.move_id);
        let Some(intent) = intent.filter(|_| range.desc.state() == RangeState::Frozen) else {
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
        let mut tombstone = new_owner.clone();
        tombstone.state = RangeState::Retired as i32;
        tombstone.move_intent = None;
        let ops = vec![
            descriptor_write(&tombstone),
            WriteOp::DeleteRange { cf: CF_DATA, start: range.desc.start_key.clone(), end: range.desc.end_key.clone() },
        ];
        // Writers waiting on the frozen range go on (to NotOwner, then the target) before the
        // tombstone's fsync: the target already owns the range durably, and a source that
        // crashes before the fsync restarts frozen, which the controller's recovery retires.
        self.table.write().retire_moved(tombstone);
        failpoint::hit("retire-before-persist");
        self.storage.write_durable(ops).await?;
        if let Some(session) = self.moves.exports.lock().remove(&request.range_id) {
            self.storage.stop_capture(&session.capture);
        }
        self.update_range_gauge();
        tracing::info!(range_id = request.range_id, to = %target.node_id, generation = intent.new_generation, "range moved away");
        Ok(())
    }

    /// Source: abandons an export. A frozen range goes back to active at its generation; the
    /// caller must know the target never took ownership.
    pub async fn abort_export(&self, request: &AbortExportRequest) -> Result<(), NodeError> {
        if let Some(session) = self.moves.exports.lock().remove(&request.range_id) {
            self.storage.stop_capture(&session.capture);
        }
        let Some(range) = self.table.read().by_id(request.range_id).cloned() else {
            return Ok(());
        };
        let _exclusive = range.gate.write().await;
        let frozen_for_this_move = range.desc.state() == RangeState::Frozen
            && range.desc.move_intent.as_ref().is_some_and(|i| i.move_id == request.move_id);
        if frozen_for_this_move {
            let mut active = range.desc.clone();
            active.state = RangeState::Active as i32;
            active.move_intent = None;
            self.persist(&[&active]).await?;
            self.table.write().replace_owned(active);
            tracing::info!(range_id = request.range_id, move_id = request.move_id, "move aborted, range active again");
        }
        Ok(())
    }

    /// Target: records the import (persisted, so a restart knows of it), clears the span, copies
    /// the source's snapshot and catches up its tail. Returns once the backlog is small.
    pub async fn import_range(&self, request: &ImportRangeRequest) -> Result<ImportRangeResponse, NodeError> {
        let source = request.range.clone().ok_or_else(|| NodeError::Invalid("import needs the range".into()))?;
        {
            let table = self.table.read();
            if let Some(owned) = table.owned_overlapping(&source) {
                return Err(NodeError::Move(format!(
                    "this node already owns range {} {}, which overlaps {} {}",
                    owned.desc.range_id,
                    owned.desc.span(),
                    source.range_id,
                    source.span()
                )));
            }
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

        let started = Instant::now();
        let mut admin = admin_client(&request.source_address)?;
        let export = ExportSnapshotRequest {
            range_id: source.range_id,
            generation: source.generation,
            move_id: request.move_id,
            chunk_pairs: 0,
        };
        let mut stream = admin.export_snapshot(export).await.map_err(|s| rpc_error("export snapshot", s))?.into_inner();
        let (mut pairs, mut bytes, mut next_seq) = (0u64, 0u64, 1u64);
        while let Some(chunk) = stream.message().await.map_err(|s| rpc_error("reading the snapshot", s))? {
            next_seq = chunk.tail_from_seq.max(1);
            pairs += chunk.pairs.len() as u64;
            bytes += chunk.pairs.iter().map(|kv| (kv.key.len() + kv.value.len()) as u64).sum::<u64>();
            let ops = chunk.pairs.into_iter().map(|kv| WriteOp::put(kv.key, kv.value)).collect();
            self.storage.write_deferred(ops).await?;
            failpoint::hit("import-mid-snapshot");
        }
        let mut session =
            ImportSession { move_id: request.move_id, source_address: request.source_address.clone(), next_seq };
        self.catch_up(&mut admin, source.range_id, &mut session, None).await?;
        // Made durable now, outside the write freeze: the fsync at the handoff then covers only
        // the tail, so the freeze does not grow with the range's size.
        self.storage.sync_wal().await?;
        self.moves.imports.lock().insert(source.range_id, session.clone());
        tracing::info!(
            range_id = source.range_id,
            pairs,
            bytes,
            took = ?started.elapsed(),
            "snapshot imported, tail caught up"
        );
        Ok(ImportRangeResponse { pairs_copied: pairs, bytes_copied: bytes, next_seq: session.next_seq })
    }

    /// Applies tail entries until the backlog is small, or (with `until`) through that sequence.
    async fn catch_up(
        &self,
        admin: &mut AdminClient<tonic::transport::Channel>,
        range_id: u64,
        session: &mut ImportSession,
        until: Option<u64>,
    ) -> Result<(), NodeError> {
        for _ in 0..MAX_CATCH_UP_ROUNDS {
            if until.is_some_and(|last| session.next_seq > last) {
                return Ok(());
            }
            let request = ExportTailRequest {
                range_id,
                move_id: session.move_id,
                from_seq: session.next_seq,
                max_entries: TAIL_BATCH,
            };
            let tail = admin.export_tail(request).await.map_err(|s| rpc_error("reading the tail", s))?.into_inner();
            let ops: Vec<WriteOp> =
                tail.entries.iter().filter_map(|e| e.mutation.as_ref().and_then(from_mutation)).collect();
            if !ops.is_empty() {
                self.storage.write_deferred(ops).await?;
            }
            session.next_seq = tail.next_seq.max(session.next_seq);
            if until.is_none() && tail.backlog <= CAUGHT_UP_BACKLOG {
                return Ok(());
            }
            if until.is_some() && tail.entries.is_empty() {
                // The source is frozen: an empty read means nothing up to `until` is left.
                return Ok(());
            }
        }
        Err(NodeError::Move(format!("range {range_id}: the tail did not catch up in {MAX_CATCH_UP_ROUNDS} rounds")))
    }

    /// Target: applies the rest of the tail (the source is frozen), then owns the range at the
    /// new generation. One fsync makes the copied data and the ownership durable together.
    pub async fn complete_import(&self, request: &CompleteImportRequest) -> Result<RangeDescriptor, NodeError> {
        let _transition = self.moves.import_transition.lock().await;
        let importing = self
            .table
            .read()
            .importing(request.range_id)
            .cloned()
            .ok_or_else(|| NodeError::Move(format!("range {} is not being imported here", request.range_id)))?;
        let session = self.moves.imports.lock().get(&request.range_id).cloned();
        let Some(mut session) = session.filter(|s| s.move_id == request.move_id) else {
            return Err(NodeError::Move(format!(
                "the import of range {} for move {} was lost (restart?): abort it and move again",
                request.range_id, request.move_id
            )));
        };
        let mut admin = admin_client(&session.source_address)?;
        self.catch_up(&mut admin, request.range_id, &mut session, Some(request.final_seq)).await?;
        if session.next_seq <= request.final_seq {
            return Err(NodeError::Move(format!(
                "range {}: the tail ends at {} but the source froze at {}",
                request.range_id,
                session.next_seq - 1,
                request.final_seq
            )));
        }
        let mut owned = importing.clone();
        owned.state = RangeState::Active as i32;
        owned.generation = request.new_generation;
        owned.move_intent = None;
        failpoint::hit("complete-before-persist");
        self.persist(&[&owned]).await?;
        self.table.write().activate_import(owned.clone(), self.new_load());
        self.moves.imports.lock().remove(&request.range_id);
        self.update_range_gauge();
        tracing::info!(range_id = owned.range_id, generation = owned.generation, span = %owned.span(), "range moved in");
        Ok(owned)
    }

    /// Target: forgets an import and deletes what it copied. Refused once the range is owned.
    pub async fn abort_import(&self, request: &AbortImportRequest) -> Result<(), NodeError> {
        let _transition = self.moves.import_transition.lock().await;
        self.moves.imports.lock().remove(&request.range_id);
        let Some(importing) = self.table.read().importing(request.range_id).cloned() else {
            return Ok(());
        };
        let ops = vec![
            WriteOp::Delete { cf: CF_META, key: descriptor_key(importing.range_id) },
            WriteOp::DeleteRange { cf: CF_DATA, start: importing.start_key.clone(), end: importing.end_key.clone() },
        ];
        self.storage.write_durable(ops).await?;
        self.table.write().forget_import(request.range_id);
        tracing::info!(range_id = request.range_id, move_id = request.move_id, "import aborted");
        Ok(())
    }
}
