//! One node's Raft logs on RocksDB: every group's entries and hard state in one column family,
//! written for all the groups of a `ready` pass in one fsynced batch (`LogStore::write`). Each
//! group reads its log through a `GroupStorage` (raft-rs's `Storage`), which keeps its bounds and
//! hard state in memory and reads entries from RocksDB.
//!
//! Keys sort a group's entries by index: `e` + group (8 bytes, big-endian) + index (8 bytes,
//! big-endian) -> the entry (protobuf); `s` + group -> the group's hard state and membership;
//! `t` + group -> the index and term of the last entry compacted away; `p` + group -> the index
//! and term of a snapshot taken from the leader whose data the node has not installed yet.
//!
//! Snapshots: raft-rs asks a leader's `GroupStorage::snapshot` when a follower needs entries the
//! log no longer has. The node makes them (its state machine is not here): `SnapshotSlot` says a
//! group wants one and takes the one the node made. A follower's snapshot replaces its log in the
//! same fsynced write that records it as pending; the node clears that mark
//! (`clear_pending_snapshot`) in the write that installs the data, and installs again after a
//! crash while the mark is there.

use std::path::Path;
use std::sync::{Arc, Mutex};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};

use crate::groups::{GroupId, GroupLog, NodeId, Persist};

/// The column family of the Raft logs.
pub const CF_RAFT: &str = "raft";

/// Where the log of a group born from a split starts: its first entry is `SPLIT_LOG_START + 1`
/// (TiKV's `RAFT_INIT_LOG_INDEX`; its data is as of that index, its term too).
pub const SPLIT_LOG_START: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("RocksDB ({what}): {source}")]
    Db { what: &'static str, source: rocksdb::Error },
    #[error("the RocksDB column family {CF_RAFT:?} is missing")]
    NoColumnFamily,
    #[error("group {group}: a stored {what} does not decode: {reason}")]
    Corrupt { group: GroupId, what: &'static str, reason: String },
    #[error("group {0} already has a log on this node")]
    Exists(GroupId),
    #[error(
        "group {group}: cannot compact its log up to {up_to}: only entries up to {limit} may go (the commit index, and the last entry)"
    )]
    CompactTooFar { group: GroupId, up_to: u64, limit: u64 },
}

fn entry_key(group: GroupId, index: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = b'e';
    key[1..9].copy_from_slice(&group.to_be_bytes());
    key[9..].copy_from_slice(&index.to_be_bytes());
    key
}

fn group_key(prefix: u8, group: GroupId) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = prefix;
    key[1..].copy_from_slice(&group.to_be_bytes());
    key
}

fn state_key(group: GroupId) -> [u8; 9] {
    group_key(b's', group)
}

fn truncated_key(group: GroupId) -> [u8; 9] {
    group_key(b't', group)
}

fn pending_snapshot_key(group: GroupId) -> [u8; 9] {
    group_key(b'p', group)
}

fn decode_pair(group: GroupId, what: &'static str, bytes: &[u8]) -> Result<(u64, u64), LogError> {
    let pair: [u8; 16] = bytes.try_into().map_err(|_| LogError::Corrupt {
        group,
        what,
        reason: format!("{} bytes, not 16", bytes.len()),
    })?;
    let (first, second) = pair.split_at(8);
    Ok((
        u64::from_be_bytes(first.try_into().unwrap_or_default()),
        u64::from_be_bytes(second.try_into().unwrap_or_default()),
    ))
}

/// Hard state and membership: two length-prefixed protobuf messages.
fn encode_state(state: &RaftState) -> Vec<u8> {
    let mut out = Vec::new();
    for part in [state.hard_state.write_to_bytes(), state.conf_state.write_to_bytes()] {
        let part = part.unwrap_or_default();
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(&part);
    }
    out
}

fn decode_state(group: GroupId, bytes: &[u8]) -> Result<RaftState, LogError> {
    let corrupt = |reason: String| LogError::Corrupt { group, what: "raft state", reason };
    let mut parts = Vec::new();
    let mut rest = bytes;
    for _ in 0..2 {
        let (length, tail) = rest.split_at_checked(4).ok_or_else(|| corrupt("truncated".into()))?;
        let length = u32::from_be_bytes(length.try_into().map_err(|_| corrupt("length".into()))?) as usize;
        let (part, tail) = tail.split_at_checked(length).ok_or_else(|| corrupt("truncated".into()))?;
        parts.push(part);
        rest = tail;
    }
    let hard_state = HardState::parse_from_bytes(parts[0]).map_err(|e| corrupt(e.to_string()))?;
    let conf_state = ConfState::parse_from_bytes(parts[1]).map_err(|e| corrupt(e.to_string()))?;
    Ok(RaftState { hard_state, conf_state })
}

/// A snapshot a group took whose data the node has not installed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSnapshot {
    pub index: u64,
    pub term: u64,
    pub data: Vec<u8>,
}

