//! Snapshots of a replicated range's data, for a follower that needs entries the leader's log no
//! longer has: the leader makes one (`make`), the follower fetches it over
//! `RaftTransport.FetchSnapshot` before its group takes the MsgSnapshot, and installs it in place
//! of the range's data once the group made it durable (`install`).
//!
//! A snapshot is one SST file of the range's keys, read from one RocksDB snapshot together with
//! the applied index (and term) it reflects, at `<data-dir>/raft-snapshots/<range>-<index>-<term>.sst`
//! on both sides; an empty range has no file. Installing deletes the range's keys, ingests the
//! file, and then records the applied index and clears the group's pending mark in one write:
//! a crash in between leaves the mark, and the node installs again at start.

use std::path::{Path, PathBuf};

use kvfleet_proto::v1::RaftSnapshotData;
use kvfleet_replication::{ConfState, LogStore, Snapshot, SnapshotMetadata};
use prost::Message as _;
use rocksdb::{
    DB, IngestExternalFileOptions, IteratorMode, Options, ReadOptions, SstFileWriter, WriteBatch, WriteOptions,
};

use super::apply;
use crate::storage::{CF_DATA, CF_META};

/// A range's key span: `[start, end)`, an empty end meaning the end of the key space.
#[derive(Debug, Clone, Default)]
pub struct Span {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
}

/// Where snapshot files live, on the leader that made them and on the follower that fetched them.
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    dir: PathBuf,
}

impl SnapshotFiles {
    pub fn new(data_dir: &Path) -> Self {
        SnapshotFiles { dir: data_dir.join("raft-snapshots") }
    }

    pub fn path(&self, range_id: u64, index: u64, term: u64) -> PathBuf {
        self.dir.join(format!("{range_id}-{index}-{term}.sst"))
    }

    /// A file being written (made or fetched): renamed to `path` when complete.
    pub fn partial(&self, range_id: u64, index: u64, term: u64) -> PathBuf {
        self.dir.join(format!("{range_id}-{index}-{term}.sst.partial"))
    }

