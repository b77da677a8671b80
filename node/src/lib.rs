//! kvfleet-node: a storage node serving key ranges from RocksDB over gRPC.
//!
//! Where things live: `ranges` (key -> range on this node, split rules), `node` (serving keys
//! from owned ranges, splits, load reports), `storage` (RocksDB and the group-commit write
//! pipeline behind the durability modes), `load` (per-range load accounting), `membership` and
//! `merges` (a range's membership changes, which move it, and merges, the node's side), `peers`
//! (channels to other nodes), `replica` (every range a Raft group: the groups, their transport
//! and state machine), `upgrade` (ranges of earlier versions), `service` (the gRPC APIs),
//! `unknown_method` (UNIMPLEMENTED with a message), `server` (wiring and shutdown), `metrics`,
//! `config`, `error`.

pub mod config;
pub mod error;
pub mod fencing;
pub mod load;
pub mod membership;
pub mod merges;
pub mod metrics;
pub mod node;
pub mod peers;
pub mod ranges;
pub mod replica;
pub mod server;
pub mod service;
pub mod storage;
pub mod unknown_method;
pub mod upgrade;