/// The Raft logs of every group on one node.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// Whether a pass whose groups are all lone voters may skip the fsync (see `write`).
    lone_voters_unsynced: bool,
    /// Whether a write since the last fsync was not fsynced (shared by the clones).
    unsynced: Arc<std::sync::atomic::AtomicBool>,
}

impl LogStore {
    /// A store in its own RocksDB at `path` (tests, benchmarks).
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let families = vec![ColumnFamilyDescriptor::new(CF_RAFT, Options::default())];
        let db = DB::open_cf_descriptors(&options, path, families)
            .map_err(|source| LogError::Db { what: "open", source })?;
        LogStore::with_db(Arc::new(db))
    }

    /// A store in a RocksDB opened with the column family `CF_RAFT` (the node's).
    pub fn with_db(db: Arc<DB>) -> Result<Self, LogError> {
        if db.cf_handle(CF_RAFT).is_none() {
            return Err(LogError::NoColumnFamily);
        }
        Ok(LogStore { db, lone_voters_unsynced: false, unsynced: Arc::default() })
    }

    /// The same store, writing the passes of single-copy groups without an fsync (a node whose
    /// single copies acknowledge writes once they are in the OS page cache, as its `async`
    /// durability promises; the WAL is fsynced in the background). Raft's safety needs a log
    /// that does not forget what it told another member, so only a lone voter's plain entries
    /// qualify: a pass that holds a membership change, a snapshot, or a group with any other
    /// member is fsynced, and with it every write before it.
    pub fn with_lone_voters_unsynced(self) -> Self {
        LogStore { lone_voters_unsynced: true, ..self }
    }

    fn cf(&self) -> Result<&rocksdb::ColumnFamily, LogError> {
        self.db.cf_handle(CF_RAFT).ok_or(LogError::NoColumnFamily)
    }

    /// Creates the log of a new group whose voters are `voters`, durably.
    pub fn create_group(&self, group: GroupId, voters: &[NodeId]) -> Result<GroupStorage, LogError> {
        if self.open_group(group)?.is_some() {
            return Err(LogError::Exists(group));
        }
        let state = RaftState::new(HardState::default(), ConfState::from((voters.to_vec(), vec![])));
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf()?, state_key(group), encode_state(&state));
        self.write_synced(batch, "create a group")?;
        Ok(GroupStorage::empty(group, self.db.clone(), state))
    }

    /// Adds to `batch` (the write that applies a split of another group) the log of `group`, a
    /// group born from that split with voters `voters`: empty, as if compacted up to
    /// `SPLIT_LOG_START` at term `SPLIT_LOG_START`, which is also its commit index. Every replica
    /// starts the new group alike; one that missed the split (it has no log for the group) needs
    /// entries before the start, which no log has, so it can only be caught up by a snapshot.
    pub fn create_split_group(
        &self,
        group: GroupId,
        voters: &[NodeId],
        batch: &mut WriteBatch,
    ) -> Result<(), LogError> {
        let cf = self.cf()?;
        let hard_state = HardState { term: SPLIT_LOG_START, commit: SPLIT_LOG_START, ..Default::default() };
        let state = RaftState::new(hard_state, ConfState::from((voters.to_vec(), vec![])));
        batch.put_cf(cf, state_key(group), encode_state(&state));
        batch.put_cf(cf, truncated_key(group), [SPLIT_LOG_START.to_be_bytes(), SPLIT_LOG_START.to_be_bytes()].concat());
        batch.delete_range_cf(cf, entry_key(group, 0), entry_key(group, u64::MAX));
        Ok(())
    }

    /// Creates the log of a new group whose voters are `voters`, durably, as if compacted up to
    /// `SPLIT_LOG_START` (as a split's new group is): a replica added later has no entry before
    /// that, so it is caught up by a snapshot, which carries the membership, never by replaying
    /// a log whose first membership is in no entry.
    pub fn create_group_at_start(&self, group: GroupId, voters: &[NodeId]) -> Result<GroupStorage, LogError> {
        if self.open_group(group)?.is_some() {
            return Err(LogError::Exists(group));
        }
        let mut batch = WriteBatch::default();
        self.create_split_group(group, voters, &mut batch)?;
        self.write_synced(batch, "create a group")?;
        self.open_group(group)?.ok_or(LogError::Exists(group))
    }

    /// Creates the log of this node's replica of `group` before it is added to the group: empty,
    /// with no membership (not a voter, not a learner: it campaigns for nothing), durably. The
    /// leader catches it up with a snapshot once the group adds it.
    pub fn create_uninitialized_group(&self, group: GroupId) -> Result<GroupStorage, LogError> {
        if let Some(storage) = self.open_group(group)? {
            return Ok(storage);
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf()?, state_key(group), encode_state(&RaftState::default()));
        self.write_synced(batch, "create a group")?;
        self.open_group(group)?.ok_or(LogError::Exists(group))
    }

    /// Adds to `batch` the deletion of `group`'s whole log: entries, hard state, membership and
    /// marks (this node's replica was removed from the group).
    pub fn delete_group(&self, group: GroupId, batch: &mut WriteBatch) -> Result<(), LogError> {
        let cf = self.cf()?;
        batch.delete_range_cf(cf, entry_key(group, 0), entry_key(group, u64::MAX));
        for key in [state_key(group), truncated_key(group), pending_snapshot_key(group)] {
            batch.delete_cf(cf, key);
        }
        Ok(())
    }

    /// Adds to `batch` (the write that applies the membership change at `index`) `storage`'s
    /// group's new membership, with its hard state, and takes it for the group's later writes.
    pub fn stage_conf_state(
        &self,
        storage: &mut GroupStorage,
        conf_state: ConfState,
        index: u64,
        batch: &mut WriteBatch,
    ) -> Result<(), LogError> {
        storage.state.conf_state = conf_state;
        storage.last_conf_change = index;
        batch.put_cf(self.cf()?, state_key(storage.group), encode_state(&storage.state));
        Ok(())
    }

    /// The membership stored for `group`, read through `get` (a RocksDB snapshot of the DB,
    /// so that it agrees with the data read through it). `None` if the group has no log.
    pub fn stored_conf_state(
        &self,
        group: GroupId,
        get: impl FnOnce(&rocksdb::ColumnFamily, &[u8]) -> Result<Option<Vec<u8>>, rocksdb::Error>,
    ) -> Result<Option<ConfState>, LogError> {
        let bytes = get(self.cf()?, &state_key(group)).map_err(|source| LogError::Db { what: "read", source })?;
        bytes.map(|bytes| decode_state(group, &bytes).map(|state| state.conf_state)).transpose()
    }

    fn write_synced(&self, batch: WriteBatch, what: &'static str) -> Result<(), LogError> {
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        // A synced write syncs the whole WAL, the unsynced writes before it too.
        self.unsynced.store(false, std::sync::atomic::Ordering::Release);
        self.db.write_opt(batch, &sync).map_err(|source| LogError::Db { what, source })
    }

    /// The log of `group` as it was persisted, if this node has one.
    pub fn open_group(&self, group: GroupId) -> Result<Option<GroupStorage>, LogError> {
        let cf = self.cf()?;
        let Some(bytes) =
            self.db.get_cf(cf, state_key(group)).map_err(|source| LogError::Db { what: "read", source })?
        else {
            return Ok(None);
        };
        let state = decode_state(group, &bytes)?;
        let mut storage = GroupStorage::empty(group, self.db.clone(), state);
        let truncated =
            self.db.get_cf(cf, truncated_key(group)).map_err(|source| LogError::Db { what: "read", source })?;
        if let Some(bytes) = truncated {
            let (index, term) = decode_pair(group, "compaction mark", &bytes)?;
            storage.truncated = (index, term);
            (storage.first_index, storage.last_index, storage.last_term) = (index + 1, index, term);
        }
        let start = entry_key(group, 0);
        let mut first = self.db.iterator_cf(cf, IteratorMode::From(&start, Direction::Forward));
        if let Some(item) = first.next() {
            let (key, _) = item.map_err(|source| LogError::Db { what: "scan", source })?;
            if key.len() == 17 && key[..9] == start[..9] {
                let first_stored = u64::from_be_bytes(key[9..].try_into().unwrap_or_default());
                storage.first_index = storage.first_index.max(first_stored);
                let end = entry_key(group, u64::MAX);
                let mut last = self.db.iterator_cf(cf, IteratorMode::From(&end, Direction::Reverse));
                if let Some(item) = last.next() {
                    let (key, value) = item.map_err(|source| LogError::Db { what: "scan", source })?;
                    let entry = Entry::parse_from_bytes(&value).map_err(|e| LogError::Corrupt {
                        group,
                        what: "entry",
                        reason: e.to_string(),
                    })?;
                    if key[..9] == start[..9] {
                        storage.last_index = entry.index;
                        storage.last_term = entry.term;
                    }
                }
            }
        }
        Ok(Some(storage))
    }

    /// The entries `low..=high` of `group` as this node persisted them, in order; an error if
    /// any is missing (compacted, or never received). For a merge, which applies the rest of
    /// the merged range's log here from this node's own copy of it.
    pub fn read_entries(&self, group: GroupId, low: u64, high: u64) -> Result<Vec<Entry>, LogError> {
        let cf = self.cf()?;
        let mut entries = Vec::with_capacity(high.saturating_sub(low).saturating_add(1).min(1024) as usize);
        for index in low..=high {
            let bytes = self
                .db
                .get_cf(cf, entry_key(group, index))
                .map_err(|source| LogError::Db { what: "read", source })?
                .ok_or_else(|| LogError::Corrupt {
                    group,
                    what: "entry",
                    reason: format!("entry {index} is missing"),
                })?;
            let entry = Entry::parse_from_bytes(&bytes).map_err(|e| LogError::Corrupt {
                group,
                what: "entry",
                reason: e.to_string(),
            })?;
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Deletes the entries of `storage`'s group up to `up_to` (at most its commit index and its
    /// last entry), remembering that entry's index and term, durably. Without snapshots yet, the
    /// caller compacts only what every replica of the group already has.
    pub fn compact(&self, storage: &mut GroupStorage, up_to: u64) -> Result<(), LogError> {
        let group = storage.group;
        let limit = storage.state.hard_state.commit.min(storage.last_index);
        if up_to > limit {
            return Err(LogError::CompactTooFar { group, up_to, limit });
        }
        if up_to < storage.first_index {
            return Ok(());
        }
        let term = storage.term(up_to).map_err(|e| LogError::Corrupt {
            group,
            what: "entry",
            reason: format!("term of {up_to}: {e}"),
        })?;
        let cf = self.cf()?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, entry_key(group, storage.first_index), entry_key(group, up_to + 1));
        batch.put_cf(cf, truncated_key(group), [up_to.to_be_bytes(), term.to_be_bytes()].concat());
        self.write_synced(batch, "compact the log")?;
        storage.truncated = (up_to, term);
        storage.first_index = up_to + 1;
        Ok(())
    }

    /// The snapshot `group` took from its leader and whose data is not installed yet, if any:
    /// its index, term and data (what the node put in it; empty in marks written before the
    /// data was kept).
    pub fn pending_snapshot(&self, group: GroupId) -> Result<Option<PendingSnapshot>, LogError> {
        let bytes = self
            .db
            .get_cf(self.cf()?, pending_snapshot_key(group))
            .map_err(|source| LogError::Db { what: "read", source })?;
        let Some(bytes) = bytes else { return Ok(None) };
        let (pair, data) = bytes.split_at(bytes.len().min(16));
        let (index, term) = decode_pair(group, "pending snapshot mark", pair)?;
        Ok(Some(PendingSnapshot { index, term, data: data.to_vec() }))
    }

    /// The groups with a snapshot taken and not installed yet.
    pub fn pending_groups(&self) -> Result<Vec<GroupId>, LogError> {
        let cf = self.cf()?;
        let mut groups = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::From(b"p", Direction::Forward)) {
            let (key, _) = item.map_err(|source| LogError::Db { what: "scan", source })?;
            if key.first() != Some(&b'p') {
                break;
            }
            if let Ok(id) = <[u8; 8]>::try_from(&key[1..]) {
                groups.push(u64::from_be_bytes(id));
            }
        }
        Ok(groups)
    }

    /// Adds to `batch` (the node's write that installs the snapshot's data) the removal of the
    /// pending mark.
    pub fn clear_pending_snapshot(&self, group: GroupId, batch: &mut WriteBatch) -> Result<(), LogError> {
        batch.delete_cf(self.cf()?, pending_snapshot_key(group));
        Ok(())
    }

    /// Writes every group's new entries and hard state in one batch and fsyncs it (unless it
    /// only moves commit indexes, or every group is a lone voter and the store was opened
    /// `with_lone_voters_unsynced`): the entries of a group that replace a longer tail (a
    /// follower's log overwritten by a new leader) also delete what is left of that tail; a
    /// snapshot replaces the whole log and is marked pending.
    pub fn write(&self, persist: &[Persist<'_>]) -> Result<(), LogError> {
        let cf = self.cf()?;
        let mut batch = WriteBatch::default();
        for part in persist {
            if let Some(snapshot) = part.snapshot {
                let metadata = snapshot.get_metadata();
                let pair = [metadata.index.to_be_bytes(), metadata.term.to_be_bytes()].concat();
                batch.delete_range_cf(cf, entry_key(part.group, 0), entry_key(part.group, u64::MAX));
                batch.put_cf(cf, truncated_key(part.group), &pair);
                batch.put_cf(cf, pending_snapshot_key(part.group), [pair.as_slice(), snapshot.get_data()].concat());
                if part.hard_state.is_none() {
                    let stored = self
                        .db
                        .get_cf(cf, state_key(part.group))
                        .map_err(|source| LogError::Db { what: "read", source })?;
                    let mut hard_state = match stored {
                        Some(bytes) => decode_state(part.group, &bytes)?.hard_state,
                        None => HardState::default(),
                    };
                    hard_state.commit = hard_state.commit.max(metadata.index);
                    let state = RaftState::new(hard_state, part.conf_state.clone());
                    batch.put_cf(cf, state_key(part.group), encode_state(&state));
                }
            }
            for entry in part.entries {
                let bytes = entry.write_to_bytes().map_err(|e| LogError::Corrupt {
                    group: part.group,
                    what: "entry",
                    reason: e.to_string(),
                })?;
                batch.put_cf(cf, entry_key(part.group, entry.index), bytes);
            }
            for index in part.stale.clone() {
                batch.delete_cf(cf, entry_key(part.group, index));
            }
            if let Some(hard_state) = part.hard_state {
                let state = RaftState::new(hard_state.clone(), part.conf_state.clone());
                batch.put_cf(cf, state_key(part.group), encode_state(&state));
            }
        }
        if self.lone_voters_unsynced && persist.iter().all(is_lone_voters_plain_write) {
            self.db.write(batch).map_err(|source| LogError::Db { what: "write the log", source })?;
            self.unsynced.store(true, std::sync::atomic::Ordering::Release);
            return Ok(());
        }
        let commit_only = persist.iter().all(|part| {
            part.entries.is_empty() && part.snapshot.is_none() && part.stale.is_empty() && !part.term_or_vote_changed
        });
        if commit_only {
            // No fsync: a commit index lost in a crash is learned again, and one found behind
            // the applied index (written before or after this) is raised to it
            // (`Groups::create_applied`; applied entries are in the durable log).
            return self.db.write(batch).map_err(|source| LogError::Db { what: "write the log", source });
        }
        self.write_synced(batch, "write the log")
    }

    /// Fsyncs the WAL if a write since the last fsync skipped it: before this node tells another
    /// one of log entries (a lone voter's membership, as it applies, may already have a learner
    /// that its stored membership does not show yet). Raft's log matching needs every entry a
    /// node sent to survive on it: one lost in a power loss could come back at the same index
    /// and term with other data.
    pub fn sync_unsynced(&self) -> Result<(), LogError> {
        if self.unsynced.swap(false, std::sync::atomic::Ordering::AcqRel) {
            self.db.flush_wal(true).map_err(|source| LogError::Db { what: "fsync the WAL", source })?;
        }
        Ok(())
    }
}

