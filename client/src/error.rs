//! Errors the client returns, each saying what was tried and why it stopped.

use std::time::Duration;

use bytes::Bytes;
use kvfleet_proto::display_key;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("client configuration: {0}")]
    Config(String),
    #[error("no node answered (tried {})", tried.join(", "))]
    NoNodeReachable { tried: Vec<String> },
    #[error("gave up on key {} after {attempts} attempts in {elapsed:?}: {last_error}", display_key(key))]
    Deadline { key: Bytes, attempts: u32, elapsed: Duration, last_error: String },
    #[error("{}: {}", status_code_name(.0), .0.message())]
    Rejected(tonic::Status),
    #[error(
        "batch spans ranges: key {} is outside range {range_id} {range}, which holds the first key; a batch is atomic only within one range",
        display_key(key)
    )]
    BatchSpansRanges { key: Bytes, range_id: u64, range: String },
}

fn status_code_name(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

impl ClientError {
    /// The gRPC status behind a rejection, if that is what this is.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Rejected(status) => Some(status),
            _ => None,
        }
    }
}
