//! The operator binary's errors: what `kvfleet-operator` prints before it exits non-zero.

use std::path::PathBuf;

use kvfleet_resharding::{LoopError, PlatformError};

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error(transparent)]
    Loop(#[from] LoopError),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("Kubernetes: {0}")]
    Kubernetes(String),
    #[error("status API: {0}")]
    Serve(#[from] tonic::transport::Error),
}
