//! Test fixtures: KeyValueClusters as the API server would return them.

use kube::api::ObjectMeta;
use serde_json::json;

use super::crd::{KeyValueCluster, KeyValueClusterSpec};

/// A cluster `name` in namespace `ns` with `replicas` pods and every other field defaulted.
pub fn cluster(name: &str, replicas: i32) -> KeyValueCluster {
    let spec: KeyValueClusterSpec =
        serde_json::from_value(json!({ "replicas": replicas })).expect("a minimal spec deserializes");
    let mut kvc = KeyValueCluster::new(name, spec);
    kvc.metadata = ObjectMeta {
        name: Some(name.into()),
        namespace: Some("ns".into()),
        uid: Some(format!("uid-{name}")),
        generation: Some(1),
        resource_version: Some("1".into()),
        ..Default::default()
    };
    kvc
}
