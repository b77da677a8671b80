//! Snapshots of a replicated range's data, for a follower that needs entries the leader's log no
//! longer has: the leader makes one (`make`), the follower fetches it over
//! `RaftTransport.FetchSnapshot` before its group takes the MsgSnapshot, and installs it in place
//! of the range's data once the group made it durable (`install`).
//!
//! A snapshot is one SST file: a range deletion of the range's whole span, then the range's keys,
//! read from one RocksDB snapshot together with the applied index (and term) they reflect. The
//! leader keeps the one it made in `<data-dir>/raft-snapshots/made/<range>-<index>-<term>.sst`;
//! a follower fetches it into `.../fetched/`. Installing is one ingest (RocksDB applies the file
//! atomically, and its range deletion does not cover the keys in the same file: a concurrent
//! read sees the old data or the new, never a mix), then one write of the applied index that
//! also clears the group's pending mark: a crash in between leaves the mark and the file, and
//! the node installs again at start. Installs run one at a time, and never over a replica that
//! already applied the snapshot's index: the file's range deletion and keys would take back
//! every write applied since.

use std::path::{Path, PathBuf};

use kvfleet_proto::v1::{RaftSnapshotData, RangeDescriptor};
use kvfleet_replication::{LogStore, Snapshot, SnapshotMetadata};
use prost::Message as _;
use rocksdb::{
    DB, IngestExternalFileOptions, IteratorMode, Options, ReadOptions, SstFileWriter, WriteBatch, WriteOptions,
};

use super::apply;
use crate::storage::{CF_DATA, CF_META};

/// A range's key span: `[start, end)`, an empty end meaning the end of the key space; and
/// whether the range is frozen to be merged (it applies no write any more).
#[derive(Debug, Clone, Default)]
pub struct Span {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    pub frozen: bool,
}

impl Span {
    pub fn of(desc: &RangeDescriptor) -> Self {
        Span { start: desc.start_key.to_vec(), end: desc.end_key.to_vec(), frozen: desc.is_frozen_for_merge() }
    }
}

impl kvfleet_proto::RangeBounds for Span {
    fn start(&self) -> &[u8] {
        &self.start
    }

    fn end(&self) -> &[u8] {
        &self.end
    }
}

/// Where snapshot files live: those this node made as a leader, and those it fetched as a
/// follower (apart, so that making one never touches a file waiting to be installed).
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    dir: PathBuf,
}

/// Which of a node's snapshot files.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    Made,
    Fetched,
}

impl SnapshotFiles {
    pub fn new(data_dir: &Path) -> Self {
        SnapshotFiles { dir: data_dir.join("raft-snapshots") }
    }

    fn side(&self, side: Side) -> PathBuf {
        self.dir.join(match side {
            Side::Made => "made",
            Side::Fetched => "fetched",
        })
    }

    pub fn path(&self, side: Side, range_id: u64, index: u64, term: u64) -> PathBuf {
        self.side(side).join(format!("{range_id}-{index}-{term}.sst"))
    }

    /// A file being written: renamed to `path` when complete.
    pub fn partial(&self, side: Side, range_id: u64, index: u64, term: u64) -> PathBuf {
        self.side(side).join(format!("{range_id}-{index}-{term}.sst.partial"))
    }

