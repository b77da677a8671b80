//! The state machine of a replicated range: the command one log entry carries (mutations applied
//! atomically, a split, or a membership change) and how committed entries change the data,
//! together with the index they reach.
//!
//! The data and the applied index (with its entry's term, which a snapshot of the data needs) go
//! in one RocksDB write, not fsynced: the Raft log is the durable copy. After a crash the data is
//! as of some applied index, never between two, and the group replays the log from there.

use kvfleet_proto::RangeBounds as _;
use kvfleet_proto::failpoint;
use kvfleet_proto::v1::{
    Mutation, RaftCommand, RaftFreeze, RaftMembershipChange, RaftMerge, RaftMergeFence, RaftSplit, RaftThaw,
    RangeDescriptor, RangeState, Replica, ReplicaMembership, mutation::Op as MutationOp,
};
use kvfleet_replication::{ConfChangeV2, ConfState, Entry, EntryType, LogStore, SPLIT_LOG_START};
use prost::Message as _;
use rocksdb::{DB, WriteBatch};

use super::ReplicaError;
use super::snapshot::Span;
use crate::ranges::descriptor_key;
use crate::storage::{CF_DATA, CF_META};

const APPLIED_PREFIX: &[u8] = b"raft-applied/";

pub fn applied_key(range_id: u64) -> Vec<u8> {
    [APPLIED_PREFIX, &range_id.to_be_bytes()].concat()
}

/// The stored applied index and its term: index and term (8 bytes each), or only the index
/// (written before terms were kept: term unknown).
pub fn decode_applied(range_id: u64, bytes: &[u8]) -> Result<(u64, Option<u64>), String> {
    let number = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or_default());
    match bytes.len() {
        8 => Ok((number(bytes), None)),
        16 => Ok((number(&bytes[..8]), Some(number(&bytes[8..])))),
        n => Err(format!("range {range_id}: the applied index is {n} bytes, not 8 or 16")),
    }
}

pub fn encode_applied(index: u64, term: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&index.to_be_bytes());
    out[8..].copy_from_slice(&term.to_be_bytes());
    out
}

pub fn encode_command(mutations: Vec<Mutation>) -> Vec<u8> {
    RaftCommand { mutations, ..Default::default() }.encode_to_vec()
}

/// The keys of a command's mutations (`None` if it does not decode, or is not mutations).
pub fn command_keys(command: &[u8]) -> Option<Vec<bytes::Bytes>> {
    let command = RaftCommand::decode(command).ok()?;
    if command.split.is_some() || command.freeze.is_some() || command.merge.is_some() {
        return None;
    }
    Some(command.mutations.into_iter().map(|m| m.key).collect())
}

pub fn encode_split(split: RaftSplit) -> Vec<u8> {
    RaftCommand { split: Some(split), ..Default::default() }.encode_to_vec()
}

pub fn encode_freeze(freeze: RaftFreeze) -> Vec<u8> {
    RaftCommand { freeze: Some(freeze), ..Default::default() }.encode_to_vec()
}

pub fn encode_merge_fence(fence: RaftMergeFence) -> Vec<u8> {
    RaftCommand { merge_fence: Some(fence), ..Default::default() }.encode_to_vec()
}

pub fn encode_thaw(thaw: RaftThaw) -> Vec<u8> {
    RaftCommand { thaw: Some(thaw), ..Default::default() }.encode_to_vec()
}

pub fn encode_merge(merge: RaftMerge) -> Vec<u8> {
    RaftCommand { merge: Some(merge), ..Default::default() }.encode_to_vec()
}

/// The log index the data of `range_id` reflects (0: none applied).
pub fn applied_index(db: &DB, range_id: u64) -> Result<u64, String> {
    let cf = db.cf_handle(CF_META).ok_or("the meta column family is missing")?;
    match db.get_cf(cf, applied_key(range_id)).map_err(|e| e.to_string())? {
        None => Ok(0),
        Some(bytes) => Ok(decode_applied(range_id, &bytes)?.0),
    }
}

/// What became of one applied entry.
pub struct Applied {
    pub index: u64,
    pub term: u64,
    pub outcome: Result<(), ReplicaError>,
    /// The entry was a membership change (raft-rs turns a change it will not take into an
    /// empty normal entry: a proposer of a change learns so from this).
    pub membership: bool,
}

/// A split an applied entry made: the range's new descriptor (`left`, same id) and the new
/// range's (`right`), both persisted with the entry, the right one's Raft log created.
#[derive(Debug, Clone)]
pub struct SplitApplied {
    pub index: u64,
    pub left: RangeDescriptor,
    pub right: RangeDescriptor,
}

impl AppliedRun {
    /// The range's descriptor as this run's last change left it (none: unchanged).
    pub fn last_descriptor(&self) -> Option<&RangeDescriptor> {
        self.descriptor.as_ref()
    }

    /// Records what an entry that changes the range did: the change made (the range's keys and
    /// descriptor follow it), or its refusal (the entry's outcome); a fatal failure stops the run.
    fn record(&mut self, change: Result<Change, Failure>, span: &mut Span) -> Result<Result<(), ReplicaError>, String> {
        let desc = match change {
            Ok(Change::Split(done)) => {
                let desc = done.left.clone();
                self.splits.push(done);
                desc
            }
            Ok(Change::Freeze(done)) => {
                let desc = done.desc.clone();
                self.freezes.push(done);
                desc
            }
            Ok(Change::Merge(done)) => {
                let desc = done.left.clone();
                self.merges.push(done);
                desc
            }
            Ok(Change::Fence(desc)) => desc,
            Ok(Change::Thaw(desc)) => {
                self.thaws.push(desc.clone());
                desc
            }
            Err(Failure::Refused(refused)) => return Ok(Err(refused)),
            Err(Failure::Fatal(reason)) => return Err(reason),
        };
        *span = Span::of(&desc);
        self.descriptor = Some(desc);
        Ok(Ok(()))
    }
}

/// A change of the range's keys or state an entry made (see `AppliedRun::record`).
enum Change {
    Split(SplitApplied),
    Freeze(FreezeApplied),
    Merge(MergeApplied),
    /// The range's descriptor after a RaftMergeFence.
    Fence(RangeDescriptor),
    /// The range's descriptor after a RaftThaw.
    Thaw(RangeDescriptor),
}

/// A membership change an applied entry made: the range's descriptor with its new replicas
/// (persisted with the entry) and whether it left the group in a joint configuration.
#[derive(Debug, Clone)]
pub struct MembershipApplied {
    pub index: u64,
    pub desc: RangeDescriptor,
    pub joint: bool,
}