/// Whether `part` is a group of one voter and nothing else (no learner, no joint membership)
/// writing plain entries: no other member can have been told of them.
fn is_lone_voters_plain_write(part: &Persist<'_>) -> bool {
    let conf = &part.conf_state;
    conf.voters.len() == 1
        && conf.learners.is_empty()
        && conf.voters_outgoing.is_empty()
        && conf.learners_next.is_empty()
        && part.snapshot.is_none()
        && part.entries.iter().all(|e| e.get_entry_type() == raft::eraftpb::EntryType::EntryNormal)
}

/// One group's log on this node, as raft-rs reads it.
pub struct GroupStorage {
    group: GroupId,
    db: Arc<DB>,
    state: RaftState,
    first_index: u64,
    last_index: u64,
    last_term: u64,
    /// The index and term of the last entry compacted away ((0, 0): none).
    truncated: (u64, u64),
    snapshots: SnapshotSlot,
    /// The index of the last membership change applied in this process: a snapshot made before
    /// it is not sent. A replica removed and added again (the same node) would replay its own
    /// removal from such a snapshot; one made after it has the replica as it is now.
    last_conf_change: u64,
}

/// Where a leader's group asks for a snapshot and the node leaves the one it made.
#[derive(Clone, Default)]
pub struct SnapshotSlot(Arc<Mutex<SlotState>>);

