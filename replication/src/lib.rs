//! kvfleet's replication: every range a Raft group, built on tikv/raft-rs.
//!
//! Where things live: `groups` (the Raft groups of one node, driven together: one tick for all,
//! messages stepped into their group, every group's Ready gathered into one batch so that a
//! node writes and fsyncs its log once per batch, and idle groups quiesced so that they cost no
//! ticks and no heartbeats), `logger` (raft-rs's slog records into tracing).
//!
//! Not here yet (issue 13): the log store on RocksDB, the transport between nodes, reads
//! (lease, ReadIndex, follower, stale), membership changes for moves, and the node's use of it.

pub mod groups;
pub mod logger;

pub use groups::{Envelope, GroupId, Groups, GroupsConfig, NodeId, ReadyBatch};
pub mod local;