/// A freeze an applied entry made: the range's descriptor, frozen at the entry's index.
#[derive(Debug, Clone)]
pub struct FreezeApplied {
    pub desc: RangeDescriptor,
}

/// A merge an applied entry made: the range's descriptor with the right neighbour's keys
/// (`left`, same id) and the right neighbour's tombstone (`right`), both persisted with the
/// entry, the right range's log deleted (its data stays: it is the left range's now).
#[derive(Debug, Clone)]
pub struct MergeApplied {
    pub index: u64,
    pub left: RangeDescriptor,
    pub right: RangeDescriptor,
}

/// What applying a run of committed entries did.
pub struct AppliedRun {
    pub entries: Vec<Applied>,
    pub splits: Vec<SplitApplied>,
    pub memberships: Vec<MembershipApplied>,
    pub freezes: Vec<FreezeApplied>,
    pub merges: Vec<MergeApplied>,
    /// The range's descriptor as each thaw applied in this run left it (active again).
    pub thaws: Vec<RangeDescriptor>,
    /// Splits of a merged-away range that this replica applied from its own log while merging
    /// (it had not applied them yet): their new ranges' groups start too.
    pub caught_up_splits: Vec<SplitApplied>,
    /// Merges into a merged-away range that this replica applied from its own log while merging
    /// it: their right ranges' groups stop too.
    pub caught_up_merges: Vec<MergeApplied>,
    /// The range's descriptor as the last change of this run left it.
    descriptor: Option<RangeDescriptor>,
    /// This replica was removed from the group by the last membership change: the range is
    /// retired here (this descriptor, with the new replicas), its log deleted and its data
    /// marked for deletion, all in the write that applied the change. Entries after it are not
    /// applied.
    pub removed: Option<RangeDescriptor>,
}

/// Applies a committed membership change to the group on the Raft thread (raft-rs's
/// `apply_conf_change`) and stages the new membership in the write that applies the entry.
/// `Refused` if raft-rs refuses it (alike on every replica): nothing changed.
pub type ConfChanger<'a> = dyn FnMut(&ConfChangeV2, u64, &mut WriteBatch) -> Result<ConfState, Failure> + 'a;

const REMOVED_PREFIX: &[u8] = b"raft-removed/";

/// The mark of a removed replica's data still to delete: its key span, by range id.
pub fn removed_key(range_id: u64) -> Vec<u8> {
    [REMOVED_PREFIX, &range_id.to_be_bytes()].concat()
}

pub fn removed_prefix() -> &'static [u8] {
    REMOVED_PREFIX
}