    fn create_dir(&self) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("creating {}: {e}", self.dir.display()))
    }

    /// Deletes every snapshot file (at start, once the pending ones are installed).
    pub fn remove_all(&self) {
        if self.dir.exists()
            && let Err(error) = std::fs::remove_dir_all(&self.dir)
        {
            tracing::warn!(dir = %self.dir.display(), %error, "old snapshot files not removed");
        }
    }

    /// Deletes the files of `range_id` other than `keep` (older snapshots nobody will fetch).
    fn remove_others(&self, range_id: u64, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let prefix = format!("{range_id}-");
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(&prefix) && path != keep {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Makes a snapshot of `range_id` as of its applied index: the data and the index come from one
/// RocksDB snapshot, so they agree. `conf_state` is the group's membership (it cannot change
/// between two indexes yet: there are no membership changes).
pub fn make(
    db: &DB,
    files: &SnapshotFiles,
    range_id: u64,
    span: &Span,
    conf_state: ConfState,
) -> Result<Snapshot, String> {
    let view = db.snapshot();
    let (data_cf, meta_cf) = match (db.cf_handle(CF_DATA), db.cf_handle(CF_META)) {
        (Some(data), Some(meta)) => (data, meta),
        _ => return Err("a column family is missing".into()),
    };
    let applied = view
        .get_cf(meta_cf, apply::applied_key(range_id))
        .map_err(|e| format!("reading range {range_id}'s applied index: {e}"))?
        .ok_or_else(|| format!("range {range_id} has applied nothing yet"))?;
    let (index, term) = match apply::decode_applied(range_id, &applied)? {
        (index, Some(term)) if index > 0 => (index, term),
        _ => return Err(format!("range {range_id}: the applied entry's term is not known yet (retry after a write)")),
    };
    files.create_dir()?;
    let partial = files.partial(range_id, index, term);
    let path = files.path(range_id, index, term);
    let mut read = ReadOptions::default();
    if !span.end.is_empty() {
        read.set_iterate_upper_bound(span.end.clone());
    }
    let sst_options = Options::default();
    let mut writer = SstFileWriter::create(&sst_options);
    let (mut pairs, mut bytes) = (0u64, 0u64);
    for item in view.iterator_cf_opt(data_cf, read, IteratorMode::From(&span.start, rocksdb::Direction::Forward)) {
        let (key, value) = item.map_err(|e| format!("reading range {range_id}: {e}"))?;
        if pairs == 0 {
            writer.open(&partial).map_err(|e| format!("creating {}: {e}", partial.display()))?;
        }
        writer.put(&key, &value).map_err(|e| format!("writing {}: {e}", partial.display()))?;
        pairs += 1;
        bytes += (key.len() + value.len()) as u64;
    }
    if pairs > 0 {
        writer.finish().map_err(|e| format!("finishing {}: {e}", partial.display()))?;
        std::fs::rename(&partial, &path).map_err(|e| format!("renaming {}: {e}", partial.display()))?;
    }
    files.remove_others(range_id, &path);
    let data = RaftSnapshotData { range_id, index, term, pairs, bytes }.encode_to_vec();
    let metadata = SnapshotMetadata { index, term, conf_state: Some(conf_state).into(), ..Default::default() };
    let snapshot = Snapshot { data: data.into(), metadata: Some(metadata).into(), ..Default::default() };
    Ok(snapshot)
}

/// What a MsgSnapshot's data says, checked against the group it came for.
pub fn describe(range_id: u64, data: &[u8]) -> Result<RaftSnapshotData, String> {
    let info = RaftSnapshotData::decode(data).map_err(|e| format!("a snapshot of range {range_id}: {e}"))?;
    if info.range_id != range_id {
        return Err(format!("a snapshot of range {} sent for range {range_id}", info.range_id));
    }
    Ok(info)
}

/// What installing snapshots needs: the node's DB, its Raft logs (for the pending marks), where
/// the files are, and the end of the key space.
#[derive(Clone)]
pub struct Installer {
    pub db: std::sync::Arc<DB>,
    pub log: LogStore,
    pub files: SnapshotFiles,
    pub key_space_end: Vec<u8>,
}

impl Installer {
    /// Replaces `range_id`'s data with the snapshot at (`index`, `term`) (its file fetched before
    /// the group took it), records the applied index and clears the pending mark. Safe to repeat
    /// after a crash: the mark stays until the last write, the file until after it. `pairs`: how
    /// many keys the snapshot has, when known (a missing file is then an error unless it is 0).
    pub fn install(&self, range_id: u64, span: &Span, index: u64, term: u64, pairs: Option<u64>) -> Result<(), String> {
        let db = &self.db;
        let (data_cf, meta_cf) = match (db.cf_handle(CF_DATA), db.cf_handle(CF_META)) {
            (Some(data), Some(meta)) => (data, meta),
            _ => return Err("a column family is missing".into()),
        };
        let path = self.files.path(range_id, index, term);
        if pairs.is_some_and(|p| p > 0) && !path.exists() {
            return Err(format!("the snapshot file {} is missing", path.display()));
        }
        kvfleet_proto::failpoint::hit("snapshot-install-before-data");
        let end = if span.end.is_empty() { &self.key_space_end } else { &span.end };
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let mut clear = WriteBatch::default();
        clear.delete_range_cf(data_cf, &span.start, end);
        db.write_opt(clear, &sync).map_err(|e| format!("clearing range {range_id} for its snapshot: {e}"))?;
        if path.exists() {
            let mut ingest = IngestExternalFileOptions::default();
            // Copied, not moved: the file must survive a crash before the mark is cleared.
            ingest.set_move_files(false);
            db.ingest_external_file_cf_opts(data_cf, &ingest, vec![&path])
                .map_err(|e| format!("ingesting {}: {e}", path.display()))?;
        }
        kvfleet_proto::failpoint::hit("snapshot-install-before-applied");
        let mut done = WriteBatch::default();
        done.put_cf(meta_cf, apply::applied_key(range_id), apply::encode_applied(index, term));
        self.log.clear_pending_snapshot(range_id, &mut done).map_err(|e| e.to_string())?;
        db.write_opt(done, &sync).map_err(|e| format!("recording range {range_id}'s snapshot: {e}"))?;
        let _ = std::fs::remove_file(&path);
        Ok(())
    }
}
