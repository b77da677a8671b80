//! The state machine of a replicated range: the command one log entry carries (mutations applied
//! atomically) and how committed entries change the data, together with the index they reach.
//!
//! The data and the applied index (with its entry's term, which a snapshot of the data needs) go
//! in one RocksDB write, not fsynced: the Raft log is the durable copy. After a crash the data is
//! as of some applied index, never between two, and the group replays the log from there.

use kvfleet_proto::v1::{Mutation, RaftCommand, mutation::Op as MutationOp};
use kvfleet_replication::{Entry, EntryType};
use prost::Message as _;
use rocksdb::{DB, WriteBatch};

use super::ReplicaError;
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
    RaftCommand { mutations }.encode_to_vec()
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
}

/// Applies committed `entries` of `range_id` (in log order) in one write; returns each entry's
/// outcome. Entries without a command (a new leader's empty entry) only advance the index.
pub fn apply_entries(db: &DB, range_id: u64, entries: &[Entry]) -> Result<Vec<Applied>, String> {
    let (Some(data), Some(meta)) = (db.cf_handle(CF_DATA), db.cf_handle(CF_META)) else {
        return Err("a column family is missing".into());
    };
    let mut batch = WriteBatch::default();
    let mut outcomes = Vec::with_capacity(entries.len());
    for entry in entries {
        let mut outcome = Ok(());
        if entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty() {
            match RaftCommand::decode(entry.data.as_ref()) {
                Ok(command) => {
                    for mutation in &command.mutations {
                        match mutation.op() {
                            MutationOp::Put => batch.put_cf(data, &mutation.key, &mutation.value),
                            MutationOp::Delete => batch.delete_cf(data, &mutation.key),
                            MutationOp::Unspecified => {}
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(range_id, index = entry.index, %error, "a committed log entry does not decode; skipped");
                    outcome = Err(ReplicaError::BadCommand { range_id, reason: error.to_string() });
                }
            }
        }
        outcomes.push(Applied { index: entry.index, term: entry.term, outcome });
    }
    if let Some(last) = entries.last() {
        batch.put_cf(meta, applied_key(range_id), encode_applied(last.index, last.term));
    }
    db.write(batch).map_err(|e| format!("applying range {range_id}'s log: {e}"))?;
    Ok(outcomes)
}