/// Applies committed `entries` of `range_id` (in log order) in one write; returns each entry's
/// outcome and the splits among them. `span` is the range's keys, narrowed here by a split: an
/// entry writing a key outside it (proposed before a split it was ordered after) is refused on
/// every replica alike, and its writer told to retry. Entries without a command (a new leader's
/// empty entry) only advance the index.
#[allow(clippy::too_many_arguments)]
pub fn apply_entries(
    db: &DB,
    log: &LogStore,
    range_id: u64,
    self_raft_id: u64,
    span: &mut Span,
    entries: &[Entry],
    conf_changer: &mut ConfChanger<'_>,
) -> Result<AppliedRun, String> {
    let (Some(data), Some(meta)) = (db.cf_handle(CF_DATA), db.cf_handle(CF_META)) else {
        return Err("a column family is missing".into());
    };
    let mut batch = WriteBatch::default();
    let mut run = AppliedRun {
        entries: Vec::with_capacity(entries.len()),
        splits: Vec::new(),
        memberships: Vec::new(),
        freezes: Vec::new(),
        merges: Vec::new(),
        thaws: Vec::new(),
        caught_up_splits: Vec::new(),
        caught_up_merges: Vec::new(),
        descriptor: None,
        removed: None,
    };
    let mut last_applied = None;
    for entry in entries {
        let mut outcome = Ok(());
        last_applied = Some(entry);
        if entry.get_entry_type() == EntryType::EntryConfChangeV2 {
            match change_membership(db, range_id, self_raft_id, entry, &run, &mut batch, conf_changer) {
                Ok(done) => {
                    let removed = !done.desc.replicas.iter().any(|r| r.raft_id == self_raft_id);
                    run.descriptor = Some(done.desc.clone());
                    if removed {
                        let tombstone = RangeDescriptor { state: RangeState::Retired as i32, ..done.desc.clone() };
                        stage_removal(db, log, &tombstone, &mut batch)?;
                        run.entries.push(Applied { index: entry.index, term: entry.term, outcome, membership: true });
                        run.removed = Some(tombstone);
                        run.memberships.push(done);
                        break;
                    }
                    run.memberships.push(done);
                }
                Err(Failure::Refused(refused)) => outcome = Err(refused),
                Err(Failure::Fatal(reason)) => return Err(reason),
            }
        } else if entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty() {
            match RaftCommand::decode(entry.data.as_ref()) {
                Ok(RaftCommand { split: Some(split), .. }) => {
                    let split = split_range(db, log, range_id, entry.index, &split, &run, &mut batch);
                    outcome = run.record(split.map(Change::Split), span)?;
                }
                Ok(RaftCommand { freeze: Some(freeze), .. }) => {
                    let freeze = freeze_range(db, range_id, entry.index, &freeze, &run, &mut batch);
                    outcome = run.record(freeze.map(Change::Freeze), span)?;
                }
                Ok(RaftCommand { merge: Some(merge), .. }) => {
                    let merge = merge_range(db, log, range_id, self_raft_id, entry.index, &merge, &mut run, &mut batch);
                    outcome = run.record(merge.map(Change::Merge), span)?;
                }
                Ok(RaftCommand { merge_fence: Some(fence), .. }) => {
                    let fence = fence_merge(db, range_id, &fence, &run, &mut batch);
                    outcome = run.record(fence.map(Change::Fence), span)?;
                }
                Ok(RaftCommand { thaw: Some(thaw), .. }) => {
                    let thaw = thaw_range(db, range_id, &thaw, &run, &mut batch);
                    outcome = run.record(thaw.map(Change::Thaw), span)?;
                }
                Ok(command) => {
                    if span.frozen && !command.mutations.is_empty() {
                        outcome = Err(ReplicaError::Merging { range_id });
                    } else if command.mutations.iter().any(|m| !span.contains_key(&m.key)) {
                        outcome = Err(ReplicaError::OutsideRange { range_id });
                    } else {
                        for mutation in &command.mutations {
                            match mutation.op() {
                                MutationOp::Put => batch.put_cf(data, &mutation.key, &mutation.value),
                                MutationOp::Delete => batch.delete_cf(data, &mutation.key),
                                MutationOp::Unspecified => {}
                            }
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(range_id, index = entry.index, %error, "a committed log entry does not decode; skipped");
                    outcome = Err(ReplicaError::BadCommand { range_id, reason: error.to_string() });
                }
            }
        }
        let membership = entry.get_entry_type() == EntryType::EntryConfChangeV2;
        run.entries.push(Applied { index: entry.index, term: entry.term, outcome, membership });
    }
    if let (Some(last), None) = (last_applied, &run.removed) {
        batch.put_cf(meta, applied_key(range_id), encode_applied(last.index, last.term));
    }
    if !run.splits.is_empty() {
        failpoint::hit("split-apply-before-write");
    }
    if !run.memberships.is_empty() {
        failpoint::hit("membership-apply-before-write");
    }
    if !run.freezes.is_empty() {
        failpoint::hit("merge-freeze-apply-before-write");
    }
    if !run.merges.is_empty() {
        failpoint::hit("merge-apply-before-write");
    }
    db.write(batch).map_err(|e| format!("applying range {range_id}'s log: {e}"))?;
    Ok(run)
}

/// The range's descriptor as the entries applied so far in this run left it.
fn current_descriptor(db: &DB, range_id: u64, run: &AppliedRun) -> Result<RangeDescriptor, Failure> {
    match &run.descriptor {
        Some(desc) => Ok(desc.clone()),
        None => stored_descriptor(db, range_id).map_err(Failure::Fatal),
    }
}

/// Applies a membership change entry: refused alike on every replica if the range's membership
/// is not at the version the change expected (it was proposed from another membership) or if
/// raft-rs refuses it; otherwise the range's descriptor takes the new replicas at the next
/// membership version, in `batch`.
fn change_membership(
    db: &DB,
    range_id: u64,
    self_raft_id: u64,
    entry: &Entry,
    run: &AppliedRun,
    batch: &mut WriteBatch,
    conf_changer: &mut ConfChanger<'_>,
) -> Result<MembershipApplied, Failure> {
    let refused = |reason: String| Failure::Refused(ReplicaError::MembershipRefused { range_id, reason });
    let change = kvfleet_replication::decode_conf_change(&entry.data).map_err(refused)?;
    let context = if entry.context.is_empty() {
        RaftMembershipChange::default()
    } else {
        RaftMembershipChange::decode(entry.context.as_ref()).map_err(|e| refused(e.to_string()))?
    };
    let desc = current_descriptor(db, range_id, run)?;
    if desc.is_frozen_for_merge() {
        return Err(refused("it is frozen to be merged into its left neighbour".into()));
    }
    if !entry.context.is_empty() && context.expected_conf_version != desc.conf_version {
        return Err(refused(format!(
            "its membership is at version {}, the change expected {}",
            desc.conf_version, context.expected_conf_version
        )));
    }
    let conf_state = conf_changer(&change, entry.index, batch)?;
    let replicas = replicas_of(&desc.replicas, &context.added, &conf_state);
    let joint = !conf_state.voters_outgoing.is_empty();
    let desc = RangeDescriptor { replicas, conf_version: desc.conf_version + 1, ..desc };
    if desc.replicas.iter().any(|r| r.raft_id == self_raft_id) {
        let meta = db.cf_handle(CF_META).ok_or_else(|| Failure::Fatal("the meta column family is missing".into()))?;
        batch.put_cf(meta, descriptor_key(range_id), desc.encode_to_vec());
    }
    Ok(MembershipApplied { index: entry.index, desc, joint })
}

/// The replicas of a range whose membership is now `conf_state`: those it had and those the
/// change added (by Raft id), each with its part, in that order; those in no set are gone.
pub fn replicas_of(had: &[Replica], added: &[Replica], conf_state: &ConfState) -> Vec<Replica> {
    let joint = !conf_state.voters_outgoing.is_empty();
    let mut replicas: Vec<Replica> = Vec::new();
    for replica in had.iter().chain(added) {
        if replicas.iter().any(|r| r.raft_id == replica.raft_id) {
            continue;
        }
        let (incoming, outgoing) =
            (conf_state.voters.contains(&replica.raft_id), conf_state.voters_outgoing.contains(&replica.raft_id));
        let membership = match (incoming, outgoing) {
            (true, true) => ReplicaMembership::Voter,
            (true, false) if joint => ReplicaMembership::Joining,
            (true, false) => ReplicaMembership::Voter,
            (false, true) => ReplicaMembership::Leaving,
            // Demoted by the joint change that replaced it: a learner on its way out.
            (false, false)
                if conf_state.learners.contains(&replica.raft_id)
                    && matches!(replica.membership(), ReplicaMembership::Leaving | ReplicaMembership::Demoted) =>
            {
                ReplicaMembership::Demoted
            }
            (false, false)
                if conf_state.learners.contains(&replica.raft_id)
                    || conf_state.learners_next.contains(&replica.raft_id) =>
            {
                ReplicaMembership::Learner
            }
            (false, false) => continue,
        };
        replicas.push(Replica { membership: membership as i32, behind_entries: None, ..replica.clone() });
    }
    replicas
}

/// Adds to `batch` the end of this node's replica of a range: its descriptor retired
/// (`tombstone`), its applied index and Raft log deleted, and its data marked for deletion
/// (the node deletes it once no request uses it, or at its next start).
pub fn stage_removal(
    db: &DB,
    log: &LogStore,
    tombstone: &RangeDescriptor,
    batch: &mut WriteBatch,
) -> Result<(), String> {
    let meta = db.cf_handle(CF_META).ok_or("the meta column family is missing")?;
    let range_id = tombstone.range_id;
    batch.put_cf(meta, descriptor_key(range_id), tombstone.encode_to_vec());
    batch.put_cf(meta, removed_key(range_id), tombstone.encode_to_vec());
    batch.delete_cf(meta, applied_key(range_id));
    log.delete_group(range_id, batch).map_err(|e| e.to_string())
}

/// Why an entry that changes the range (a split, a membership change) was not applied.
pub enum Failure {
    /// Refused alike on every replica: the entry is skipped, the proposer told why.
    Refused(ReplicaError),
    /// Something about this replica alone (its stored state): applying on would make it
    /// diverge from the others, so the node stops.
    Fatal(String),
}

/// Adds a split of `range_id` to `batch`: both descriptors, the new range's log and applied
/// index. Refused, alike on every replica (the decision reads only what the log made), if the
/// range is not at the expected generation, the key is not strictly inside it, or a
/// membership change is under way (the new group starts with the range's voters). The new id
/// must be unknown here: a replica that knows it (ids reused by hand) stops rather than
/// overwrite another range's log and votes.
fn split_range(
    db: &DB,
    log: &LogStore,
    range_id: u64,
    index: u64,
    split: &RaftSplit,
    run: &AppliedRun,
    batch: &mut WriteBatch,
) -> Result<SplitApplied, Failure> {
    let refused = |reason: String| Failure::Refused(ReplicaError::SplitRefused { range_id, reason });
    let desc = current_descriptor(db, range_id, run)?;
    if desc.is_frozen_for_merge() {
        return Err(refused("it is frozen to be merged into its left neighbour".into()));
    }
    if desc.replicas.iter().any(|r| r.membership() != ReplicaMembership::Voter) {
        return Err(refused("a membership change is under way (a learner, or a joint membership)".into()));
    }
    if split.expected_generation != 0 && split.expected_generation != desc.generation {
        return Err(refused(format!(
            "it is at generation {}, the split expected {}",
            desc.generation, split.expected_generation
        )));
    }
    if !desc.is_interior(&split.split_key) {
        return Err(refused(format!(
            "split key {} is not strictly inside {}",
            kvfleet_proto::display_key(&split.split_key),
            desc.span()
        )));
    }
    if split.right_id == 0 || split.right_id == range_id {
        return Err(refused(format!("the new range's id {} must be new", split.right_id)));
    }
    let fatal = |what: &str| Failure::Fatal(format!("range {range_id}'s split at index {index}: {what}"));
    let meta = db.cf_handle(CF_META).ok_or_else(|| fatal("the meta column family is missing"))?;
    let taken = db.get_cf(meta, descriptor_key(split.right_id)).map_err(|e| fatal(e.as_ref()))?.is_some()
        || log.open_group(split.right_id).map_err(|e| fatal(&e.to_string()))?.is_some();
    if taken {
        return Err(fatal(&format!("the new range's id {} is already used on this node", split.right_id)));
    }
    let [left, right] = split_halves(desc, &split.split_key, split.right_id);
    for half in [&left, &right] {
        batch.put_cf(meta, descriptor_key(half.range_id), half.encode_to_vec());
    }
    let voters: Vec<u64> = right.replicas.iter().map(|r| r.raft_id).collect();
    log.create_split_group(right.range_id, &voters, batch).map_err(|e| fatal(&e.to_string()))?;
    batch.put_cf(meta, applied_key(right.range_id), encode_applied(SPLIT_LOG_START, SPLIT_LOG_START));
    Ok(SplitApplied { index, left, right })
}

/// Adds a freeze of `range_id` to `batch` (see RaftFreeze): its descriptor frozen at `index`.
/// Refused, alike on every replica, if the range is frozen already, not at the expected
/// generation, or changing its membership (the merge needs its replicas where they are).
fn freeze_range(
    db: &DB,
    range_id: u64,
    index: u64,
    freeze: &RaftFreeze,
    run: &AppliedRun,
    batch: &mut WriteBatch,
) -> Result<FreezeApplied, Failure> {
    let refused = |reason: String| Failure::Refused(ReplicaError::MergeRefused { range_id, reason });
    let desc = current_descriptor(db, range_id, run)?;
    if desc.is_frozen_for_merge() {
        return Err(refused(format!("it is frozen to be merged already (at index {})", desc.merge_freeze_index)));
    }
    if freeze.expected_generation != desc.generation {
        return Err(refused(format!(
            "it is at generation {}, the freeze expected {}",
            desc.generation, freeze.expected_generation
        )));
    }
    if desc.replicas.iter().any(|r| r.membership() != ReplicaMembership::Voter) {
        return Err(refused("a membership change is under way (a learner, or a joint membership)".into()));
    }
    let desc = RangeDescriptor {
        state: RangeState::Frozen as i32,
        merge_freeze_index: index,
        merge_left_id: freeze.left_id,
        merge_left_generation: freeze.left_generation,
        ..desc
    };
    let meta = db.cf_handle(CF_META).ok_or_else(|| Failure::Fatal("the meta column family is missing".into()))?;
    batch.put_cf(meta, descriptor_key(range_id), desc.encode_to_vec());
    Ok(FreezeApplied { desc })
}

/// Adds a fence against the merge of a frozen right neighbour to `batch` (see RaftMergeFence):
/// the range's generation bumped (every merge of that freeze expects the generation the freeze
/// recorded) and the fence recorded. Refused, alike on every replica, unless the range is at the
/// generation expected: then something ordered before the fence changed it, perhaps the merge
/// itself. A fence already in force is applied again as it is, so asking again is answered alike.
fn fence_merge(
    db: &DB,
    range_id: u64,
    fence: &RaftMergeFence,
    run: &AppliedRun,
    batch: &mut WriteBatch,
) -> Result<RangeDescriptor, Failure> {
    let refused = |reason: String| Failure::Refused(ReplicaError::MergeRefused { range_id, reason });
    let desc = current_descriptor(db, range_id, run)?;
    let fenced = (desc.merge_fenced_range_id, desc.merge_fenced_freeze_index) == (fence.right_id, fence.freeze_index);
    if fenced && fence.right_id != 0 {
        return Ok(desc);
    }
    if desc.is_frozen_for_merge() {
        return Err(refused("it is frozen to be merged itself".into()));
    }
    if desc.generation != fence.expected_generation {
        return Err(refused(format!(
            "it is at generation {}, not {} as when range {} was frozen: a merge or a split was applied first",
            desc.generation, fence.expected_generation, fence.right_id
        )));
    }
    let desc = RangeDescriptor {
        generation: desc.generation + 1,
        merge_fenced_range_id: fence.right_id,
        merge_fenced_freeze_index: fence.freeze_index,
        ..desc
    };
    let meta = db.cf_handle(CF_META).ok_or_else(|| Failure::Fatal("the meta column family is missing".into()))?;
    batch.put_cf(meta, descriptor_key(range_id), desc.encode_to_vec());
    Ok(desc)
}

/// Adds the thaw of a frozen range to `batch` (see RaftThaw): active again, at generation + 1,
/// its freeze forgotten. Refused, alike on every replica, unless it is frozen at the index asked.
fn thaw_range(
    db: &DB,
    range_id: u64,
    thaw: &RaftThaw,
    run: &AppliedRun,
    batch: &mut WriteBatch,
) -> Result<RangeDescriptor, Failure> {
    let refused = |reason: String| Failure::Refused(ReplicaError::MergeRefused { range_id, reason });
    let desc = current_descriptor(db, range_id, run)?;
    if !desc.is_frozen_for_merge() || desc.merge_freeze_index != thaw.freeze_index {
        return Err(refused(format!(
            "it is not frozen at index {} (state {:?}, frozen at index {})",
            thaw.freeze_index,
            desc.state(),
            desc.merge_freeze_index
        )));
    }
    let desc = RangeDescriptor {
        state: RangeState::Active as i32,
        generation: desc.generation + 1,
        merge_freeze_index: 0,
        merge_left_id: 0,
        merge_left_generation: 0,
        ..desc
    };
    let meta = db.cf_handle(CF_META).ok_or_else(|| Failure::Fatal("the meta column family is missing".into()))?;
    batch.put_cf(meta, descriptor_key(range_id), desc.encode_to_vec());
    Ok(desc)
}

/// The node ids of `desc`'s replicas, sorted.
fn replica_nodes(desc: &RangeDescriptor) -> Vec<u64> {
    let mut nodes: Vec<u64> = desc.replicas.iter().map(|r| r.raft_id).collect();
    nodes.sort_unstable();
    nodes
}

/// Adds a merge of the frozen right neighbour into `range_id` to `batch` (see RaftMerge).
/// Refused, alike on every replica (the decision reads only what the logs made), unless the
/// range is at the expected generation and membership version, all voters, on the same nodes
/// as the right range, which it adjoins and which is frozen. Then this node's replica of the
/// right range must hold its data as of the freeze: if it has not applied its log that far, it
/// does so now from its own copy of the log (which has those entries: the merge is proposed only
/// once every replica has them). A node without them stops rather than serve keys it lacks.
#[allow(clippy::too_many_arguments)]
fn merge_range(
    db: &DB,
    log: &LogStore,
    range_id: u64,
    self_raft_id: u64,
    index: u64,
    merge: &RaftMerge,
    run: &mut AppliedRun,
    batch: &mut WriteBatch,
) -> Result<MergeApplied, Failure> {
    let refused = |reason: String| Failure::Refused(ReplicaError::MergeRefused { range_id, reason });
    let left = current_descriptor(db, range_id, run)?;
    let Some(right) = merge.right.clone() else { return Err(refused("the merge names no right range".into())) };
    let right_id = right.range_id;
    if left.is_frozen_for_merge() {
        return Err(refused("it is frozen to be merged itself".into()));
    }
    if (left.generation, left.conf_version) != (merge.expected_generation, merge.expected_conf_version) {
        return Err(refused(format!(
            "it is at generation {} and membership version {}, the merge expected {} and {}",
            left.generation, left.conf_version, merge.expected_generation, merge.expected_conf_version
        )));
    }
    if !right.is_frozen_for_merge() || right_id == range_id {
        return Err(refused(format!("range {right_id} is not frozen to be merged")));
    }
    // Refused for good by a fence (whatever the descriptor carried: one an earlier version
    // stored records no left neighbour).
    if (left.merge_fenced_range_id, left.merge_fenced_freeze_index) == (right_id, right.merge_freeze_index) {
        return Err(refused(format!(
            "the merge of range {right_id} frozen at index {} was refused for good (its freeze is undone)",
            right.merge_freeze_index
        )));
    }
    // A freeze that recorded its left neighbour is merged only into that range at that
    // generation: a fence (or any split or merge) since bumped it, and a thaw may follow.
    if right.merge_left_id != 0 && (right.merge_left_id, right.merge_left_generation) != (range_id, left.generation) {
        return Err(refused(format!(
            "range {right_id} was frozen to be merged into range {} at generation {}; this is range {range_id} at \
             generation {} (the merge was refused for good, or the range changed since)",
            right.merge_left_id, right.merge_left_generation, left.generation
        )));
    }
    if left.end_key != right.start_key || left.end_key.is_empty() {
        return Err(refused(format!("range {right_id} {} does not start where it ends", right.span())));
    }
    if left.replicas.iter().chain(&right.replicas).any(|r| r.membership() != ReplicaMembership::Voter) {
        return Err(refused("a membership change is under way (a learner, or a joint membership)".into()));
    }
    if replica_nodes(&left) != replica_nodes(&right) {
        return Err(refused(format!("range {right_id}'s replicas are on other nodes")));
    }
    let fatal =
        |what: String| Failure::Fatal(format!("range {range_id}'s merge of range {right_id} at index {index}: {what}"));
    let frozen_at = right.merge_freeze_index;
    let (splits, merges) = catch_up_frozen(db, log, right_id, self_raft_id, frozen_at).map_err(&fatal)?;
    run.caught_up_splits.extend(splits);
    run.caught_up_merges.extend(merges);
    let mine = stored_descriptor(db, right_id).map_err(&fatal)?;
    if !mine.is_frozen_for_merge() || mine.merge_freeze_index != frozen_at {
        return Err(fatal(format!(
            "this node's replica of range {right_id} is {:?} (frozen at index {}), not frozen at index {frozen_at}",
            mine.state(),
            mine.merge_freeze_index
        )));
    }
    let merged = RangeDescriptor {
        end_key: right.end_key.clone(),
        generation: left.generation.max(right.generation) + 1,
        ..left
    };
    let tombstone = RangeDescriptor {
        state: RangeState::Retired as i32,
        generation: right.generation + 1,
        replicas: merged.replicas.clone(),
        successors: vec![range_id],
        ..right
    };
    let meta = db.cf_handle(CF_META).ok_or_else(|| fatal("the meta column family is missing".into()))?;
    batch.put_cf(meta, descriptor_key(range_id), merged.encode_to_vec());
    stage_subsumed(db, log, &tombstone, batch).map_err(fatal)?;
    Ok(MergeApplied { index, left: merged, right: tombstone })
}

/// Adds to `batch` the end of this node's replica of a range whose keys another range took (a
/// merge): its descriptor retired (`tombstone`), its applied index and Raft log deleted. Unlike
/// a removal, its data stays: it is the other range's now.
pub fn stage_subsumed(
    db: &DB,
    log: &LogStore,
    tombstone: &RangeDescriptor,
    batch: &mut WriteBatch,
) -> Result<(), String> {
    let meta = db.cf_handle(CF_META).ok_or("the meta column family is missing")?;
    let range_id = tombstone.range_id;
    batch.put_cf(meta, descriptor_key(range_id), tombstone.encode_to_vec());
    batch.delete_cf(meta, applied_key(range_id));
    log.delete_group(range_id, batch).map_err(|e| e.to_string())
}

/// Applies `range_id`'s log on this node up to `frozen_at` (its freeze) from the entries this
/// node holds, if it has not yet; returns the splits that made (their groups are to start) and
/// the merges (their right ranges' groups are to stop).
/// Membership changes among them are not applied to a Raft group: the range's group ends with
/// the merge.
fn catch_up_frozen(
    db: &DB,
    log: &LogStore,
    range_id: u64,
    self_raft_id: u64,
    frozen_at: u64,
) -> Result<(Vec<SplitApplied>, Vec<MergeApplied>), String> {
    let applied = applied_index(db, range_id)?;
    if applied >= frozen_at {
        return Ok((Vec::new(), Vec::new()));
    }
    let desc = stored_descriptor(db, range_id)?;
    if !desc.is_owned_state() {
        return Err(format!("this node's replica of range {range_id} is {:?}", desc.state()));
    }
    let entries = log
        .read_entries(range_id, applied + 1, frozen_at)
        .map_err(|e| format!("this node lacks range {range_id}'s log up to its freeze: {e}"))?;
    tracing::info!(range_id, from = applied + 1, to = frozen_at, "applying a merged range's log up to its freeze");
    let mut span = Span::of(&desc);
    let mut membership_unchanged = |_: &ConfChangeV2, _: u64, _: &mut WriteBatch| -> Result<ConfState, Failure> {
        Err(Failure::Refused(ReplicaError::MembershipRefused {
            range_id,
            reason: "applied while merging the range away".into(),
        }))
    };
    let run = apply_entries(db, log, range_id, self_raft_id, &mut span, &entries, &mut membership_unchanged)?;
    let mut splits = run.splits;
    splits.extend(run.caught_up_splits);
    let mut merges = run.caught_up_merges;
    merges.extend(run.merges);
    Ok((splits, merges))
}

/// The two halves of `desc` split at `split_key`: the left keeps the range's id, the right is
/// range `right_id`; both at generation + 1, on the same replicas.
pub fn split_halves(desc: RangeDescriptor, split_key: &bytes::Bytes, right_id: u64) -> [RangeDescriptor; 2] {
    let generation = desc.generation + 1;
    let right = RangeDescriptor { range_id: right_id, start_key: split_key.clone(), generation, ..desc.clone() };
    let left = RangeDescriptor { end_key: split_key.clone(), generation, ..desc };
    [left, right]
}

/// The descriptor of `range_id` as persisted on this node.
pub fn stored_descriptor(db: &DB, range_id: u64) -> Result<RangeDescriptor, String> {
    let meta = db.cf_handle(CF_META).ok_or("the meta column family is missing")?;
    let key = descriptor_key(range_id);
    let bytes = db
        .get_cf(meta, &key)
        .map_err(|e| format!("reading range {range_id}'s descriptor: {e}"))?
        .ok_or_else(|| format!("range {range_id} has no descriptor on this node"))?;
    crate::ranges::decode_descriptor(&key, &bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kvfleet_proto::v1::{RangeState, Replica};

    fn entry(index: u64, data: Vec<u8>) -> Entry {
        Entry { index, term: 2, data: data.into(), ..Default::default() }
    }

    fn put(key: &str, value: &str) -> Vec<u8> {
        let mutation =
            Mutation { op: MutationOp::Put as i32, key: Bytes::from(key.to_string()), value: value.to_string().into() };
        encode_command(vec![mutation])
    }

    fn split(key: &str, right_id: u64, expected_generation: u64) -> Vec<u8> {
        encode_split(RaftSplit { expected_generation, split_key: Bytes::from(key.to_string()), right_id })
    }

    #[tokio::test]
    async fn a_split_is_applied_with_its_entry_and_writes_ordered_after_it_to_keys_it_moved_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::Storage::open_for_tests(dir.path());
        let db = storage.db();
        let log = LogStore::with_db(db.clone()).unwrap();
        let replica = |raft_id| Replica { node_id: format!("n{raft_id}"), raft_id, ..Default::default() };
        let desc = RangeDescriptor {
            range_id: 1,
            generation: 1,
            state: RangeState::Active as i32,
            replicas: vec![replica(11), replica(12), replica(13)],
            ..Default::default()
        };
        let meta = db.cf_handle(CF_META).unwrap();
        db.put_cf(meta, descriptor_key(1), desc.encode_to_vec()).unwrap();

        let entries = [
            entry(1, put("a", "1")),
            entry(2, split("m", 7, 1)),
            entry(3, put("z", "proposed before the split, ordered after it")),
            entry(4, put("b", "3")),
            entry(5, split("f", 8, 1)),
        ];
        let mut span = Span::default();
        let mut no_changes = |_: &ConfChangeV2, _: u64, _: &mut WriteBatch| -> Result<ConfState, Failure> {
            Err(Failure::Fatal("no membership change in this log".into()))
        };
        let run = apply_entries(&db, &log, 1, 11, &mut span, &entries, &mut no_changes).unwrap();
        let outcomes: Vec<_> = run.entries.iter().map(|applied| applied.outcome.clone()).collect();
        assert!(outcomes[0].is_ok() && outcomes[1].is_ok() && outcomes[3].is_ok());
        assert!(matches!(outcomes[2], Err(ReplicaError::OutsideRange { range_id: 1 })), "{:?}", outcomes[2]);
        assert!(
            matches!(&outcomes[4], Err(ReplicaError::SplitRefused { reason, .. }) if reason.contains("generation 2"))
        );
        assert_eq!((span.start.as_slice(), span.end.as_slice()), (&b""[..], &b"m"[..]));

        let [done] = run.splits.as_slice() else { panic!("one split: {:?}", run.splits) };
        assert_eq!((done.index, done.left.generation, done.right.generation), (2, 2, 2));
        assert_eq!(
            (done.left.end_key.as_ref(), done.right.start_key.as_ref(), done.right.range_id),
            (&b"m"[..], &b"m"[..], 7)
        );
        assert_eq!(stored_descriptor(&db, 1).unwrap(), done.left);
        assert_eq!(stored_descriptor(&db, 7).unwrap(), done.right);
        assert_eq!(done.right.replicas, desc.replicas, "the new range has the same replicas");
        let data = db.cf_handle(CF_DATA).unwrap();
        assert_eq!(db.get_cf(data, "a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(db.get_cf(data, "b").unwrap().as_deref(), Some(&b"3"[..]));
        assert_eq!(db.get_cf(data, "z").unwrap(), None, "a refused write was applied");
        assert_eq!((applied_index(&db, 1).unwrap(), applied_index(&db, 7).unwrap()), (5, SPLIT_LOG_START));
        let right_log = log.open_group(7).unwrap().expect("the new range's log");
        assert_eq!(right_log.first_log_index(), SPLIT_LOG_START + 1);

        // A replica that already knows the new id (reused by hand) stops rather than overwrite.
        let reused = [entry(6, split("f", 7, 2))];
        let error =
            apply_entries(&db, &log, 1, 11, &mut span, &reused, &mut no_changes).err().expect("a reused id is fatal");
        assert!(error.contains("already used"), "{error}");
        assert_eq!(stored_descriptor(&db, 7).unwrap(), done.right, "the other range's descriptor is untouched");
        // The write pipeline's threads hold the DB too: stop them before the process exits.
        drop((log, db));
        storage.shutdown().unwrap();
    }

    fn freeze(expected_generation: u64) -> Vec<u8> {
        encode_freeze(RaftFreeze { expected_generation, ..Default::default() })
    }

    fn outcomes(run: &AppliedRun) -> Vec<Result<(), ReplicaError>> {
        run.entries.iter().map(|applied| applied.outcome.clone()).collect()
    }

    fn refused_for(outcome: &Result<(), ReplicaError>, words: &str) -> bool {
        matches!(outcome, Err(ReplicaError::MergeRefused { reason, .. }) if reason.contains(words))
    }

    #[tokio::test]
    async fn whichever_of_a_merge_and_a_fence_the_left_log_orders_first_wins_and_a_fenced_freeze_is_thawed() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::Storage::open_for_tests(dir.path());
        let db = storage.db();
        let log = LogStore::with_db(db.clone()).unwrap();
        let replica = |raft_id| Replica { node_id: format!("n{raft_id}"), raft_id, ..Default::default() };
        let range = |range_id, span: (&'static str, &'static str)| RangeDescriptor {
            range_id,
            start_key: Bytes::from(span.0),
            end_key: Bytes::from(span.1),
            generation: 2,
            state: RangeState::Active as i32,
            replicas: [11, 12, 13].into_iter().map(replica).collect(),
            ..Default::default()
        };
        // Two pairs: 1 | 2 (the fence comes first) and 5 | 6 (the merge comes first).
        let meta = db.cf_handle(CF_META).unwrap();
        for desc in [range(1, ("", "f")), range(2, ("f", "m")), range(5, ("m", "t")), range(6, ("t", ""))] {
            db.put_cf(meta, descriptor_key(desc.range_id), desc.encode_to_vec()).unwrap();
            log.create_group(desc.range_id, &[11, 12, 13]).unwrap();
        }
        let no_changes = |_: &ConfChangeV2, _: u64, _: &mut WriteBatch| -> Result<ConfState, Failure> {
            Err(Failure::Fatal("no membership change in this log".into()))
        };
        let freeze_into = |left_id| encode_freeze(RaftFreeze { expected_generation: 2, left_id, left_generation: 2 });
        let fence = |right_id, expected_generation| {
            encode_merge_fence(RaftMergeFence { right_id, freeze_index: 2, expected_generation })
        };
        let merge = |expected_generation, right: &RangeDescriptor| {
            encode_merge(RaftMerge { expected_generation, expected_conf_version: 0, right: Some(right.clone()) })
        };
        let apply = |range_id, entries: &[Entry]| {
            let mut span = Span::of(&stored_descriptor(&db, range_id).unwrap());
            apply_entries(&db, &log, range_id, 11, &mut span, entries, &mut no_changes.clone()).unwrap()
        };

        // Both right ranges freeze at index 2, recording their left neighbour at generation 2.
        for (left_id, right_id) in [(1, 2), (5, 6)] {
            apply(
                right_id,
                &[entry(1, put(if right_id == 2 { "g" } else { "u" }, "1")), entry(2, freeze_into(left_id))],
            );
            let frozen = stored_descriptor(&db, right_id).unwrap();
            assert_eq!(
                (frozen.merge_freeze_index, frozen.merge_left_id, frozen.merge_left_generation),
                (2, left_id, 2)
            );
        }
        let frozen_2 = stored_descriptor(&db, 2).unwrap();
        let frozen_6 = stored_descriptor(&db, 6).unwrap();

        // The fence first: it bumps the generation, so no merge of that freeze applies after it,
        // whatever generation the merge expects; asking again is answered alike.
        let run = apply(
            1,
            &[
                entry(1, fence(2, 2)),
                entry(2, fence(2, 2)),
                entry(3, merge(3, &frozen_2)),
                entry(4, merge(2, &frozen_2)),
                // As an earlier version stored the freeze: no left neighbour recorded.
                entry(5, merge(3, &RangeDescriptor { merge_left_id: 0, merge_left_generation: 0, ..frozen_2.clone() })),
            ],
        );
        let done = outcomes(&run);
        assert!(done[0].is_ok() && done[1].is_ok(), "{done:?}");
        assert!(refused_for(&done[2], "refused for good"), "{:?}", done[2]);
        assert!(refused_for(&done[3], "generation 3"), "{:?}", done[3]);
        assert!(refused_for(&done[4], "refused for good"), "{:?}", done[4]);
        let fenced = stored_descriptor(&db, 1).unwrap();
        assert_eq!((fenced.generation, fenced.end_key.as_ref()), (3, &b"f"[..]));
        assert_eq!((fenced.merge_fenced_range_id, fenced.merge_fenced_freeze_index), (2, 2));
        // Then the thaw: range 2 takes writes again, at a new generation; a second thaw is refused.
        let run = apply(
            2,
            &[
                entry(3, put("h", "refused: frozen")),
                entry(4, encode_thaw(RaftThaw { freeze_index: 2 })),
                entry(5, put("h", "2")),
                entry(6, encode_thaw(RaftThaw { freeze_index: 2 })),
            ],
        );
        let done = outcomes(&run);
        assert!(matches!(done[0], Err(ReplicaError::Merging { range_id: 2 })), "{:?}", done[0]);
        assert!(done[1].is_ok() && done[2].is_ok(), "{done:?}");
        assert!(refused_for(&done[3], "not frozen"), "{:?}", done[3]);
        let thawed = stored_descriptor(&db, 2).unwrap();
        assert_eq!(
            (thawed.state(), thawed.generation, thawed.merge_freeze_index, thawed.merge_left_id),
            (RangeState::Active, 3, 0, 0)
        );
        assert_eq!(run.thaws, vec![thawed]);
        let data = db.cf_handle(CF_DATA).unwrap();
        assert_eq!(db.get_cf(data, "h").unwrap().as_deref(), Some(&b"2"[..]));

        // The merge first: the fence that follows is refused (the merge changed the generation),
        // and the merged range keeps the right range's keys.
        let run = apply(5, &[entry(1, merge(2, &frozen_6)), entry(2, fence(6, 2))]);
        let done = outcomes(&run);
        assert!(done[0].is_ok(), "{:?}", done[0]);
        assert!(refused_for(&done[1], "a merge or a split was applied first"), "{:?}", done[1]);
        let merged = stored_descriptor(&db, 5).unwrap();
        assert_eq!((merged.end_key.as_ref(), merged.merge_fenced_range_id), (&b""[..], 0));
        assert_eq!(stored_descriptor(&db, 6).unwrap().state(), RangeState::Retired);
        drop((log, db));
        storage.shutdown().unwrap();
    }

    #[tokio::test]
    async fn a_frozen_range_applies_no_write_split_or_second_freeze_and_a_merge_takes_it_catching_up_from_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::Storage::open_for_tests(dir.path());
        let db = storage.db();
        let log = LogStore::with_db(db.clone()).unwrap();
        let replica = |raft_id| Replica { node_id: format!("n{raft_id}"), raft_id, ..Default::default() };
        let range = |range_id, span: (&'static str, &'static str), raft_ids: &[u64]| RangeDescriptor {
            range_id,
            start_key: Bytes::from(span.0),
            end_key: Bytes::from(span.1),
            generation: 2,
            state: RangeState::Active as i32,
            replicas: raft_ids.iter().map(|&id| replica(id)).collect(),
            ..Default::default()
        };
        let (left, right) = (range(1, ("", "m"), &[11, 12, 13]), range(2, ("m", ""), &[13, 12, 11]));
        let meta = db.cf_handle(CF_META).unwrap();
        for desc in [&left, &right] {
            db.put_cf(meta, descriptor_key(desc.range_id), desc.encode_to_vec()).unwrap();
        }
        let mut no_changes = |_: &ConfChangeV2, _: u64, _: &mut WriteBatch| -> Result<ConfState, Failure> {
            Err(Failure::Fatal("no membership change in this log".into()))
        };

        // The right range's log as this replica holds it: writes, the freeze at index 3, then a
        // write, a split and a second freeze ordered after it.
        let right_log = [
            entry(1, put("n", "1")),
            entry(2, put("q", "2")),
            entry(3, freeze(2)),
            entry(4, put("r", "after the freeze")),
            entry(5, split("t", 9, 2)),
            entry(6, freeze(2)),
        ];
        log.create_group(2, &[11, 12, 13]).unwrap();
        let persist = kvfleet_replication::groups::Persist {
            group: 2,
            entries: &right_log,
            stale: 0..0,
            hard_state: None,
            term_or_vote_changed: false,
            conf_state: ConfState::default(),
            snapshot: None,
        };
        log.write(&[persist]).unwrap();
        // This replica applied only the first entry: the merge applies the rest up to the freeze.
        let mut right_span = Span::of(&right);
        apply_entries(&db, &log, 2, 11, &mut right_span, &right_log[..1], &mut no_changes).unwrap();

        // What the right range's leader applied (on another node): the freeze refuses the rest.
        let other = tempfile::tempdir().unwrap();
        let other_storage = crate::storage::Storage::open_for_tests(other.path());
        let other_db = other_storage.db();
        let other_log = LogStore::with_db(other_db.clone()).unwrap();
        other_db.put_cf(other_db.cf_handle(CF_META).unwrap(), descriptor_key(2), right.encode_to_vec()).unwrap();
        let mut leader_span = Span::of(&right);
        let run = apply_entries(&other_db, &other_log, 2, 12, &mut leader_span, &right_log, &mut no_changes).unwrap();
        let outcomes: Vec<_> = run.entries.iter().map(|applied| applied.outcome.clone()).collect();
        assert!(outcomes[..3].iter().all(Result::is_ok), "{outcomes:?}");
        assert!(matches!(outcomes[3], Err(ReplicaError::Merging { range_id: 2 })), "{:?}", outcomes[3]);
        assert!(matches!(&outcomes[4], Err(ReplicaError::SplitRefused { reason, .. }) if reason.contains("frozen")));
        assert!(matches!(&outcomes[5], Err(ReplicaError::MergeRefused { reason, .. }) if reason.contains("already")));
        let frozen = stored_descriptor(&other_db, 2).unwrap();
        assert!(frozen.is_frozen_for_merge() && frozen.merge_freeze_index == 3);
        assert!(leader_span.frozen);

        // The left range's log: merges refused alike on every replica (wrong generation, right
        // range on other nodes), then the merge.
        let merge = |expected_generation, right: &RangeDescriptor| {
            encode_merge(RaftMerge { expected_generation, expected_conf_version: 0, right: Some(right.clone()) })
        };
        let elsewhere = RangeDescriptor { replicas: vec![replica(11), replica(12), replica(14)], ..frozen.clone() };
        let left_log = [
            entry(1, put("a", "1")),
            entry(2, merge(1, &frozen)),
            entry(3, merge(2, &elsewhere)),
            entry(4, merge(2, &frozen)),
        ];
        let mut left_span = Span::of(&left);
        let run = apply_entries(&db, &log, 1, 11, &mut left_span, &left_log, &mut no_changes).unwrap();
        let outcomes: Vec<_> = run.entries.iter().map(|applied| applied.outcome.clone()).collect();
        assert!(
            matches!(&outcomes[1], Err(ReplicaError::MergeRefused { reason, .. }) if reason.contains("generation 2"))
        );
        assert!(
            matches!(&outcomes[2], Err(ReplicaError::MergeRefused { reason, .. }) if reason.contains("other nodes"))
        );
        assert!(outcomes[3].is_ok(), "{:?}", outcomes[3]);
        let [done] = run.merges.as_slice() else { panic!("one merge: {:?}", run.merges) };
        assert_eq!(
            (done.left.start_key.as_ref(), done.left.end_key.as_ref(), done.left.generation),
            (&b""[..], &b""[..], 3)
        );
        assert_eq!(stored_descriptor(&db, 1).unwrap(), done.left);
        let tombstone = stored_descriptor(&db, 2).unwrap();
        assert_eq!((tombstone.state(), tombstone.successors.clone()), (RangeState::Retired, vec![1]));
        assert!(log.open_group(2).unwrap().is_none(), "the merged range's log is deleted");
        assert!(left_span.end.is_empty() && !left_span.frozen);
        let data = db.cf_handle(CF_DATA).unwrap();
        for (key, value) in [("a", Some("1")), ("n", Some("1")), ("q", Some("2")), ("r", None)] {
            let found = db.get_cf(data, key).unwrap();
            assert_eq!(found.as_deref(), value.map(str::as_bytes), "key {key}: applied up to the freeze only");
        }
        drop((log, db, other_log, other_db));
        storage.shutdown().unwrap();
        other_storage.shutdown().unwrap();
    }
}
