//! Ranges written by versions before every range was a Raft group (the single copies of the
//! retired freeze-and-copy move protocol): adopted at start as Raft groups of this node alone,
//! in place; a node holding one in the middle of such a move refuses to start.

use kvfleet_proto::v1::{RangeDescriptor, RangeState, Replica, ReplicaMembership, ReplicaRole};
use kvfleet_replication::SPLIT_LOG_START;
use prost::Message;

use crate::error::NodeError;
use crate::node::Node;
use crate::ranges::descriptor_key;
use crate::replica::apply::{applied_key, encode_applied};
use crate::replica::raft_id_of;
use crate::storage::CF_META;

/// Whether `desc` is a range of an earlier version: one replica with no Raft id. Their
/// tombstones (retired) stay as they are: they only ever give routing hints.
fn is_legacy(desc: &RangeDescriptor) -> bool {
    !desc.is_raft_group() && desc.state() != RangeState::Retired
}

/// Refuses a range an earlier version left in the middle of a freeze-and-copy move: frozen on
/// its source or importing on its target. Which side holds the data acknowledged last depends
/// on how far the move got, which only that protocol could tell.
pub(crate) fn refuse_mid_move(desc: &RangeDescriptor) -> Result<(), NodeError> {
    if !is_legacy(desc) || desc.state() == RangeState::Active {
        return Ok(());
    }
    let side = if desc.state() == RangeState::Importing { "importing it" } else { "frozen, moving it away" };
    Err(NodeError::Invalid(format!(
        "range {} {} is in the middle of a move of the freeze-and-copy protocol of an earlier version ({side}); \
         this version moves ranges as Raft membership changes and cannot finish it. Run the earlier version until \
         its controller has finished or rolled back every move (kvctl status shows none in flight), then upgrade",
        desc.range_id,
        desc.span()
    )))
}

impl Node {
    /// Turns every active single copy of an earlier version into a Raft group of this node
    /// alone: its data stays where it is; its log starts empty at `SPLIT_LOG_START` (as a
    /// split's new range does), the data counts as applied there, and its descriptor names this
    /// node as the one voter, in one fsynced write per range.
    pub(crate) fn adopt_legacy_ranges(&self) -> Result<(), NodeError> {
        let legacy: Vec<RangeDescriptor> = self.owned_ranges_raw().into_iter().filter(is_legacy).collect();
        if legacy.is_empty() {
            return Ok(());
        }
        let log = self.log_store()?;
        let db = self.storage.db();
        let meta =
            db.cf_handle(CF_META).ok_or_else(|| NodeError::Corrupt("the meta column family is missing".into()))?;
        let node_id = self.config.node_id.clone();
        let raft_id = raft_id_of(&node_id);
        for desc in legacy {
            let (range_id, span) = (desc.range_id, desc.span());
            let replica = Replica {
                node_id: node_id.clone(),
                address: self.address.clone(),
                role: ReplicaRole::Follower as i32,
                raft_id,
                behind_entries: None,
                membership: ReplicaMembership::Voter as i32,
            };
            let group = RangeDescriptor { replicas: vec![replica], conf_version: 0, ..desc };
            let mut batch = rocksdb::WriteBatch::default();
            let stale_log = log.open_group(range_id).map_err(|e| NodeError::Corrupt(e.to_string()))?.is_some();
            if stale_log {
                log.delete_group(range_id, &mut batch).map_err(|e| NodeError::Corrupt(e.to_string()))?;
            }
            log.create_split_group(range_id, &[raft_id], &mut batch)
                .map_err(|e| NodeError::Corrupt(format!("creating range {range_id}'s Raft log: {e}")))?;
            batch.put_cf(meta, applied_key(range_id), encode_applied(SPLIT_LOG_START, SPLIT_LOG_START));
            batch.put_cf(meta, descriptor_key(range_id), group.encode_to_vec());
            let mut sync = rocksdb::WriteOptions::default();
            sync.set_sync(true);
            db.write_opt(batch, &sync)
                .map_err(|e| NodeError::Corrupt(format!("adopting range {range_id} as a Raft group: {e}")))?;
            self.table.write().replace_replicated(&group);
            tracing::info!(range_id, %span, "adopted a single copy of an earlier version as a Raft group of this node alone");
        }
        Ok(())
    }
}
