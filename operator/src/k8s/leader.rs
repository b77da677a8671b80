//! Leader election on a coordination.k8s.io Lease, so two operator replicas never drive the same
//! fleet. Every decision is made on this process's monotonic clock, never by comparing another
//! host's `renewTime` with our wall clock:
//! - the holder renews every `retry_period`, each attempt bounded; it stops acting once
//!   `renew_deadline` passed since it *sent* its last successful renewal (`Leadership`);
//! - a standby takes over only after it has itself seen the same lease record, unchanged, for the
//!   lease's whole duration, and writes with the resourceVersion it read (a race loses with 409);
//! - each term has an epoch (`leaseTransitions + 1`) that every admin call carries, and nodes
//!   refuse changes from older epochs, so a deposed leader that wakes up is fenced off even before
//!   it notices.
//!
//! Since `renew_deadline < duration`, the holder has stopped before any standby can take over,
//! with `duration - renew_deadline` to spare for the two clocks' rates and for stopping.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use kvfleet_resharding::leadership::Leadership;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    /// How long a standby waits, after the lease last changed, before it takes over.
    pub duration: Duration,
    /// The holder stops acting when it has not renewed for this long (less than `duration`).
    pub renew_deadline: Duration,
    /// Between two attempts, renewing or standing by.
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        LeaseConfig {
            namespace,
            name,
            identity,
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// One read-and-write of the lease must answer within this (the API client has no read timeout).
    fn attempt_timeout(&self) -> Duration {
        self.renew_deadline / 2
    }
}

/// The parts of a lease record that change on every write by its holder.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: String,
    renewed: Option<Timestamp>,
    transitions: i32,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Self {
        Record {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            renewed: spec.renew_time.as_ref().map(|t| t.0),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// How long the lease record has looked the same to this process (its monotonic clock).
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(Record, Instant)>,
}

impl Observer {
    pub fn unchanged_for(&mut self, spec: Option<&LeaseSpec>, now: Instant) -> Duration {
        let Some(spec) = spec else {
            self.last = None;
            return Duration::ZERO;
        };
        let record = Record::of(spec);
        match &self.last {
            Some((seen, since)) if *seen == record => now.saturating_duration_since(*since),
            _ => {
                self.last = Some((record, now));
                Duration::ZERO
            }
        }
    }
}

/// The epoch of a term: its lease transitions, plus one so that every elected operator sends one.
pub fn epoch_of(spec: &LeaseSpec) -> u64 {
    u64::try_from(spec.lease_transitions.unwrap_or(0)).unwrap_or(0) + 1
}

/// What to do with the lease as read (pure: clocks and what nodes reported are arguments).
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseDecision {
    Create(LeaseSpec),
    /// Renew our own lease, or take over an expired or released one.
    Write(LeaseSpec),
    /// Someone else holds it; this replica has seen it unchanged for `seen_for` of `lasts`.
    Wait {
        holder: String,
        seen_for: Duration,
        lasts: Duration,
    },
}

/// `unchanged_for`: how long this replica has seen this exact record (`Observer`);
/// `highest_node_epoch`: the highest epoch any node reported, which a renewal must exceed (the
/// Lease was deleted and re-created, so its transitions restarted below what nodes remember).
pub fn decide(
    current: Option<&LeaseSpec>,
    config: &LeaseConfig,
    unchanged_for: Duration,
    wall_now: Timestamp,
    highest_node_epoch: u64,
) -> LeaseDecision {
    // Epoch = transitions + 1: above what nodes remember means transitions >= that epoch.
    let fenced_above = |transitions: i32| match i32::try_from(highest_node_epoch) {
        Ok(node_epoch) if i64::from(node_epoch) > i64::from(transitions) + 1 => node_epoch,
        Ok(_) => transitions,
        Err(_) => i32::MAX,
    };
    let ours = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(config.duration.as_secs() as i32),
        acquire_time: Some(acquired.unwrap_or(MicroTime(wall_now))),
        renew_time: Some(MicroTime(wall_now)),
        lease_transitions: Some(fenced_above(transitions)),
        ..Default::default()
    };
    let Some(spec) = current else { return LeaseDecision::Create(ours(0, None)) };
    let record = Record::of(spec);
    if record.holder == config.identity {
        return LeaseDecision::Write(ours(record.transitions, spec.acquire_time.clone()));
    }
    let lasts = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
    if record.holder.is_empty() || unchanged_for >= lasts {
        LeaseDecision::Write(ours(record.transitions.saturating_add(1), None))
    } else {
        LeaseDecision::Wait { holder: record.holder, seen_for: unchanged_for, lasts }
    }
}

