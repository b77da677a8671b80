//! RocksDB underneath the node: column families, the metadata write pipeline, point reads,
//! snapshot scans and size estimates. Data and Raft logs are written by the Raft thread (see
//! `replica`), straight to the RocksDB `db()`.
//!
//! Metadata (node identity, operator epochs, range descriptors written outside a log) goes
//! through one committer thread. It takes everything queued since its last write, applies it as
//! one RocksDB `WriteBatch` and one fsync, then answers all the writers: concurrent writers share
//! fsyncs (group commit), and each request's writes stay atomic because they are never split
//! across batches. In `async` durability a background thread fsyncs the WAL every interval.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rocksdb::{ColumnFamilyDescriptor, DB, Options, ReadOptions, WriteBatch, WriteOptions};
use tokio::sync::oneshot;

use crate::config::Durability;
use crate::error::NodeError;
use crate::metrics::StorageMetrics;

/// User data: raw user keys, so that splits never move data.
pub const CF_DATA: &str = "data";
/// Node metadata: range descriptors and node identity.
pub const CF_META: &str = "meta";

/// The pairs a scan read, and the key to resume from if it stopped early.
pub type ScanOutput = (Vec<(Bytes, Bytes)>, Option<Bytes>);
/// A raw (key, value) of the metadata column family.
pub type MetaEntry = (Vec<u8>, Vec<u8>);

/// One mutation headed for the committer.
#[derive(Debug, Clone)]
pub enum WriteOp {
    Put {
        cf: &'static str,
        key: Bytes,
        value: Bytes,
    },
    Delete {
        cf: &'static str,
        key: Bytes,
    },
    /// Deletes `[start, end)`; an empty `end` means the end of the key space.
    DeleteRange {
        cf: &'static str,
        start: Bytes,
        end: Bytes,
    },
}

impl WriteOp {
    pub fn put(key: Bytes, value: Bytes) -> Self {
        WriteOp::Put { cf: CF_DATA, key, value }
    }
    pub fn delete(key: Bytes) -> Self {
        WriteOp::Delete { cf: CF_DATA, key }
    }
}

enum CommitterMsg {
    Write(PendingWrite),
    Stop,
}

struct PendingWrite {
    ops: Vec<WriteOp>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The node's RocksDB and its write pipeline.
pub struct Storage {
    db: Arc<DB>,
    queue: std_mpsc::Sender<CommitterMsg>,
    committer: parking_lot::Mutex<Option<JoinHandle<()>>>,
    wal_syncer: parking_lot::Mutex<Option<JoinHandle<()>>>,
    stopping: Arc<AtomicBool>,
    /// A key longer than any the node accepts: the upper bound of an open-ended range in size
    /// estimates.
    key_space_end: Vec<u8>,
}

impl Storage {
    /// A store in `dir` for unit tests: `sync`, defaults otherwise, its metrics registered nowhere.
    #[cfg(test)]
    pub fn open_for_tests(dir: &Path) -> Storage {
        let metrics = crate::metrics::NodeMetrics::new(&mut prometheus_client::registry::Registry::default());
        Storage::open(dir, Durability::Sync, Duration::from_secs(1), 4096, metrics.storage).expect("a store opens")
    }

