//! The node's error type and how each error becomes a gRPC status.

use kvfleet_proto::errors::{limit_status, not_owner_status};
use kvfleet_proto::v1::NotOwner;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{context}: {source}")]
    Storage { context: String, source: rocksdb::Error },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("stored metadata is corrupt: {0}")]
    Corrupt(String),
    #[error("write failed: {0}")]
    WriteFailed(String),
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("{limit} exceeded: {size} bytes, the limit is {max} bytes")]
    Limit { limit: &'static str, size: u64, max: u64 },
    #[error("not owner: {}", .0.reason)]
    NotOwner(Box<NotOwner>),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("unknown range {0}")]
    UnknownRange(u64),
    #[error("range {range_id} is at generation {actual}, the request expected {expected}")]
    GenerationMismatch { range_id: u64, expected: u64, actual: u64 },
    #[error("range {0} is frozen to be merged into its left neighbour; retry shortly (the merged range serves it)")]
    Frozen(u64),
    #[error("{0}")]
    Move(String),
    #[error("forwarding to {address} failed: {message}")]
    Forward { address: String, message: String },
    #[error(
        "fenced: this call comes from operator epoch {epoch}, but an operator at epoch {highest} has since \
         administered this node; only the current operator may change ranges (an operator that lost its \
         leader lease must stop)"
    )]
    Fenced { epoch: u64, highest: u64 },
    #[error("asking node {node} at {address} failed: {message}")]
    PeerUnreachable { node: String, address: String, message: String },
    /// A replicated range could not serve the request now (no leader, no quorum): retry.
    #[error("{0}")]
    Unavailable(String),
}

impl From<NodeError> for Status {
    fn from(error: NodeError) -> Self {
        match error {
            NodeError::Limit { limit, size, max } => limit_status(limit, size, max),
            NodeError::NotOwner(detail) => not_owner_status(*detail),
            NodeError::Invalid(_) => Status::invalid_argument(error.to_string()),
            NodeError::UnknownRange(_) => Status::not_found(error.to_string()),
            NodeError::GenerationMismatch { .. } => Status::failed_precondition(error.to_string()),
            NodeError::ShuttingDown
            | NodeError::Forward { .. }
            | NodeError::PeerUnreachable { .. }
            | NodeError::Frozen(_)
            | NodeError::Unavailable(_) => Status::unavailable(error.to_string()),
            NodeError::Move(_) | NodeError::Fenced { .. } => Status::failed_precondition(error.to_string()),
            NodeError::Storage { .. } | NodeError::Io { .. } | NodeError::Corrupt(_) | NodeError::WriteFailed(_) => {
                Status::internal(error.to_string())
            }
        }
    }
}
