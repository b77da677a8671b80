//! The Kubernetes platform: a cluster's nodes are the pods of its StatefulSet (ordinals
//! 0..replicas, reached by their stable DNS names); those at or above spec.replicas drain, and so
//! does the pod a DrainFirst update is about to restart; the controller's state lives in a
//! ConfigMap owned by the KeyValueCluster.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::{Api, Client};

use super::build::{self, Names};
use super::crd::KeyValueCluster;
use kvfleet_resharding::leadership::Leadership;
use kvfleet_resharding::platform::{Member, Platform, PlatformError};
use kvfleet_resharding::state::ReshardingState;

const STATE_KEY: &str = "state.json";
/// A ConfigMap holds at most 1 MiB; the state is refused before the API server refuses it.
const MAX_STATE_BYTES: usize = 1000 * 1024;

pub struct KubernetesPlatform {
    client: Client,
    names: Names,
    leadership: Leadership,
    /// The cluster as `members()` last read it (every round): `save_state` takes the owner
    /// reference from it instead of reading the cluster a second time.
    last_read: parking_lot::Mutex<Option<KeyValueCluster>>,
    /// The state ConfigMap as this loop last read or wrote it.
    stored: parking_lot::Mutex<Stored>,
}

/// What this loop knows of the stored state: the next save is conditional on its
/// resourceVersion (a write by anyone else in between makes it fail with 409, and this loop
/// stops), and a state equal to what is stored is not written again.
#[derive(Debug, Default)]
struct Stored {
    /// None: no ConfigMap yet, the next save creates it (and fails if someone else did).
    resource_version: Option<String>,
    json: Option<String>,
}

impl KubernetesPlatform {
    pub fn new(client: Client, names: Names, leadership: Leadership) -> Self {
        KubernetesPlatform {
            client,
            names,
            leadership,
            last_read: parking_lot::Mutex::new(None),
            stored: Default::default(),
        }
    }

    /// The cluster now; `Gone` once it is deleted.
    async fn read_cluster(&self) -> Result<KeyValueCluster, PlatformError> {
        let clusters: Api<KeyValueCluster> = Api::namespaced(self.client.clone(), &self.names.namespace);
        let kvc = clusters.get_opt(&self.names.cluster).await.map_err(|e| self.api_error("reading", e))?;
        let kvc = kvc.ok_or_else(|| {
            PlatformError::Gone(format!("KeyValueCluster {}/{} was deleted", self.names.namespace, self.names.cluster))
        })?;
        *self.last_read.lock() = Some(kvc.clone());
        Ok(kvc)
    }

    fn api_error(&self, what: &str, error: kube::Error) -> PlatformError {
        PlatformError::Api(format!("{what} of {}/{}: {error}", self.names.namespace, self.names.cluster))
    }
}

/// Members of a fleet: pods 0..statefulset_replicas; those at or above spec.replicas drain, and
/// so does the pod the status names for a DrainFirst update.
pub fn members(kvc: &KeyValueCluster, names: &Names, statefulset_replicas: i32) -> Vec<Member> {
    let updating = kvc.status.as_ref().and_then(|s| s.rollout.as_ref()).and_then(|r| r.draining_pod.as_deref());
    (0..statefulset_replicas)
        .map(|ordinal| {
            let pod = names.pod(ordinal);
            Member {
                address: names.pod_address(&pod, kvc.spec.ports.grpc),
                admin_address: Some(names.pod_address(&pod, kvc.spec.ports.admin)),
                draining: ordinal >= kvc.spec.replicas || updating == Some(pod.as_str()),
                restarting: ordinal < kvc.spec.replicas && updating == Some(pod.as_str()),
                node_id: pod,
                restarts: 0,
            }
        })
        .collect()
}

impl Platform for KubernetesPlatform {
    async fn members(&self) -> Result<Vec<Member>, PlatformError> {
        let kvc = self.read_cluster().await?;
        let sets: Api<StatefulSet> = Api::namespaced(self.client.clone(), &self.names.namespace);
        let sts =
            sets.get_opt(&self.names.statefulset).await.map_err(|e| self.api_error("reading the StatefulSet", e))?;
        let running = sts.and_then(|s| s.spec.replicas).unwrap_or(0);
        Ok(members(&kvc, &self.names, running))
    }