    pub fn open(
        dir: &Path,
        durability: Durability,
        fsync_interval: Duration,
        max_key_bytes: usize,
        metrics: StorageMetrics,
    ) -> Result<Self, NodeError> {
        std::fs::create_dir_all(dir).map_err(|source| NodeError::Io {
            context: format!("creating data directory {}", dir.display()),
            source,
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(std::thread::available_parallelism().map_or(2, |n| n.get()) as i32);
        // Smooth out background writeback so that fsyncs of the WAL do not stall behind a large
        // amount of dirty SST data.
        opts.set_bytes_per_sync(1 << 20);
        let mut data_opts = Options::default();
        data_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_DATA, data_opts),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
            // Every replicated range's Raft log (see `replica`).
            ColumnFamilyDescriptor::new(kvfleet_replication::CF_RAFT, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|source| NodeError::Storage {
            context: format!("opening RocksDB at {}", dir.display()),
            source,
        })?;
        let db = Arc::new(db);
        let stopping = Arc::new(AtomicBool::new(false));

        let (queue, receiver) = std_mpsc::channel();
        let key_space_end = vec![0xff; max_key_bytes + 1];
        let committer = {
            let db = db.clone();
            let metrics = metrics.clone();
            let key_space_end = key_space_end.clone();
            std::thread::Builder::new()
                .name("kv-committer".into())
                .spawn(move || run_committer(&db, receiver, &key_space_end, &metrics))
                .map_err(|source| NodeError::Io { context: "spawning the committer thread".into(), source })?
        };
        let wal_syncer = match durability {
            Durability::Sync => None,
            Durability::Async => {
                let db = db.clone();
                let stopping = stopping.clone();
                Some(
                    std::thread::Builder::new()
                        .name("kv-wal-sync".into())
                        .spawn(move || run_wal_syncer(&db, fsync_interval, &stopping, &metrics))
                        .map_err(|source| NodeError::Io { context: "spawning the WAL sync thread".into(), source })?,
                )
            }
        };
        Ok(Storage {
            db,
            queue,
            committer: parking_lot::Mutex::new(Some(committer)),
            wal_syncer: parking_lot::Mutex::new(wal_syncer),
            stopping,
            key_space_end,
        })
    }

    /// Applies `ops` atomically and fsyncs them, whatever the durability mode (metadata).
    pub async fn write_durable(&self, ops: Vec<WriteOp>) -> Result<(), NodeError> {
        let (done, wait) = oneshot::channel();
        self.queue.send(CommitterMsg::Write(PendingWrite { ops, done })).map_err(|_| NodeError::ShuttingDown)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(NodeError::WriteFailed(message)),
            Err(_) => Err(NodeError::ShuttingDown),
        }
    }

    /// Fsyncs the WAL: everything written so far becomes durable.
    pub async fn sync_wal(&self) -> Result<(), NodeError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush_wal(true))
            .await
            .map_err(|e| NodeError::WriteFailed(format!("WAL sync task: {e}")))?
            .map_err(|source| NodeError::Storage { context: "syncing the WAL".into(), source })
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>, NodeError> {
        let cf = self.cf(CF_DATA)?;
        let value = self
            .db
            .get_pinned_cf(&cf, key)
            .map_err(|source| NodeError::Storage { context: "reading a key".into(), source })?;
        Ok(value.map(|v| Bytes::copy_from_slice(&v)))
    }

    /// Reads up to `limit` pairs (and about `max_bytes`) in `[start, end)` from one consistent
    /// view of the data. Returns the pairs and, if it stopped early, the key to resume from.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        max_bytes: usize,
        keys_only: bool,
    ) -> Result<ScanOutput, NodeError> {
        let cf = self.cf(CF_DATA)?;
        let mut read_opts = ReadOptions::default();
        if !end.is_empty() {
            read_opts.set_iterate_upper_bound(end.to_vec());
        }
        let mut iter = self.db.raw_iterator_cf_opt(&cf, read_opts);
        iter.seek(start);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else { break };
            if out.len() >= limit || (bytes >= max_bytes && !out.is_empty()) {
                return Ok((out, Some(Bytes::copy_from_slice(key))));
            }
            let value = if keys_only { Bytes::new() } else { Bytes::copy_from_slice(value) };
            bytes += key.len() + value.len();
            out.push((Bytes::copy_from_slice(key), value));
            iter.next();
        }
        iter.status().map_err(|source| NodeError::Storage { context: "scanning".into(), source })?;
        Ok((out, None))
    }

    /// RocksDB's approximate on-disk size of `[start, end)` in the data column family (flushed
    /// SST files; writes still in the memtable are not counted), and an estimated key count.
    pub fn approximate_size(&self, start: &[u8], end: &[u8]) -> Result<(u64, u64), NodeError> {
        let cf = self.cf(CF_DATA)?;
        let end = if end.is_empty() { &self.key_space_end[..] } else { end };
        let size =
            self.db.get_approximate_sizes_cf(&cf, &[rocksdb::Range::new(start, end)]).first().copied().unwrap_or(0);
        let total_keys = self.int_property(CF_DATA, "rocksdb.estimate-num-keys")?;
        let total_bytes = self.int_property(CF_DATA, "rocksdb.total-sst-files-size")?;
        let keys =
            if total_bytes == 0 { 0 } else { ((size as f64 / total_bytes as f64) * total_keys as f64).round() as u64 };
        Ok((size, keys))
    }

    pub fn int_property(&self, cf: &str, name: &str) -> Result<u64, NodeError> {
        let cf = self.cf(cf)?;
        let value = self
            .db
            .property_int_value_cf(&cf, name)
            .map_err(|source| NodeError::Storage { context: format!("reading property {name}"), source })?;
        Ok(value.unwrap_or(0))
    }

    /// Every (key, value) of the metadata column family under `prefix`.
    pub fn meta_entries(&self, prefix: &[u8]) -> Result<Vec<MetaEntry>, NodeError> {
        let cf = self.cf(CF_META)?;
        let mut iter = self.db.raw_iterator_cf(&cf);
        iter.seek(prefix);
        let mut out = Vec::new();
        while iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else { break };
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.to_vec(), value.to_vec()));
            iter.next();
        }
        iter.status().map_err(|source| NodeError::Storage { context: "reading metadata".into(), source })?;
        Ok(out)
    }

    /// The RocksDB itself, for the Raft logs and the replicated ranges' state machine, which
    /// write from the Raft thread rather than through the committer.
    pub fn db(&self) -> Arc<DB> {
        self.db.clone()
    }

    /// A key past every key a client may write (deletes to the end of the key space stop here).
    pub fn key_space_end(&self) -> &[u8] {
        &self.key_space_end
    }

    pub fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, NodeError> {
        let cf = self.cf(CF_META)?;
        self.db.get_cf(&cf, key).map_err(|source| NodeError::Storage { context: "reading metadata".into(), source })
    }

    /// Stops the write pipeline after the writes already queued, then fsyncs the WAL. Later
    /// writes fail with `ShuttingDown`.
    pub fn shutdown(&self) -> Result<(), NodeError> {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(handle) = self.wal_syncer.lock().take() {
            let _ = handle.join();
        }
        if let Some(handle) = self.committer.lock().take() {
            let _ = self.queue.send(CommitterMsg::Stop);
            let _ = handle.join();
        }
        self.db
            .flush_wal(true)
            .map_err(|source| NodeError::Storage { context: "syncing the WAL at shutdown".into(), source })
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, NodeError> {
        self.db.cf_handle(name).ok_or_else(|| NodeError::Corrupt(format!("column family {name} is missing")))
    }
}