#[derive(Default)]
struct SlotState {
    wanted: bool,
    made: Option<Snapshot>,
}

impl SnapshotSlot {
    /// Whether raft-rs asked for a snapshot since the last call (the node then makes one).
    pub fn take_wanted(&self) -> bool {
        self.0.lock().map(|mut slot| std::mem::take(&mut slot.wanted)).unwrap_or(false)
    }

    /// A snapshot the node made: its metadata says the index, term and membership it reflects,
    /// its data how a follower gets it. Requests made while it was being made are answered by
    /// it (raft-rs asks again at every heartbeat; if it is not enough, it asks again after).
    pub fn offer(&self, snapshot: Snapshot) {
        if let Ok(mut slot) = self.0.lock() {
            slot.made = Some(snapshot);
            slot.wanted = false;
        }
    }

    /// The data of the snapshot on offer (what the node put in it), if any.
    pub fn offered_data(&self) -> Option<Vec<u8>> {
        self.0.lock().ok()?.made.as_ref().map(|s| s.get_data().to_vec())
    }

    /// The index of the snapshot on offer, if any.
    pub fn offered_index(&self) -> Option<u64> {
        self.0.lock().ok()?.made.as_ref().map(|s| s.get_metadata().index)
    }

    /// The snapshot on offer, if it covers every entry compacted away (the follower then finds
    /// the rest in the log) and its membership has replica `to` (raft-rs drops a snapshot whose
    /// membership lacks the replica: one made before `to` was added is of no use to it); else
    /// asks for a new one.
    fn usable(&self, compacted_to: u64, to: NodeId) -> Option<Snapshot> {
        let mut slot = self.0.lock().ok()?;
        let has = |snapshot: &Snapshot| {
            let conf = snapshot.get_metadata().get_conf_state();
            conf.voters.contains(&to) || conf.learners.contains(&to) || conf.voters_outgoing.contains(&to)
        };
        match &slot.made {
            Some(snapshot) if snapshot.get_metadata().index >= compacted_to && has(snapshot) => Some(snapshot.clone()),
            _ => {
                slot.wanted = true;
                None
            }
        }
    }
}