    pub fn create_dir(&self, side: Side) -> Result<(), String> {
        let dir = self.side(side);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))
    }

    /// Makes a rename into `side` durable (fsyncs the directory).
    pub fn sync_dir(&self, side: Side) -> Result<(), String> {
        let dir = self.side(side);
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| format!("syncing {}: {e}", dir.display()))
    }

    /// Deletes every snapshot file (at start, once the pending ones are installed).
    pub fn remove_all(&self) {
        if self.dir.exists()
            && let Err(error) = std::fs::remove_dir_all(&self.dir)
        {
            tracing::warn!(dir = %self.dir.display(), %error, "old snapshot files not removed");
        }
    }

    /// Deletes the made files of `range_id` other than `keep` (older snapshots nobody will fetch).
    fn remove_others(&self, range_id: u64, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(self.side(Side::Made)) else { return };
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

/// Makes a snapshot of `range_id` as of its applied index: the data, the index, the range's
/// descriptor (its keys and replicas) and the group's membership come from one RocksDB
/// snapshot, so they agree (a membership change writes its membership with its applied index).
pub fn make(
    db: &DB,
    log: &LogStore,
    files: &SnapshotFiles,
    range_id: u64,
    key_space_end: &[u8],
) -> Result<Snapshot, String> {
    let view = db.snapshot();
    let conf_state = log
        .stored_conf_state(range_id, |cf, key| view.get_cf(cf, key))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("range {range_id} has no Raft log"))?;
    let (data_cf, meta_cf) = match (db.cf_handle(CF_DATA), db.cf_handle(CF_META)) {
        (Some(data), Some(meta)) => (data, meta),
        _ => return Err("a column family is missing".into()),
    };
    let descriptor_key = crate::ranges::descriptor_key(range_id);
    let descriptor = view
        .get_cf(meta_cf, &descriptor_key)
        .map_err(|e| format!("reading range {range_id}'s descriptor: {e}"))?
        .ok_or_else(|| format!("range {range_id} has no descriptor"))?;
    let descriptor = crate::ranges::decode_descriptor(&descriptor_key, &descriptor).map_err(|e| e.to_string())?;
    let span = &Span::of(&descriptor);
    let applied = view
        .get_cf(meta_cf, apply::applied_key(range_id))
        .map_err(|e| format!("reading range {range_id}'s applied index: {e}"))?
        .ok_or_else(|| format!("range {range_id} has applied nothing yet"))?;
    let (index, term) = match apply::decode_applied(range_id, &applied)? {
        (index, Some(term)) if index > 0 => (index, term),
        _ => return Err(format!("range {range_id}: the applied entry's term is not known yet (retry after a write)")),
    };
    files.create_dir(Side::Made)?;
    let partial = files.partial(Side::Made, range_id, index, term);
    let path = files.path(Side::Made, range_id, index, term);
    let failed = |what: &str, e: rocksdb::Error| format!("{what} {}: {e}", partial.display());
    let sst_options = Options::default();
    let mut writer = SstFileWriter::create(&sst_options);
    writer.open(&partial).map_err(|e| failed("creating", e))?;
    // Whatever the follower holds in the span goes, atomically with the keys below.
    let end = if span.end.is_empty() { key_space_end } else { &span.end };
    writer.delete_range(span.start.as_slice(), end).map_err(|e| failed("writing", e))?;
    let mut read = ReadOptions::default();
    if !span.end.is_empty() {
        read.set_iterate_upper_bound(span.end.clone());
    }
    let (mut pairs, mut bytes) = (0u64, 0u64);
    for item in view.iterator_cf_opt(data_cf, read, IteratorMode::From(&span.start, rocksdb::Direction::Forward)) {
        let (key, value) = item.map_err(|e| format!("reading range {range_id}: {e}"))?;
        writer.put(&key, &value).map_err(|e| failed("writing", e))?;
        pairs += 1;
        bytes += (key.len() + value.len()) as u64;
    }
    writer.finish().map_err(|e| failed("finishing", e))?;
    let file_bytes = std::fs::metadata(&partial).map_err(|e| format!("{}: {e}", partial.display()))?.len();
    std::fs::rename(&partial, &path).map_err(|e| format!("renaming {}: {e}", partial.display()))?;
    files.remove_others(range_id, &path);
    let data = RaftSnapshotData { range_id, index, term, pairs, bytes, file_bytes, descriptor: Some(descriptor) }
        .encode_to_vec();
    let metadata = SnapshotMetadata { index, term, conf_state: Some(conf_state).into(), ..Default::default() };
    Ok(Snapshot { data: data.into(), metadata: Some(metadata).into(), ..Default::default() })
}

/// What a MsgSnapshot's data says, checked against the group it came for.
pub fn describe(range_id: u64, data: &[u8]) -> Result<RaftSnapshotData, String> {
    let info = RaftSnapshotData::decode(data).map_err(|e| format!("a snapshot of range {range_id}: {e}"))?;
    if info.range_id != range_id {
        return Err(format!("a snapshot of range {} sent for range {range_id}", info.range_id));
    }
    Ok(info)
}

/// How an installed snapshot changed this node's replica of a range.
#[derive(Debug, Clone)]
pub enum Installed {
    /// The replica's first snapshot (it was just added to the range): this node holds it now.
    Added(RangeDescriptor),
    /// The snapshot's range is newer than this replica's (splits or membership changes it
    /// missed): the replica takes its descriptor; `narrowed` if its keys are fewer.
    Replaced { desc: RangeDescriptor, narrowed: bool },
}

