//! kvfleet's wire protocol: the generated gRPC code, plus the helpers every side shares for
//! ranges (which keys a descriptor covers), typed error details, and printing keys.

pub mod admin_auth;
pub mod bundle;
pub mod errors;
pub mod failpoint;
pub mod keys;
pub mod metrics_http;

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("kvfleet.v1");
}

#[allow(clippy::all, clippy::pedantic)]
pub mod google_rpc {
    tonic::include_proto!("google.rpc");
}

/// A wire-compatible subset of etcd's KV API, used only to benchmark etcd with the same harness.
#[allow(clippy::all, clippy::pedantic)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// The encoded descriptors of every kvfleet service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kvfleet_descriptor");

pub use keys::{RangeBounds, display_key};

/// The gRPC metadata key carrying the operator's leadership epoch on admin calls: a node refuses
/// changes from an epoch older than the highest it has seen.
pub const OPERATOR_EPOCH_HEADER: &str = "kvfleet-operator-epoch";

/// `kvfleet-node` prints this on stdout, followed by `node_id=<id> address=<host:port>`, once it
/// serves: the handshake for whatever starts nodes (the Local platform, tests, scripts).
pub const NODE_READY_PREFIX: &str = "kvfleet-node ready";

/// The address in a node's ready line, if `line` is one.
pub fn parse_node_ready_line(line: &str) -> Option<&str> {
    let rest = line.strip_prefix(NODE_READY_PREFIX)?;
    rest.split_whitespace().find_map(|field| field.strip_prefix("address="))
}