impl GroupStorage {
    fn empty(group: GroupId, db: Arc<DB>, state: RaftState) -> Self {
        GroupStorage {
            group,
            db,
            state,
            first_index: 1,
            last_index: 0,
            last_term: 0,
            truncated: (0, 0),
            snapshots: SnapshotSlot::default(),
            last_conf_change: 0,
        }
    }

    pub fn group(&self) -> GroupId {
        self.group
    }

    /// Where this group asks the node for snapshots to send.
    pub fn snapshot_slot(&self) -> SnapshotSlot {
        self.snapshots.clone()
    }

    /// The first index still in the log.
    pub fn first_log_index(&self) -> u64 {
        self.first_index
    }

    /// The last index in the log (persisted).
    pub fn last_log_index(&self) -> u64 {
        self.last_index
    }

    fn read_entry(&self, index: u64) -> raft::Result<Entry> {
        let unavailable = || raft::Error::Store(StorageError::Unavailable);
        let cf = self.db.cf_handle(CF_RAFT).ok_or_else(unavailable)?;
        let bytes =
            self.db.get_cf(cf, entry_key(self.group, index)).map_err(|_| unavailable())?.ok_or_else(unavailable)?;
        Entry::parse_from_bytes(&bytes).map_err(|_| unavailable())
    }
}