/// Held by every install in this process, from the applied-index check to the write that ends it.
static INSTALLING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// What installing snapshots needs: the node's DB, its Raft logs (for the pending marks) and
/// where the fetched files are.
#[derive(Clone)]
pub struct Installer {
    pub db: std::sync::Arc<DB>,
    pub log: LogStore,
    pub files: SnapshotFiles,
}

/// What installing a snapshot changed: the range's descriptor (if it changed), and the ranges
/// held here that it took (this replica missed their merge into it): retired in the same write.
pub struct InstallOutcome {
    pub changed: Option<Installed>,
    pub retired: Vec<RangeDescriptor>,
    /// The snapshot was not installed: a newer range held here has its keys (this range was
    /// merged into it), whose data the snapshot's would have replaced. The range's group is to
    /// stop here.
    pub obsolete: Option<u64>,
}

impl Installer {
    /// Replaces `range_id`'s data with the snapshot at (`index`, `term`) (its file fetched before
    /// the group took it; `data` is what the MsgSnapshot carried), records the applied index and
    /// clears the pending mark. Safe to repeat after a crash: the mark stays until the last
    /// write, the file until after it.
    ///
    /// A snapshot whose range is at a newer generation (or membership version) than this
    /// replica's comes after a split or membership change this replica missed (its log was
    /// compacted past it): the replica takes the snapshot's descriptor, in the same last write.
    /// The data of the keys the range no longer has stays, unserved (they belong to the split's
    /// new range, of which this node holds no replica): deleting it could pull a key from under
    /// a read that began before. A replica just added has no descriptor yet: it takes the
    /// snapshot's. A snapshot taken after a merge retires the ranges held here that it took, in
    /// the same last write. Returns how the replica changed, if it did.
    pub fn install(&self, range_id: u64, index: u64, term: u64, data: &[u8]) -> Result<InstallOutcome, String> {
        let _one_at_a_time = INSTALLING.lock();
        let db = &self.db;
        let applied = apply::applied_index(db, range_id)?;
        let path = self.files.path(Side::Fetched, range_id, index, term);
        if applied >= index {
            tracing::warn!(range_id, index, applied, "a snapshot this replica already applied was not installed again");
            let pending = self.log.pending_snapshot(range_id).map_err(|e| e.to_string())?;
            if pending.is_some_and(|p| (p.index, p.term) == (index, term)) {
                self.drop_pending(range_id, &path)?;
            } else {
                let _ = std::fs::remove_file(&path);
            }
            return Ok(InstallOutcome { changed: None, retired: Vec::new(), obsolete: None });
        }
        let (data_cf, meta_cf) = match (db.cf_handle(CF_DATA), db.cf_handle(CF_META)) {
            (Some(data), Some(meta)) => (data, meta),
            _ => return Err("a column family is missing".into()),
        };
        if !path.exists() {
            return Err(format!("the snapshot file {} is missing", path.display()));
        }
        let sent = if data.is_empty() { None } else { describe(range_id, data)?.descriptor };
        let overlapping = sent.as_ref().map(|sent| self.held_overlapping(sent)).transpose()?.unwrap_or_default();
        // A range held here at a higher generation that has some of the snapshot's keys: the
        // snapshot's range was merged into it (on this node already).
        let newer = overlapping.iter().find(|held| sent.as_ref().is_some_and(|s| held.generation > s.generation));
        if let Some(newer) = newer.map(|held| held.range_id) {
            self.drop_pending(range_id, &path)?;
            return Ok(InstallOutcome { changed: None, retired: Vec::new(), obsolete: Some(newer) });
        }
        kvfleet_proto::failpoint::hit("snapshot-install-before-data");
        let mut ingest = IngestExternalFileOptions::default();
        // Copied, not moved: the file must survive a crash before the mark is cleared.
        ingest.set_move_files(false);
        db.ingest_external_file_cf_opts(data_cf, &ingest, vec![&path])
            .map_err(|e| format!("ingesting {}: {e}", path.display()))?;
        kvfleet_proto::failpoint::hit("snapshot-install-before-applied");
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let mut done = WriteBatch::default();
        let mut changed = None;
        let mut retired = Vec::new();
        if let Some(sent) = sent {
            let mine = apply::stored_descriptor(db, range_id).ok().filter(|d| d.is_owned_state());
            changed = match mine {
                None => Some(Installed::Added(sent.clone())),
                // A freeze changes neither the generation nor the membership version.
                Some(mine)
                    if (sent.generation, sent.conf_version, sent.merge_freeze_index)
                        > (mine.generation, mine.conf_version, mine.merge_freeze_index) =>
                {
                    let narrowed = sent.start_key != mine.start_key || sent.end_key != mine.end_key;
                    Some(Installed::Replaced { desc: sent.clone(), narrowed })
                }
                Some(_) => None,
            };
            if changed.is_some() {
                done.put_cf(meta_cf, crate::ranges::descriptor_key(range_id), sent.encode_to_vec());
                retired = self.stage_taken(&sent, overlapping, &mut done)?;
            }
        }
        done.put_cf(meta_cf, apply::applied_key(range_id), apply::encode_applied(index, term));
        self.log.clear_pending_snapshot(range_id, &mut done).map_err(|e| e.to_string())?;
        db.write_opt(done, &sync).map_err(|e| format!("recording range {range_id}'s snapshot: {e}"))?;
        let _ = std::fs::remove_file(&path);
        Ok(InstallOutcome { changed, retired, obsolete: None })
    }

