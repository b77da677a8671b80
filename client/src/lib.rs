//! kvfleet's Rust client library: key -> range -> node.
//!
//! Where things live: `routing` (the cached range map: which range holds a key, which node
//! serves it), `client` (routing, retries with backoff under a deadline, scans stitched across
//! ranges), `bundler` (concurrent requests to one node share calls), `channels` (one lazily connected channel pool per address, also used by the
//! resharding loop and by nodes calling their peers), `error`. The command line (`kvctl`) and its
//! tables are other crates: a user of this library links none of their dependencies.

pub mod bundler;
pub mod channels;
pub mod client;
pub mod error;
pub mod routing;

pub use bundler::BundleConfig;
pub use channels::{ChannelConfig, ChannelPool};
pub use client::{Client, ClientConfig};
pub use error::ClientError;
