//! Whether this controller may act now, and the epoch its admin calls carry. The Kubernetes
//! operator holds it only while its leader Lease is valid by its own clock (`k8s/leader.rs`); the
//! playground's single controller holds it unconditionally, at epoch 0 (no fencing).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use kvfleet_proto::OPERATOR_EPOCH_HEADER;
use kvfleet_proto::admin_auth::AdminToken;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Term {
    /// No election: the only controller.
    Always,
    /// Elected at `epoch`, valid until `until` by this process's monotonic clock.
    Until { epoch: u64, until: Instant },
    /// Not (or no longer) the leader.
    Lapsed,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("this operator does not hold the leader lease (it lapsed or was never granted): it must not act")]
pub struct NotLeading;

#[derive(Debug, Clone)]
pub struct Leadership(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    term: parking_lot::Mutex<Term>,
    /// The highest operator epoch any node reported: above ours, the lease was reset (or we are
    /// deposed), and the next renewal must claim a higher epoch.
    highest_node_epoch: AtomicU64,
}

impl Default for Leadership {
    fn default() -> Self {
        Leadership::unconditional()
    }
}

impl Leadership {
    fn with(term: Term) -> Self {
        Leadership(Arc::new(Inner { term: parking_lot::Mutex::new(term), highest_node_epoch: AtomicU64::new(0) }))
    }

    /// The only controller of its fleet (the playground, tests): always acts, sends no epoch.
    pub fn unconditional() -> Self {
        Leadership::with(Term::Always)
    }

    /// An elected controller, not leading until `grant`.
    pub fn elected() -> Self {
        Leadership::with(Term::Lapsed)
    }

    /// Leading at `epoch` until `until` (a renewal extends it).
    pub fn grant(&self, epoch: u64, until: Instant) {
        *self.0.term.lock() = Term::Until { epoch, until };
    }

    pub fn revoke(&self) {
        *self.0.term.lock() = Term::Lapsed;
    }

    /// The epoch to send, if this controller may act now (0: no epoch).
    pub fn current(&self) -> Result<u64, NotLeading> {
        match *self.0.term.lock() {
            Term::Always => Ok(0),
            Term::Until { epoch, until } if Instant::now() < until => Ok(epoch),
            Term::Until { .. } | Term::Lapsed => Err(NotLeading),
        }
    }

    /// How long the current term has left (None: unconditional, or not leading).
    pub fn remaining(&self) -> Option<std::time::Duration> {
        match *self.0.term.lock() {
            Term::Until { until, .. } => Some(until.saturating_duration_since(Instant::now())),
            Term::Always | Term::Lapsed => None,
        }
    }

    pub fn saw_node_epoch(&self, epoch: u64) {
        self.0.highest_node_epoch.fetch_max(epoch, Ordering::Relaxed);
    }

    pub fn highest_node_epoch(&self) -> u64 {
        self.0.highest_node_epoch.load(Ordering::Relaxed)
    }
}

/// Stamps each admin call with the epoch and the cluster's admin token, and refuses to send it
/// at all once leadership lapsed: checked when the call is sent, so a task that was paused past
/// the lease sends nothing.
#[derive(Debug, Clone)]
pub struct EpochStamp {
    pub leadership: Leadership,
    pub token: AdminToken,
}

impl Interceptor for EpochStamp {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let epoch = self.leadership.current().map_err(|e| Status::failed_precondition(e.to_string()))?;
        if epoch > 0 {
            request.metadata_mut().insert(OPERATOR_EPOCH_HEADER, MetadataValue::from(epoch));
        }
        self.token.attach(&mut request);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_elected_controller_acts_only_within_its_term() {
        let leadership = Leadership::elected();
        assert_eq!(leadership.current(), Err(NotLeading));
        leadership.grant(3, Instant::now() + Duration::from_secs(10));
        assert_eq!(leadership.current(), Ok(3));
        leadership.grant(3, Instant::now() - Duration::from_millis(1));
        assert_eq!(leadership.current(), Err(NotLeading), "a term past its deadline is over");
        leadership.grant(4, Instant::now() + Duration::from_secs(10));
        leadership.revoke();
        assert_eq!(leadership.current(), Err(NotLeading));
        assert_eq!(Leadership::unconditional().current(), Ok(0));
    }

    #[test]
    fn the_stamp_carries_the_epoch_and_refuses_outside_the_term() {
        let leadership = Leadership::elected();
        let token = AdminToken::new("0123456789abcdef0123456789abcdef").unwrap();
        let mut stamp = EpochStamp { leadership: leadership.clone(), token };
        let refused = stamp.call(Request::new(())).expect_err("no term yet");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        leadership.grant(7, Instant::now() + Duration::from_secs(10));
        let sent = stamp.call(Request::new(())).expect("within the term");
        assert_eq!(sent.metadata().get(OPERATOR_EPOCH_HEADER).and_then(|v| v.to_str().ok()), Some("7"));
        assert!(sent.metadata().get("authorization").is_some(), "the admin token travels with the epoch");
        let mut playground = EpochStamp { leadership: Leadership::unconditional(), token: AdminToken::none() };
        let unstamped = playground.call(Request::new(())).expect("always");
        assert!(unstamped.metadata().get(OPERATOR_EPOCH_HEADER).is_none());
        assert!(unstamped.metadata().get("authorization").is_none());
    }
}