/// One attempt; the epoch when this replica holds the lease afterwards.
pub(crate) async fn try_hold(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observer: &mut Observer,
    highest_node_epoch: u64,
) -> Result<Option<u64>, kube::Error> {
    let current = api.get_opt(&config.name).await?;
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    let unchanged_for = observer.unchanged_for(spec, Instant::now());
    let written = match decide(spec, config, unchanged_for, Timestamp::now(), highest_node_epoch) {
        LeaseDecision::Wait { holder, seen_for, lasts } => {
            tracing::debug!(%holder, ?seen_for, ?lasts, "another operator replica leads");
            return Ok(None);
        }
        LeaseDecision::Create(spec) => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(config.name.clone()), ..Default::default() },
                spec: Some(spec.clone()),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| spec)
        }
        LeaseDecision::Write(spec) => {
            let mut lease = current.unwrap_or_default();
            lease.spec = Some(spec.clone());
            // replace() sends the resourceVersion we read: a concurrent writer makes this fail.
            api.replace(&config.name, &PostParams::default(), &lease).await.map(|_| spec)
        }
    };
    match written {
        Ok(spec) => Ok(Some(epoch_of(&spec))),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
        Err(error) => Err(error),
    }
}

/// One bounded attempt; on success `leadership` is granted until `renew_deadline` after the
/// attempt was *sent* (the API server may have written it at any point after that).
async fn attempt(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observer: &mut Observer,
    leadership: &Leadership,
) -> Result<bool, String> {
    let sent = Instant::now();
    // A holder's attempt never outlasts its term: it steps down the moment the term ends.
    let bound = leadership.remaining().map_or(config.attempt_timeout(), |left| left.min(config.attempt_timeout()));
    let outcome = tokio::time::timeout(bound, try_hold(api, config, observer, leadership.highest_node_epoch())).await;
    match outcome {
        Ok(Ok(Some(epoch))) => {
            leadership.grant(epoch, sent + config.renew_deadline);
            Ok(true)
        }
        Ok(Ok(None)) => Ok(false),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {bound:?}")),
    }
}

/// Waits until this replica leads; `leadership` is granted on return.
pub async fn acquire(client: Client, config: &LeaseConfig, leadership: &Leadership) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observer = Observer::default();
    let mut announced = false;
    loop {
        match attempt(&api, config, &mut observer, leadership).await {
            Ok(true) => {
                let epoch = leadership.current().unwrap_or(0);
                tracing::info!(lease = %config.name, identity = %config.identity, epoch, "leading");
                return;
            }
            Ok(false) if !announced => {
                tracing::info!(lease = %config.name, "another replica leads; standing by");
                announced = true;
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "leader election: reading or writing the lease failed"),
        }
        tokio::time::sleep(config.retry_period).await;
    }
}

/// Renews until the lease is lost (another replica took it, or no renewal succeeded within
/// `renew_deadline`); then revokes `leadership` and returns, and the caller must stop acting.
pub async fn hold(client: Client, config: &LeaseConfig, leadership: &Leadership) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observer = Observer::default();
    loop {
        let pause = leadership.remaining().map_or(config.retry_period, |left| left.min(config.retry_period));
        tokio::time::sleep(pause).await;
        match attempt(&api, config, &mut observer, leadership).await {
            Ok(true) => {}
            Ok(false) => {
                leadership.revoke();
                tracing::error!(lease = %config.name, "lost the lease to another replica");
                return;
            }
            Err(error) => tracing::warn!(%error, "renewing the lease failed"),
        }
        if leadership.current().is_err() {
            leadership.revoke();
            tracing::error!(lease = %config.name, deadline = ?config.renew_deadline, "could not renew the lease in time");
            return;
        }
    }
}