    async fn load_state(&self) -> Result<Option<ReshardingState>, PlatformError> {
        let owner = self.read_cluster().await?;
        let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.names.namespace);
        let map = maps
            .get_opt(&self.names.controller_state)
            .await
            .map_err(|e| self.api_error("reading the controller state", e))?;
        let Some(mut map) = map else {
            *self.stored.lock() = Stored::default();
            return Ok(None);
        };
        let resource_version = map.metadata.resource_version.clone();
        let json = map.data.as_mut().and_then(|d| d.remove(STATE_KEY));
        let owner_uid = owner.metadata.uid.as_deref();
        let owned = map.metadata.owner_references.iter().flatten().any(|o| Some(o.uid.as_str()) == owner_uid);
        if !owned {
            // A cluster deleted and re-created under the same name, before the garbage collector
            // removed the old one's state: that state names ranges and moves of other nodes.
            tracing::warn!(
                configmap = %self.names.controller_state,
                "the controller state belongs to an earlier cluster of this name; starting afresh"
            );
            *self.stored.lock() = Stored { resource_version, json: None };
            return Ok(None);
        }
        *self.stored.lock() = Stored { resource_version, json: json.clone() };
        let Some(json) = json else { return Ok(None) };
        serde_json::from_str(&json).map(Some).map_err(|source| PlatformError::CorruptState {
            path: format!("ConfigMap {}/{}", self.names.namespace, self.names.controller_state),
            source,
        })
    }

    async fn save_state(&self, state: &ReshardingState) -> Result<(), PlatformError> {
        let json = serde_json::to_string(state).map_err(|e| PlatformError::Api(format!("encoding the state: {e}")))?;
        if json.len() > MAX_STATE_BYTES {
            return Err(PlatformError::Api(format!(
                "the controller state is {} bytes, above the {MAX_STATE_BYTES}-byte ConfigMap budget",
                json.len()
            )));
        }
        let resource_version = {
            let stored = self.stored.lock();
            if stored.json.as_deref() == Some(json.as_str()) {
                return Ok(());
            }
            stored.resource_version.clone()
        };
        self.leadership.current().map_err(|e| PlatformError::Superseded(e.to_string()))?;
        let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.names.namespace);
        let cached = self.last_read.lock().clone();
        let owner = match cached {
            Some(owner) => owner,
            None => self.read_cluster().await?,
        };
        let mut map =
            state_config_map(&owner, &self.names, json.clone()).map_err(|e| PlatformError::Api(e.to_string()))?;
        let written = match resource_version {
            None => maps.create(&PostParams::default(), &map).await,
            Some(version) => {
                map.metadata.resource_version = Some(version);
                maps.replace(&self.names.controller_state, &PostParams::default(), &map).await
            }
        };
        match written {
            Ok(map) => {
                *self.stored.lock() = Stored { resource_version: map.metadata.resource_version, json: Some(json) };
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Err(PlatformError::Superseded(format!(
                "the controller state ConfigMap {}/{} changed since this loop read it (another operator wrote \
                 it): {}",
                self.names.namespace, self.names.controller_state, status.message
            ))),
            Err(error) => Err(self.api_error("saving the controller state", error)),
        }
    }
}

/// The state ConfigMap, owned by the cluster (deleted with it).
pub fn state_config_map(owner: &KeyValueCluster, names: &Names, json: String) -> Result<ConfigMap, build::BuildError> {
    Ok(ConfigMap {
        metadata: build::metadata(owner, names, &names.controller_state)?,
        data: Some(BTreeMap::from([(STATE_KEY.to_string(), json)])),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::{KeyValueClusterStatus, RolloutStatus};
    use crate::k8s::fixtures::cluster;

    fn draining(members: &[Member]) -> Vec<&str> {
        members.iter().filter(|m| m.draining).map(|m| m.node_id.as_str()).collect()
    }

    #[test]
    fn pods_above_spec_replicas_drain() {
        let kvc = cluster("demo", 3);
        let names = Names::of(&kvc).unwrap();
        let members = members(&kvc, &names, 5);
        assert_eq!(members.len(), 5);
        assert_eq!(members[0].node_id, "demo-0");
        assert_eq!(members[4].address, "demo-4.demo-nodes.ns.svc:7700");
        assert_eq!(draining(&members), ["demo-3", "demo-4"]);
        assert!(super::members(&kvc, &names, 3).iter().all(|m| !m.draining));
    }

    #[test]
    fn the_pod_a_drain_first_update_restarts_next_drains() {
        let mut kvc = cluster("demo", 3);
        let names = Names::of(&kvc).unwrap();
        kvc.status = Some(KeyValueClusterStatus {
            rollout: Some(RolloutStatus { draining_pod: Some("demo-1".into()), outdated_pods: 2 }),
            ..Default::default()
        });
        assert_eq!(draining(&members(&kvc, &names, 3)), ["demo-1"]);
    }
}