    /// Clears `range_id`'s pending mark and deletes the snapshot's file at `path`: a snapshot
    /// not installed, for good.
    fn drop_pending(&self, range_id: u64, path: &Path) -> Result<(), String> {
        let mut done = WriteBatch::default();
        self.log.clear_pending_snapshot(range_id, &mut done).map_err(|e| e.to_string())?;
        self.db.write(done).map_err(|e| format!("dropping range {range_id}'s snapshot: {e}"))?;
        let _ = std::fs::remove_file(path);
        Ok(())
    }

    /// The ranges held here (owned, other than `sent`'s) that have some of `sent`'s keys.
    fn held_overlapping(&self, sent: &RangeDescriptor) -> Result<Vec<RangeDescriptor>, String> {
        use kvfleet_proto::RangeBounds as _;
        let meta_cf = self.db.cf_handle(CF_META).ok_or("the meta column family is missing")?;
        let prefix = crate::ranges::RANGE_PREFIX;
        let mut overlapping = Vec::new();
        for item in self.db.iterator_cf(meta_cf, IteratorMode::From(prefix, rocksdb::Direction::Forward)) {
            let (key, value) = item.map_err(|e| format!("reading range descriptors: {e}"))?;
            if !key.starts_with(prefix) {
                break;
            }
            let held = crate::ranges::decode_descriptor(&key, &value).map_err(|e| e.to_string())?;
            if held.range_id != sent.range_id && held.is_owned_state() && held.overlaps(sent) {
                overlapping.push(held);
            }
        }
        Ok(overlapping)
    }