impl Storage for GroupStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(self.state.clone())
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into();
        let mut entries = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for index in low..high {
            let entry = self.read_entry(index)?;
            size += u64::from(entry.compute_size());
            if !entries.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        if index < self.first_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if index == self.last_index {
            return Ok(self.last_term);
        }
        Ok(self.read_entry(index)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        self.snapshots
            .usable(self.truncated.0.max(request_index).max(self.last_conf_change), to)
            .ok_or(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    }
}

impl GroupLog for GroupStorage {
    fn append_durable(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> raft::Result<()> {
        if let Some(last) = entries.last() {
            self.last_index = last.index;
            self.last_term = last.term;
        }
        if let Some(hard_state) = hard_state {
            self.state.hard_state = hard_state.clone();
        }
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) {
        self.state.hard_state.commit = commit;
    }

    fn conf_state(&self) -> ConfState {
        self.state.conf_state.clone()
    }

    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> raft::Result<()> {
        let metadata = snapshot.get_metadata();
        self.truncated = (metadata.index, metadata.term);
        (self.first_index, self.last_index, self.last_term) = (metadata.index + 1, metadata.index, metadata.term);
        self.state.conf_state = metadata.get_conf_state().clone();
        self.state.hard_state.commit = self.state.hard_state.commit.max(metadata.index);
        if self.state.hard_state.term < metadata.term {
            self.state.hard_state.term = metadata.term;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::{Groups, GroupsConfig};

    fn entry(index: u64, term: u64, data: &str) -> Entry {
        Entry { index, term, data: data.as_bytes().to_vec().into(), ..Default::default() }
    }

    fn persist<'a>(
        group: GroupId,
        entries: &'a [Entry],
        stale: Range,
        hard_state: Option<&'a HardState>,
    ) -> Persist<'a> {
        Persist {
            group,
            entries,
            stale,
            hard_state,
            term_or_vote_changed: hard_state.is_some(),
            conf_state: ConfState::from((vec![1, 2, 3], vec![])),
            snapshot: None,
        }
    }

    type Range = std::ops::Range<u64>;

    #[test]
    fn a_log_survives_reopening_and_an_overwritten_tail_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path()).unwrap();
        let mut group = store.create_group(7, &[1, 2, 3]).unwrap();
        assert!(matches!(store.create_group(7, &[1]), Err(LogError::Exists(7))));
        let first: Vec<Entry> = (1..=5).map(|i| entry(i, 1, &format!("a{i}"))).collect();
        let hard_state = HardState { term: 1, commit: 2, ..Default::default() };
        store.write(&[persist(7, &first, 0..0, Some(&hard_state))]).unwrap();
        group.append_durable(&first, Some(&hard_state)).unwrap();
        // A new leader at term 2 replaces entries 3.. with two of its own: 5 is stale.
        let second = vec![entry(3, 2, "b3"), entry(4, 2, "b4")];
        store.write(&[persist(7, &second, 5..6, None)]).unwrap();
        group.append_durable(&second, None).unwrap();
        for storage in [group, store.open_group(7).unwrap().expect("the group's log is found again")] {
            assert_eq!((storage.first_index().unwrap(), storage.last_index().unwrap()), (1, 4));
            assert_eq!((storage.term(2).unwrap(), storage.term(3).unwrap(), storage.term(4).unwrap()), (1, 2, 2));
            let read = storage.entries(1, 5, None, GetEntriesContext::empty(false)).unwrap();
            let data: Vec<&[u8]> = read.iter().map(|e| e.data.as_ref()).collect();
            assert_eq!(data, [&b"a1"[..], b"a2", b"b3", b"b4"]);
            let state = storage.initial_state().unwrap();
            assert_eq!((state.hard_state.term, state.hard_state.commit), (1, 2));
            assert_eq!(state.conf_state.voters, [1, 2, 3]);
            assert!(matches!(storage.entries(1, 6, None, GetEntriesContext::empty(false)), Err(raft::Error::Store(_))));
        }
        assert!(store.open_group(8).unwrap().is_none(), "another group's keys are not this one's");
    }

    #[test]
    fn only_a_lone_voters_plain_entries_may_skip_the_fsync() {
        let plain = vec![entry(6, 1, "a")];
        let lone =
            |entries| Persist { conf_state: ConfState::from((vec![1], vec![])), ..persist(7, entries, 0..0, None) };
        assert!(is_lone_voters_plain_write(&lone(&plain)));
        assert!(!is_lone_voters_plain_write(&persist(7, &plain, 0..0, None)), "three voters");
        let with_learner = Persist { conf_state: ConfState::from((vec![1], vec![2])), ..lone(&plain) };
        assert!(!is_lone_voters_plain_write(&with_learner), "a learner is told the entries");
        let mut joint = lone(&plain);
        joint.conf_state.voters_outgoing = vec![2];
        assert!(!is_lone_voters_plain_write(&joint), "a joint membership");
        let change = vec![Entry { entry_type: raft::eraftpb::EntryType::EntryConfChangeV2, ..entry(6, 1, "") }];
        assert!(!is_lone_voters_plain_write(&lone(&change)), "the entry that adds a learner");
        let snapshot = Snapshot::default();
        assert!(!is_lone_voters_plain_write(&Persist { snapshot: Some(&snapshot), ..lone(&plain) }));
        // Written unsynced, the entries are stored all the same.
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path()).unwrap().with_lone_voters_unsynced();
        store.create_group(7, &[1]).unwrap();
        let entries: Vec<Entry> = (1..=3).map(|i| entry(i, 1, "x")).collect();
        store.write(&[lone(&entries)]).unwrap();
        assert_eq!(store.open_group(7).unwrap().expect("the group").last_index().unwrap(), 3);
    }

    #[test]
    fn a_group_born_from_a_split_starts_at_the_split_log_start_with_its_voters() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path()).unwrap();
        let mut batch = WriteBatch::default();
        store.create_split_group(9, &[1, 2, 3], &mut batch).unwrap();
        assert!(store.open_group(9).unwrap().is_none(), "nothing until the split's write");
        store.db.write(batch).unwrap();
        let storage = store.open_group(9).unwrap().expect("the new group's log");
        assert_eq!(
            (storage.first_index().unwrap(), storage.last_index().unwrap()),
            (SPLIT_LOG_START + 1, SPLIT_LOG_START)
        );
        assert_eq!(storage.term(SPLIT_LOG_START).unwrap(), SPLIT_LOG_START);
        let state = storage.initial_state().unwrap();
        assert_eq!((state.hard_state.term, state.hard_state.commit), (SPLIT_LOG_START, SPLIT_LOG_START));
        assert_eq!(state.conf_state.voters, [1, 2, 3]);
        // A replica without the group needs entries no log has: only a snapshot catches it up.
        assert!(matches!(
            storage.entries(1, SPLIT_LOG_START + 1, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
    }

    #[test]
    fn a_snapshot_replaces_the_log_stays_pending_until_cleared_and_is_offered_only_if_it_covers_the_compacted_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path()).unwrap();
        let mut group = store.create_group(4, &[1, 2, 3]).unwrap();
        let old: Vec<Entry> = (1..=5).map(|i| entry(i, 1, &format!("old{i}"))).collect();
        let hard_state = HardState { term: 1, commit: 5, ..Default::default() };
        store.write(&[persist(4, &old, 0..0, Some(&hard_state))]).unwrap();
        group.append_durable(&old, Some(&hard_state)).unwrap();

        // A snapshot at (40, 3) with entry 41 after it, as a follower far behind gets them.
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = 40;
        snapshot.mut_metadata().term = 3;
        snapshot.mut_metadata().set_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        snapshot.data = b"what the node keeps in it".to_vec().into();
        let after = vec![entry(41, 3, "new41")];
        let mut part = persist(4, &after, 0..0, None);
        part.snapshot = Some(&snapshot);
        store.write(&[part]).unwrap();
        group.apply_snapshot(&snapshot).unwrap();
        group.append_durable(&after, None).unwrap();
        for storage in [group, store.open_group(4).unwrap().unwrap()] {
            assert_eq!((storage.first_index().unwrap(), storage.last_index().unwrap()), (41, 41));
            assert_eq!(storage.term(40).unwrap(), 3, "the snapshot's term answers for its index");
            assert!(storage.initial_state().unwrap().hard_state.commit >= 40);
            assert!(matches!(storage.term(5), Err(raft::Error::Store(StorageError::Compacted))), "old entries gone");
        }
        let pending = store.pending_snapshot(4).unwrap().expect("the snapshot is pending");
        assert_eq!((pending.index, pending.term, pending.data.as_slice()), (40, 3, snapshot.get_data()));
        let mut batch = WriteBatch::default();
        store.clear_pending_snapshot(4, &mut batch).unwrap();
        store.db.write(batch).unwrap();
        assert_eq!(store.pending_snapshot(4).unwrap(), None);

        // A leader offers a snapshot only if it covers what its log compacted away.
        let mut leader = store.open_group(4).unwrap().unwrap();
        let slot = leader.snapshot_slot();
        assert!(leader.snapshot(0, 2).is_err(), "nothing on offer yet");
        assert!(slot.take_wanted(), "the request reaches the node");
        assert!(!slot.take_wanted(), "once");
        let mut stale = snapshot.clone();
        stale.mut_metadata().index = 39;
        slot.offer(stale);
        assert!(leader.snapshot(0, 2).is_err(), "index 39 does not cover the log compacted to 40");
        slot.offer(snapshot.clone());
        assert_eq!(leader.snapshot(0, 2).unwrap().get_metadata().index, 40);
        let more: Vec<Entry> = (42..=50).map(|i| entry(i, 3, "x")).collect();
        let hard_state = HardState { term: 3, commit: 50, ..Default::default() };
        store.write(&[persist(4, &more, 0..0, Some(&hard_state))]).unwrap();
        leader.append_durable(&more, Some(&hard_state)).unwrap();
        store.compact(&mut leader, 45).unwrap();
        assert!(leader.snapshot(0, 2).is_err(), "compacted past the snapshot: a new one is needed");
    }

    #[test]
    fn a_compacted_log_keeps_its_tail_and_the_last_compacted_term_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path()).unwrap();
        let mut group = store.create_group(3, &[1, 2, 3]).unwrap();
        let entries: Vec<Entry> = (1..=10).map(|i| entry(i, 1 + i / 5, &format!("e{i}"))).collect();
        let hard_state = HardState { term: 3, commit: 8, ..Default::default() };
        store.write(&[persist(3, &entries, 0..0, Some(&hard_state))]).unwrap();
        group.append_durable(&entries, Some(&hard_state)).unwrap();
        let refused = store.compact(&mut group, 9).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "group 3: cannot compact its log up to 9: only entries up to 8 may go (the commit index, and the last entry)"
        );
        store.compact(&mut group, 6).unwrap();
        let more = vec![entry(11, 3, "e11")];
        store.write(&[persist(3, &more, 0..0, None)]).unwrap();
        group.append_durable(&more, None).unwrap();
        for storage in [group, store.open_group(3).unwrap().unwrap()] {
            assert_eq!((storage.first_index().unwrap(), storage.last_index().unwrap()), (7, 11));
            assert_eq!(storage.term(6).unwrap(), 2, "the last compacted entry's term is kept");
            assert!(matches!(storage.term(5), Err(raft::Error::Store(StorageError::Compacted))));
            assert!(matches!(
                storage.entries(5, 8, None, GetEntriesContext::empty(false)),
                Err(raft::Error::Store(StorageError::Compacted))
            ));
            let tail = storage.entries(7, 12, None, GetEntriesContext::empty(false)).unwrap();
            assert_eq!(tail.iter().map(|e| e.index).collect::<Vec<_>>(), [7, 8, 9, 10, 11]);
        }
    }

    #[test]
    fn a_group_driven_on_rocksdb_commits_and_recovers_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path()).unwrap();
        let mut groups: Groups<GroupStorage> = Groups::new(1, GroupsConfig::default());
        groups.create(1, store.create_group(1, &[1]).unwrap()).unwrap();
        groups.campaign(1).unwrap();
        let mut writes = 0;
        for round in 0..5 {
            groups.propose(1, format!("put {round}").into_bytes()).unwrap();
            groups
                .ready(|persist| {
                    writes += 1;
                    store.write(persist).map_err(|e| e.to_string())
                })
                .unwrap();
        }
        let committed = groups.committed(1).unwrap();
        assert_eq!(committed, 6, "the election's empty entry and five proposals");
        assert!(writes >= 5);
        drop(groups);
        let recovered = store.open_group(1).unwrap().unwrap();
        assert_eq!(recovered.last_index().unwrap(), 6);
        let mut groups: Groups<GroupStorage> = Groups::new(1, GroupsConfig::default());
        groups.create(1, recovered).unwrap();
        groups.campaign(1).unwrap();
        groups.propose(1, b"after restart".to_vec()).unwrap();
        groups.ready(|persist| store.write(persist).map_err(|e| e.to_string())).unwrap();
        assert_eq!(groups.committed(1), Some(8), "a new term's empty entry, then the proposal");
        let log = store.open_group(1).unwrap().unwrap();
        let entries = log.entries(1, 9, None, GetEntriesContext::empty(false)).unwrap();
        let proposals: Vec<String> = entries
            .iter()
            .filter(|e| !e.data.is_empty())
            .map(|e| String::from_utf8_lossy(&e.data).into_owned())
            .collect();
        assert_eq!(proposals, ["put 0", "put 1", "put 2", "put 3", "put 4", "after restart"]);
    }
}