/// On a clean shutdown: give the lease up at once (a standby takes over without waiting out the
/// lease). Only if we still hold it; the write is conditional on what we read.
pub async fn release(client: Client, config: &LeaseConfig, leadership: &Leadership) {
    leadership.revoke();
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let released = tokio::time::timeout(config.attempt_timeout(), async {
        let Some(mut lease) = api.get_opt(&config.name).await? else { return Ok(false) };
        let Some(spec) = lease.spec.as_mut() else { return Ok(false) };
        if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        api.replace(&config.name, &PostParams::default(), &lease).await.map(|_| true)
    })
    .await;
    match released {
        Ok(Ok(true)) => tracing::info!(lease = %config.name, "released the lease"),
        Ok(Ok(false)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "releasing the lease failed; a standby takes over when it expires"),
        Err(_) => tracing::warn!("releasing the lease timed out; a standby takes over when it expires"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(identity: &str) -> LeaseConfig {
        LeaseConfig::new("kvfleet-system".into(), "kvfleet-operator".into(), identity.into())
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    fn spec_of(decision: LeaseDecision) -> LeaseSpec {
        match decision {
            LeaseDecision::Create(spec) | LeaseDecision::Write(spec) => spec,
            LeaseDecision::Wait { holder, .. } => panic!("expected to take the lease, {holder} holds it"),
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn first_replica_creates_the_lease_and_renews_it() {
        let created = decide(None, &config("a"), Duration::ZERO, at(100), 0);
        assert!(matches!(created, LeaseDecision::Create(_)));
        let spec = spec_of(created);
        assert_eq!(epoch_of(&spec), 1);
        let renewed = spec_of(decide(Some(&spec), &config("a"), Duration::ZERO, at(105), 0));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(105))));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(100))));
        assert_eq!(epoch_of(&renewed), 1, "a renewal keeps the term's epoch");
    }

    #[test]
    fn a_standby_takes_over_only_after_seeing_the_lease_unchanged_for_its_duration() {
        let held = spec_of(decide(None, &config("a"), Duration::ZERO, at(100), 0));
        // The holder's renewTime is far in the past by the standby's wall clock (clock skew, or
        // the standby's clock jumped): it still waits out the whole lease on its own clock.
        let waiting = decide(Some(&held), &config("b"), 14 * SECOND, at(10_000), 0);
        assert_eq!(waiting, LeaseDecision::Wait { holder: "a".into(), seen_for: 14 * SECOND, lasts: 15 * SECOND });
        let taken = spec_of(decide(Some(&held), &config("b"), 15 * SECOND, at(10_001), 0));
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(epoch_of(&taken), 2, "a takeover starts a newer epoch");
        assert_eq!(taken.acquire_time, Some(MicroTime(at(10_001))));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let mut released = spec_of(decide(None, &config("a"), Duration::ZERO, at(100), 0));
        released.holder_identity = None;
        let taken = spec_of(decide(Some(&released), &config("b"), Duration::ZERO, at(101), 0));
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(epoch_of(&taken), 2);
    }

    #[test]
    fn a_renewal_claims_an_epoch_above_what_nodes_remember() {
        // The Lease was deleted and re-created: its transitions restart at 0, but nodes remember
        // epoch 5 and would refuse epoch 1.
        let fresh = spec_of(decide(None, &config("a"), Duration::ZERO, at(100), 0));
        let renewed = spec_of(decide(Some(&fresh), &config("a"), Duration::ZERO, at(102), 5));
        assert_eq!(epoch_of(&renewed), 6);
        let again = spec_of(decide(Some(&renewed), &config("a"), Duration::ZERO, at(104), 6));
        assert_eq!(epoch_of(&again), 6, "the nodes remembering our own epoch raises nothing");
    }

    #[test]
    fn the_observer_restarts_its_clock_whenever_the_record_changes() {
        let mut observer = Observer::default();
        let start = Instant::now();
        let held = spec_of(decide(None, &config("a"), Duration::ZERO, at(100), 0));
        assert_eq!(observer.unchanged_for(Some(&held), start), Duration::ZERO);
        assert_eq!(observer.unchanged_for(Some(&held), start + 8 * SECOND), 8 * SECOND);
        let renewed = spec_of(decide(Some(&held), &config("a"), Duration::ZERO, at(102), 0));
        assert_eq!(observer.unchanged_for(Some(&renewed), start + 9 * SECOND), Duration::ZERO);
        assert_eq!(observer.unchanged_for(Some(&renewed), start + 12 * SECOND), 3 * SECOND);
        assert_eq!(observer.unchanged_for(None, start + 13 * SECOND), Duration::ZERO);
    }
}
