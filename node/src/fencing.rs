//! Operator fencing: the operator's admin calls carry its leadership epoch; a node persists the
//! highest epoch it has seen and refuses changes from an older one, so an operator that lost its
//! lease (stalled, partitioned, replaced) cannot split, merge or move anything once its successor
//! has spoken to the node.

use bytes::Bytes;
use kvfleet_proto::OPERATOR_EPOCH_HEADER;
use tonic::metadata::MetadataMap;

use crate::error::NodeError;
use crate::storage::{CF_META, Storage, WriteOp};

const EPOCH_KEY: &[u8] = b"operator_epoch";

/// What an admin call does, for the admin token and the fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// Cluster metadata (node info, range descriptors, load): open to anyone who may use the
    /// data API (clients route with it). An epoch counts only from a caller with the token.
    Open,
    /// Changes ranges or routing: refused from an epoch below the fence.
    Change,
}

/// The highest operator epoch this node has seen, persisted before any call that raised it runs.
pub struct Fence {
    highest: tokio::sync::Mutex<u64>,
    /// A copy of `highest` for reports, readable without waiting on a raise in progress.
    reported: std::sync::atomic::AtomicU64,
}

impl Fence {
    pub fn recover(storage: &Storage) -> Result<Self, NodeError> {
        let highest = match storage.meta_get(EPOCH_KEY)? {
            None => 0,
            Some(bytes) => {
                let bytes: [u8; 8] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| NodeError::Corrupt(format!("the operator epoch is {} bytes, not 8", bytes.len())))?;
                u64::from_be_bytes(bytes)
            }
        };
        Ok(Fence { highest: tokio::sync::Mutex::new(highest), reported: highest.into() })
    }

    pub fn highest(&self) -> u64 {
        self.reported.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Admits a call from `epoch` (0 when the call names none: kvctl, peers, the playground's
    /// controller). A higher epoch is persisted (fsynced) before the call proceeds.
    pub async fn admit(&self, storage: &Storage, epoch: u64, call: Call) -> Result<(), NodeError> {
        let mut highest = self.highest.lock().await;
        if epoch > *highest {
            let op = WriteOp::Put {
                cf: CF_META,
                key: Bytes::from_static(EPOCH_KEY),
                value: Bytes::copy_from_slice(&epoch.to_be_bytes()),
            };
            storage.write_durable(vec![op]).await?;
            tracing::info!(from = *highest, to = epoch, "a newer operator epoch: older operators are fenced off");
            *highest = epoch;
            self.reported.store(epoch, std::sync::atomic::Ordering::Relaxed);
        } else if epoch < *highest && call == Call::Change {
            return Err(NodeError::Fenced { epoch, highest: *highest });
        }
        Ok(())
    }
}

/// The epoch a request carries (0 when it carries none).
pub fn epoch_of(metadata: &MetadataMap) -> Result<u64, NodeError> {
    let Some(value) = metadata.get(OPERATOR_EPOCH_HEADER) else { return Ok(0) };
    value.to_str().ok().and_then(|text| text.parse().ok()).ok_or_else(|| {
        NodeError::Invalid(format!("the {OPERATOR_EPOCH_HEADER} header must be an unsigned integer, got {value:?}"))
    })
}