fn group_commit(db: &DB, group: &[PendingWrite], key_space_end: &[u8]) -> Result<(), String> {
    let mut batch = WriteBatch::default();
    for pending in group {
        for op in &pending.ops {
            let (WriteOp::Put { cf, .. } | WriteOp::Delete { cf, .. } | WriteOp::DeleteRange { cf, .. }) = op;
            let handle = db.cf_handle(cf).ok_or_else(|| format!("column family {cf} is missing"))?;
            match op {
                WriteOp::Put { key, value, .. } => batch.put_cf(&handle, key, value),
                WriteOp::Delete { key, .. } => batch.delete_cf(&handle, key),
                WriteOp::DeleteRange { start, end, .. } => {
                    let end = if end.is_empty() { key_space_end } else { end.as_ref() };
                    batch.delete_range_cf(&handle, start.as_ref(), end);
                }
            }
        }
    }
    let mut write_opts = WriteOptions::default();
    write_opts.set_sync(true);
    db.write_opt(batch, &write_opts).map_err(|e| e.to_string())
}

/// The committer loop: block for one write, take all that queued behind it, commit them as one.
fn run_committer(db: &DB, receiver: std_mpsc::Receiver<CommitterMsg>, key_space_end: &[u8], metrics: &StorageMetrics) {
    const MAX_GROUP: usize = 1024;
    let mut group: Vec<PendingWrite> = Vec::with_capacity(MAX_GROUP);
    let mut stop = false;
    while !stop {
        match receiver.recv() {
            Ok(CommitterMsg::Write(first)) => group.push(first),
            Ok(CommitterMsg::Stop) | Err(_) => break,
        }
        while group.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(CommitterMsg::Write(next)) => group.push(next),
                Ok(CommitterMsg::Stop) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = group_commit(db, &group, key_space_end);
        metrics.observe_commit(group.len(), started.elapsed(), result.is_ok());
        for pending in group.drain(..) {
            let _ = pending.done.send(result.clone());
        }
    }
}

/// `async` mode: fsync the WAL every `interval`, so an OS crash loses at most that much.
fn run_wal_syncer(db: &DB, interval: Duration, stopping: &AtomicBool, metrics: &StorageMetrics) {
    let tick = interval.min(Duration::from_millis(50));
    let mut last_sync = Instant::now();
    while !stopping.load(Ordering::SeqCst) {
        std::thread::sleep(tick);
        if last_sync.elapsed() < interval {
            continue;
        }
        let started = Instant::now();
        if let Err(error) = db.flush_wal(true) {
            tracing::error!(%error, "background WAL fsync failed");
        }
        metrics.observe_background_fsync(started.elapsed());
        last_sync = Instant::now();
    }
}
