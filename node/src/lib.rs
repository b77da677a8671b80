//! kvfleet-node: a storage node serving key ranges from RocksDB over gRPC.
//!
//! Where things live: `ranges` (key -> range on this node, split rules), `node` (serving keys
//! from owned ranges, splits, load reports), `storage` (RocksDB and the group-commit write
//! pipeline behind the durability modes), `load` (per-range load accounting), `service` (the gRPC
//! APIs), `server` (wiring and shutdown), `metrics`, `config`, `error`.

pub mod config;
pub mod error;
pub mod failpoint;
pub mod load;
pub mod metrics;
pub mod node;
pub mod ranges;
pub mod server;
pub mod service;
pub mod storage;
