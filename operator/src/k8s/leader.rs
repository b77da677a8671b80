//! Leader election on a coordination.k8s.io Lease, so two operator replicas never drive the same
//! fleet: the holder renews every few seconds; another replica takes over only after the lease
//! expired, and writes with the resourceVersion it read (a race loses with 409 Conflict).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    pub duration: Duration,
    pub renew_every: Duration,
}

/// What to do with the lease as read (pure: the clock is an argument).
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseDecision {
    Create(LeaseSpec),
    /// Renew our own lease, or take over an expired one.
    Write(LeaseSpec),
    /// Someone else holds it until `until`.
    Wait {
        holder: String,
        until: Timestamp,
    },
}

pub fn decide(current: Option<&LeaseSpec>, config: &LeaseConfig, now: Timestamp) -> LeaseDecision {
    let ours = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(config.duration.as_secs() as i32),
        acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(spec) = current else { return LeaseDecision::Create(ours(0, None)) };
    let transitions = spec.lease_transitions.unwrap_or(0);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == config.identity {
        return LeaseDecision::Write(ours(transitions, spec.acquire_time.clone()));
    }
    let renewed = spec.renew_time.as_ref().map_or(Timestamp::UNIX_EPOCH, |t| t.0);
    let until = renewed + SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    if holder.is_empty() || until <= now {
        LeaseDecision::Write(ours(transitions + 1, None))
    } else {
        LeaseDecision::Wait { holder, until }
    }
}

/// One attempt: true when this replica holds the lease afterwards.
pub(crate) async fn try_hold(api: &Api<Lease>, config: &LeaseConfig) -> Result<bool, kube::Error> {
    let current = api.get_opt(&config.name).await?;
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    let outcome = match decide(spec, config, Timestamp::now()) {
        LeaseDecision::Wait { holder, until } => {
            tracing::debug!(%holder, %until, "another operator replica leads");
            return Ok(false);
        }
        LeaseDecision::Create(spec) => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(config.name.clone()), ..Default::default() },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        LeaseDecision::Write(spec) => {
            let mut lease = current.unwrap_or_default();
            lease.spec = Some(spec);
            // replace() sends the resourceVersion we read: a concurrent writer makes this fail.
            api.replace(&config.name, &PostParams::default(), &lease).await.map(|_| ())
        }
    };
    match outcome {
        Ok(()) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

/// Waits until this replica leads.
pub async fn acquire(client: Client, config: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut announced = false;
    loop {
        match try_hold(&api, config).await {
            Ok(true) => {
                tracing::info!(lease = %config.name, identity = %config.identity, "leading");
                return;
            }
            Ok(false) if !announced => {
                tracing::info!(lease = %config.name, "another replica leads; standing by");
                announced = true;
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "leader election: reading or writing the lease failed"),
        }
        tokio::time::sleep(config.renew_every).await;
    }
}

/// Renews until the lease is lost (another replica took it, or renewals failed for longer than
/// the lease lasts); then returns, and the caller must stop acting.
pub async fn hold(client: Client, config: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(config.renew_every).await;
        match try_hold(&api, config).await {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %config.name, "lost the lease to another replica");
                return;
            }
            Err(error) => tracing::warn!(%error, "renewing the lease failed"),
        }
        // Stop before the lease can expire under us: another replica may take it then.
        if last_renewed.elapsed() + config.renew_every >= config.duration {
            tracing::error!(lease = %config.name, "could not renew the lease in time");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(identity: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: "kvfleet-system".into(),
            name: "kvfleet-operator".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
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

    #[test]
    fn first_replica_creates_the_lease_and_renews_it() {
        let created = decide(None, &config("a"), at(100));
        assert!(matches!(created, LeaseDecision::Create(_)));
        let spec = spec_of(created);
        let renewed = spec_of(decide(Some(&spec), &config("a"), at(105)));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(105))));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(100))));
        assert_eq!(renewed.lease_transitions, Some(0));
    }

    #[test]
    fn a_second_replica_waits_until_the_lease_expires_then_takes_it() {
        let held = spec_of(decide(None, &config("a"), at(100)));
        assert_eq!(
            decide(Some(&held), &config("b"), at(114)),
            LeaseDecision::Wait { holder: "a".into(), until: at(115) }
        );
        let taken = spec_of(decide(Some(&held), &config("b"), at(115)));
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(115))));
    }
}
