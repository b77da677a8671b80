//! kvfleet's Rust client and the `kvctl` command line.
//!
//! Where things live: `routing` (key -> range -> node: the cached range map), `client` (routing,
//! retries, scans stitched across ranges), `error`, `cli` (kvctl's commands and tables), `bench`
//! (YCSB-style load against kvfleet, Redis or etcd), `controller_view` (the controller's status
//! as tables).

pub mod bench;
pub mod cli;
pub mod client;
pub mod controller_view;
pub mod error;
pub mod routing;

pub use client::{Client, ClientConfig};
pub use error::ClientError;
