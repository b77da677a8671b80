//! kvfleet's replication: every range a Raft group, built on tikv/raft-rs.
//!
//! Where things live: `groups` (the Raft groups of one node, driven together: one tick for all,
//! messages stepped into their group, every group's Ready gathered into one batch so that a
//! node writes and fsyncs its log once per batch, and idle groups quiesced so that they cost no
//! ticks and no heartbeats), `log_store` (every group's log in one RocksDB column family, one
//! fsynced write per batch), `logger` (raft-rs's slog records into tracing), `local` (several
//! nodes in one process, for tests and benchmarks).
//!
//! The node (`kvfleet-node`'s `replica` module) owns the transport between nodes, the state
//! machine, the snapshots' data and what a membership change means for a range. Not here yet
//! (issue 13): stale reads.

pub mod groups;
pub mod log_store;
pub mod logger;

pub use groups::{
    Envelope, GroupId, Groups, GroupsConfig, GroupsError, NodeId, ReadyBatch, SnapshotToInstall, decode_conf_change,
    decode_message, encode_message,
};
pub use log_store::{CF_RAFT, GroupStorage, LogError, LogStore, PendingSnapshot, SPLIT_LOG_START, SnapshotSlot};
pub use raft::eraftpb::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message,
    MessageType, Snapshot, SnapshotMetadata,
};
pub mod local;