    /// Stages in `done` the retirement of every older replicated range among `overlapping`
    /// (held here, with some of `sent`'s keys: merged into it while this replica was behind; the
    /// snapshot's data replaced theirs), and returns their tombstones.
    fn stage_taken(
        &self,
        sent: &RangeDescriptor,
        overlapping: Vec<RangeDescriptor>,
        done: &mut WriteBatch,
    ) -> Result<Vec<RangeDescriptor>, String> {
        let mut retired = Vec::new();
        for held in overlapping {
            if !held.is_raft_group() || held.generation >= sent.generation {
                continue;
            }
            let tombstone = RangeDescriptor {
                state: kvfleet_proto::v1::RangeState::Retired as i32,
                generation: held.generation + 1,
                successors: vec![sent.range_id],
                replicas: sent.replicas.clone(),
                ..held
            };
            apply::stage_subsumed(&self.db, &self.log, &tombstone, done)?;
            retired.push(tombstone);
        }
        Ok(retired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kvfleet_proto::v1::{RangeState, Replica};

    fn range(range_id: u64, span: (&'static str, &'static str), generation: u64, frozen_at: u64) -> RangeDescriptor {
        let replica = |raft_id| Replica { node_id: format!("n{raft_id}"), raft_id, ..Default::default() };
        RangeDescriptor {
            range_id,
            start_key: Bytes::from(span.0),
            end_key: Bytes::from(span.1),
            generation,
            state: if frozen_at > 0 { RangeState::Frozen } else { RangeState::Active } as i32,
            replicas: vec![replica(11), replica(12), replica(13)],
            merge_freeze_index: frozen_at,
            ..Default::default()
        }
    }

    /// Writes `desc`, its applied index and `pairs` to `db`.
    fn hold(db: &DB, log: &LogStore, desc: &RangeDescriptor, applied: (u64, u64), pairs: &[(&str, &str)]) {
        let (meta, data) = (db.cf_handle(CF_META).unwrap(), db.cf_handle(CF_DATA).unwrap());
        db.put_cf(meta, crate::ranges::descriptor_key(desc.range_id), desc.encode_to_vec()).unwrap();
        db.put_cf(meta, apply::applied_key(desc.range_id), apply::encode_applied(applied.0, applied.1)).unwrap();
        for (key, value) in pairs {
            db.put_cf(data, key, value).unwrap();
        }
        log.create_group(desc.range_id, &[11, 12, 13]).unwrap();
    }

    #[test]
    fn a_snapshot_is_not_installed_again_over_the_writes_applied_after_it() {
        let (leader_dir, follower_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = crate::storage::Storage::open_for_tests(leader_dir.path());
        let (leader_db, leader_log) = (leader.db(), LogStore::with_db(leader.db()).unwrap());
        hold(&leader_db, &leader_log, &range(1, ("", ""), 1, 0), (30, 2), &[("k", "v30")]);
        let leader_files = SnapshotFiles::new(leader_dir.path());
        let snapshot = make(&leader_db, &leader_log, &leader_files, 1, leader.key_space_end()).unwrap();

        let follower = crate::storage::Storage::open_for_tests(follower_dir.path());
        let (db, log) = (follower.db(), LogStore::with_db(follower.db()).unwrap());
        let files = SnapshotFiles::new(follower_dir.path());
        files.create_dir(Side::Fetched).unwrap();
        let fetched = files.path(Side::Fetched, 1, 30, 2);
        std::fs::copy(leader_files.path(Side::Made, 1, 30, 2), &fetched).unwrap();
        let installer = Installer { db: db.clone(), log: log.clone(), files };
        let outcome = installer.install(1, 30, 2, &snapshot.data).unwrap();
        assert!(matches!(outcome.changed, Some(Installed::Added(_))), "the first install adds the replica");

        // The Raft thread applies entry 31 over the snapshot; then the same snapshot is asked to
        // be installed again, its file still there (a second caller that raced the first).
        let (meta, data) = (db.cf_handle(CF_META).unwrap(), db.cf_handle(CF_DATA).unwrap());
        db.put_cf(data, "k", "v31").unwrap();
        db.put_cf(meta, apply::applied_key(1), apply::encode_applied(31, 2)).unwrap();
        std::fs::copy(leader_files.path(Side::Made, 1, 30, 2), &fetched).unwrap();
        let again = installer.install(1, 30, 2, &snapshot.data).unwrap();
        assert!(again.changed.is_none() && again.obsolete.is_none(), "nothing changed the second time");
        assert!(!fetched.exists(), "the file of a snapshot already applied is removed");
        assert_eq!(db.get_cf(data, "k").unwrap().as_deref(), Some(&b"v31"[..]), "the write after the snapshot stays");
        assert_eq!(apply::applied_index(&db, 1).unwrap(), 31);
        drop((leader_db, leader_log, db, log, installer));
        leader.shutdown().unwrap();
        follower.shutdown().unwrap();
    }

    #[test]
    fn a_snapshot_taken_after_a_merge_retires_the_taken_range_in_its_own_write() {
        // The leader's replica: range 1 merged over range 2's keys, at index 50.
        let (leader_dir, lagging_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = crate::storage::Storage::open_for_tests(leader_dir.path());
        let (leader_db, leader_log) = (leader.db(), LogStore::with_db(leader.db()).unwrap());
        let merged = range(1, ("", ""), 3, 0);
        hold(&leader_db, &leader_log, &merged, (50, 2), &[("a", "1"), ("n", "after the merge")]);
        let leader_files = SnapshotFiles::new(leader_dir.path());
        let snapshot = make(&leader_db, &leader_log, &leader_files, 1, leader.key_space_end()).unwrap();

        // A replica that applied range 2's freeze and never the merge.
        let lagging = crate::storage::Storage::open_for_tests(lagging_dir.path());
        let (db, log) = (lagging.db(), LogStore::with_db(lagging.db()).unwrap());
        hold(&db, &log, &range(1, ("", "m"), 2, 0), (20, 2), &[("a", "0")]);
        hold(&db, &log, &range(2, ("m", ""), 2, 7), (7, 2), &[("n", "before the merge")]);
        let files = SnapshotFiles::new(lagging_dir.path());
        files.create_dir(Side::Fetched).unwrap();
        std::fs::copy(leader_files.path(Side::Made, 1, 50, 2), files.path(Side::Fetched, 1, 50, 2)).unwrap();

        let installer = Installer { db: db.clone(), log: log.clone(), files };
        let outcome = installer.install(1, 50, 2, &snapshot.data).unwrap();
        assert!(matches!(&outcome.changed, Some(Installed::Replaced { desc, .. }) if *desc == merged));
        let [tombstone] = outcome.retired.as_slice() else { panic!("one range retired: {:?}", outcome.retired) };
        assert_eq!(
            (tombstone.range_id, tombstone.state(), tombstone.successors.clone()),
            (2, RangeState::Retired, vec![1])
        );
        assert_eq!(apply::stored_descriptor(&db, 2).unwrap(), *tombstone);
        assert_eq!(apply::stored_descriptor(&db, 1).unwrap(), merged);
        assert!(log.open_group(2).unwrap().is_none(), "the taken range's log is deleted");
        let data = db.cf_handle(CF_DATA).unwrap();
        assert_eq!(db.get_cf(data, "n").unwrap().as_deref(), Some(&b"after the merge"[..]));

        // A snapshot of the taken range itself, arriving late, is not installed: its data would
        // replace the merged range's newer data for those keys.
        let late = tempfile::tempdir().unwrap();
        let late_storage = crate::storage::Storage::open_for_tests(late.path());
        let (late_db, late_log) = (late_storage.db(), LogStore::with_db(late_storage.db()).unwrap());
        hold(&late_db, &late_log, &range(2, ("m", ""), 2, 7), (9, 2), &[("n", "before the merge")]);
        let late_files = SnapshotFiles::new(late.path());
        let old_snapshot = make(&late_db, &late_log, &late_files, 2, late_storage.key_space_end()).unwrap();
        std::fs::copy(late_files.path(Side::Made, 2, 9, 2), installer.files.path(Side::Fetched, 2, 9, 2)).unwrap();
        let outcome = installer.install(2, 9, 2, &old_snapshot.data).unwrap();
        assert_eq!(outcome.obsolete, Some(1), "the late snapshot was installed");
        assert_eq!(db.get_cf(data, "n").unwrap().as_deref(), Some(&b"after the merge"[..]));

        // A snapshot taken after a freeze carries it to a replica that missed it (neither the
        // generation nor the membership version changed).
        let frozen = range(3, ("x", "z"), 2, 9);
        hold(&leader_db, &leader_log, &frozen, (12, 2), &[("y", "1")]);
        let snapshot = make(&leader_db, &leader_log, &leader_files, 3, leader.key_space_end()).unwrap();
        hold(&late_db, &late_log, &range(3, ("x", "z"), 2, 0), (4, 2), &[]);
        let late_installer = Installer { db: late_db.clone(), log: late_log.clone(), files: late_files };
        late_installer.files.create_dir(Side::Fetched).unwrap();
        std::fs::copy(leader_files.path(Side::Made, 3, 12, 2), late_installer.files.path(Side::Fetched, 3, 12, 2))
            .unwrap();
        let outcome = late_installer.install(3, 12, 2, &snapshot.data).unwrap();
        assert!(matches!(&outcome.changed, Some(Installed::Replaced { desc, .. }) if *desc == frozen));
        assert!(apply::stored_descriptor(&late_db, 3).unwrap().is_frozen_for_merge());
        drop((late_db, late_log, late_installer));
        late_storage.shutdown().unwrap();
        drop((leader_db, leader_log, db, log, installer));
        leader.shutdown().unwrap();
        lagging.shutdown().unwrap();
    }
}
