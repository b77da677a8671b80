//! The `KeyValueCluster` custom resource (kvfleet.io/v1alpha1): spec with its validation rules
//! (CEL, enforced by the API server at `kubectl apply`), status, printer columns, defaults.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use kvfleet_planner::{Knob, Policy, Surface};
use serde::{Deserialize, Serialize};

/// The node image used when the spec names none; tagged with this operator's version.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/kvfleet/kvfleet-node:", env!("CARGO_PKG_VERSION"));
pub const MAX_REPLICAS: i32 = 256;

/// A fleet of kvfleet storage pods that reshards itself: the operator splits, moves and merges
/// key ranges between the pods by load and size.
// One `printcolumn(...)` per column is kube's syntax, not a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kvfleet.io",
    version = "v1alpha1",
    kind = "KeyValueCluster",
    namespaced,
    shortname = "kvc",
    category = "kvfleet",
    status = "KeyValueClusterStatus",
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Ranges", type_ = "integer", json_path = ".status.ranges"),
    printcolumn(name = "Moves", type_ = "integer", json_path = ".status.movesInFlight", priority = 1),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // The Services take the cluster's name (a DNS-1035 label), and a pod's controller-revision-hash
    // label (`<name>-<10 characters>`) must fit 63: at most 52.
    validation = Rule::new("self.metadata.name.size() <= 52 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS-1035 label of at most 52 characters: lower-case letters, digits and '-', starting with a letter and ending with a letter or digit (the Services and pods are named after it)")
)]
#[x_kube(validation = Rule::new("!has(self.updateStrategy) || !has(self.updateStrategy.type) || self.updateStrategy.type != 'DrainFirst' || self.replicas >= 2").message("spec.updateStrategy.type DrainFirst needs at least 2 replicas (a pod's ranges move to the others before it restarts); use Restart with 1 replica"))]
#[x_kube(validation = Rule::new("!has(self.replication) || !has(self.replication.factor) || self.replication.factor <= self.replicas").message("spec.replication.factor must be at most spec.replicas: each of a range's replicas is on a different pod"))]
#[serde(rename_all = "camelCase")]
pub struct KeyValueClusterSpec {
    /// Number of storage pods. Scaling in moves every range off the pods being removed before
    /// they go.
    #[x_kube(validation = Rule::new("self >= 1").message("spec.replicas must be at least 1"))]
    #[x_kube(validation = Rule::new("self <= 256").message("spec.replicas must be at most 256"))]
    pub replicas: i32,

    /// The kvfleet-node image. Default: ghcr.io/kvfleet/kvfleet-node:<operator version>.
    #[x_kube(validation = Rule::new("self.size() > 0 && !self.contains(' ')").message("spec.image must be an image reference such as ghcr.io/kvfleet/kvfleet-node:0.1.0, not empty and without spaces; omit it for the default image"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    #[serde(default)]
    pub image_pull_policy: PullPolicy,

    /// CPU and memory of each storage pod.
    #[x_kube(validation = Rule::new("!has(self.limits) || self.limits.all(k, isQuantity(self.limits[k]))").message("spec.resources.limits must be quantities such as 500m, 2 or 4Gi"))]
    #[x_kube(validation = Rule::new("!has(self.requests) || self.requests.all(k, isQuantity(self.requests[k]))").message("spec.resources.requests must be quantities such as 500m, 2 or 4Gi"))]
    #[x_kube(validation = Rule::new("!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits) || !isQuantity(self.requests[k]) || !isQuantity(self.limits[k]) || quantity(self.requests[k]).compareTo(quantity(self.limits[k])) <= 0)").message("spec.resources: a request must not exceed its limit (requests.cpu <= limits.cpu, requests.memory <= limits.memory)"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    #[serde(default)]
    pub storage: StorageSpec,

    /// What an OK for a write promises: `sync` (fsynced before the reply, the default) or
    /// `async` (in the OS page cache, fsynced every second: a power loss can lose the last second).
    #[serde(default)]
    pub durability: Durability,

    #[serde(default)]
    pub replication: ReplicationSpec,

    #[serde(default)]
    pub sharding: ShardingSpec,

    #[serde(default)]
    pub scheduling: SchedulingSpec,

    #[serde(default)]
    pub ports: PortsSpec,

    /// How pods pick up a changed spec (image, resources, durability, scheduling).
    #[serde(default)]
    pub update_strategy: UpdateStrategy,
}

/// How many copies of each range the cluster keeps.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationSpec {
    /// Replicas of each range, each on a different pod: 1, 3 or 5. A range of N replicas is a
    /// Raft group: a write is acknowledged once a majority has it, and it survives the loss of
    /// any minority of its pods. Default 3, or 1 with fewer than 3 pods. Applied when the
    /// cluster is created: an existing cluster keeps the replicas its ranges were made with.
    #[x_kube(validation = Rule::new("self == 1 || self == 3 || self == 5").message("spec.replication.factor must be 1, 3 or 5: a majority of an even count tolerates no more failures than one fewer"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<i32>,
    /// What OK means for a write to a replicated range: `majority` (the default: a majority of
    /// the range's replicas fsynced it; survives the loss of any minority of pods) or `fast`
    /// (the range's leader alone fsynced it, the others catch up in the background: a leader
    /// lost or cut off before it replicated loses the writes it acknowledged meanwhile; see the
    /// README). Single-copy ranges follow `spec.durability`.
    #[serde(default)]
    pub durability: ReplicationDurability,
}

/// What OK means for a write to a replicated range (see `ReplicationSpec::durability`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationDurability {
    #[default]
    Majority,
    Fast,
}

impl KeyValueClusterSpec {
    /// `spec.replication.factor`, or its default: 3, or 1 with fewer than 3 pods.
    pub fn replication_factor(&self) -> usize {
        match self.replication.factor {
            Some(factor) => factor.max(1) as usize,
            None if self.replicas >= 3 => 3,
            None => 1,
        }
    }
}

/// How a spec change reaches the pods: always one pod at a time.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub struct UpdateStrategy {
    /// `Restart` (the default): the StatefulSet restarts pods one at a time; a pod's ranges are
    /// unavailable while it restarts (seconds, plus WAL recovery; replicated ranges it leads
    /// until another replica is elected). `DrainFirst`: zero downtime; before a pod restarts, the
    /// operator moves its single-copy ranges to the other pods (one copy of that data per update;
    /// needs at least 2 pods) and hands the leaderships of its replicated ranges to their other
    /// replicas.
    #[serde(default, rename = "type")]
    pub type_: UpdateType,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum UpdateType {
    #[default]
    Restart,
    DrainFirst,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    #[default]
    Sync,
    Async,
}

/// What happens to a pod's volume when the pod goes away for good.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum VolumePolicy {
    /// Keep the PersistentVolumeClaim (delete it yourself).
    Retain,
    /// Delete the PersistentVolumeClaim with the pod.
    Delete,
}

/// Per-pod persistent storage (one PersistentVolumeClaim per pod).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(oldSelf.storageClassName) && !has(self.storageClassName) || has(oldSelf.storageClassName) && has(self.storageClassName) && self.storageClassName == oldSelf.storageClassName").message("spec.storage.storageClassName cannot be changed after creation"))]
pub struct StorageSpec {
    /// Volume size of each pod, a Kubernetes quantity (e.g. 10Gi). May grow (if the storage class
    /// allows expansion), never shrink.
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("spec.storage.size must be a positive quantity such as 10Gi"))]
    #[x_kube(validation = Rule::new("!isQuantity(self) || !isQuantity(oldSelf) || quantity(self).compareTo(quantity(oldSelf)) >= 0").message("spec.storage.size cannot shrink: a volume never gets smaller"))]
    #[serde(default = "default_size")]
    pub size: String,

    /// The StorageClass of the volumes; the cluster default when omitted. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// On scale-in (after the pod's ranges have moved away, so the volume is empty): Delete
    /// (the default) or Retain.
    #[serde(default = "volume_delete")]
    pub on_scale_in: VolumePolicy,

    /// When the KeyValueCluster is deleted: Retain (the default: the data outlives the
    /// resource) or Delete.
    #[serde(default = "volume_retain")]
    pub on_delete: VolumePolicy,
}

fn default_size() -> String {
    "10Gi".into()
}

fn volume_delete() -> VolumePolicy {
    VolumePolicy::Delete
}

fn volume_retain() -> VolumePolicy {
    VolumePolicy::Retain
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_size(),
            storage_class_name: None,
            on_scale_in: VolumePolicy::Delete,
            on_delete: VolumePolicy::Retain,
        }
    }
}

/// The resharding planner's thresholds. Every field is optional; the default is in its
/// description.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.mergeBelowQps) || self.mergeBelowQps < (has(self.splitQps) ? self.splitQps : 2000.0)").message("spec.sharding.mergeBelowQps must be below spec.sharding.splitQps (default 2000)"))]
#[x_kube(validation = Rule::new("!has(self.mergeBelowMiB) || self.mergeBelowMiB < (has(self.splitMiB) ? self.splitMiB : 256)").message("spec.sharding.mergeBelowMiB must be below spec.sharding.splitMiB (default 256)"))]
pub struct ShardingSpec {
    /// Split a range above this many operations per second, sustained. Default 2000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("spec.sharding.splitQps must be above 0"))]
    pub split_qps: Option<f64>,
    /// How long a range must stay above splitQps before it splits, in seconds. Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 604800").message("spec.sharding.splitSustainSeconds must be between 1 and 604800 (a week)"))]
    pub split_sustain_seconds: Option<i64>,
    /// Split a range larger than this many MiB. Default 256.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "splitMiB")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1048576").message("spec.sharding.splitMiB must be between 1 and 1048576 (1 TiB)"))]
    pub split_mib: Option<i64>,
    /// Neighbouring ranges each below this many operations per second... Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.0").message("spec.sharding.mergeBelowQps must not be negative"))]
    pub merge_below_qps: Option<f64>,
    /// ...and together below this many MiB merge. Default 64.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "mergeBelowMiB")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 1048576").message("spec.sharding.mergeBelowMiB must be between 0 and 1048576 (1 TiB)"))]
    pub merge_below_mib: Option<i64>,
    /// How long neighbours must stay cold (and how long after a split) before a merge, in
    /// seconds. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 604800").message("spec.sharding.mergeDelaySeconds must be between 0 and 604800 (a week)"))]
    pub merge_delay_seconds: Option<i64>,
    /// Moves running at once. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("spec.sharding.maxConcurrentMoves must be between 1 and 64"))]
    pub max_concurrent_moves: Option<i32>,
    /// Pods whose load is within this fraction above the mean count as balanced. Default 0.15.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("spec.sharding.balanceTolerance must be above 0"))]
    pub balance_tolerance: Option<f64>,
    /// A range that moved stays put at least this long, in seconds. Default 120.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 604800").message("spec.sharding.moveCooldownSeconds must be between 0 and 604800 (a week)"))]
    pub move_cooldown_seconds: Option<i64>,
}

impl ShardingSpec {
    /// The knobs this spec sets, in the policy's units.
    pub fn overrides(&self) -> Vec<(Knob, f64)> {
        [
            (Knob::SplitQps, self.split_qps),
            (Knob::SplitBytes, self.split_mib.map(|v| v as f64)),
            (Knob::SplitSustainSecs, self.split_sustain_seconds.map(|v| v as f64)),
            (Knob::MergeBelowQps, self.merge_below_qps),
            (Knob::MergeBelowBytes, self.merge_below_mib.map(|v| v as f64)),
            (Knob::MergeDelaySecs, self.merge_delay_seconds.map(|v| v as f64)),
            (Knob::MaxConcurrentMoves, self.max_concurrent_moves.map(f64::from)),
            (Knob::BalanceTolerance, self.balance_tolerance),
            (Knob::MoveCooldownSecs, self.move_cooldown_seconds.map(|v| v as f64)),
        ]
        .into_iter()
        .filter_map(|(knob, value)| Some((knob, knob.from_surface(Surface::Resource, value?))))
        .collect()
    }

    /// The planner policy: the production defaults with this spec's overrides. Values the schema
    /// lets through are in range; `Policy::validate` refuses the others (servers without CEL).
    pub fn policy(&self) -> Policy {
        Policy::default().with(self.overrides())
    }
}

/// Where the storage pods run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[x_kube(validation = Rule::new("self.all(t, !has(t.operator) || t.operator == 'Exists' || t.operator == 'Equal')").message("spec.scheduling.tolerations: operator must be Exists or Equal"))]
    #[x_kube(validation = Rule::new("self.all(t, !has(t.effect) || t.effect == '' || t.effect == 'NoSchedule' || t.effect == 'PreferNoSchedule' || t.effect == 'NoExecute')").message("spec.scheduling.tolerations: effect must be NoSchedule, PreferNoSchedule or NoExecute (or empty for all)"))]
    #[x_kube(validation = Rule::new("self.all(t, !has(t.operator) || t.operator != 'Exists' || !has(t.value) || t.value == '')").message("spec.scheduling.tolerations: a toleration with operator Exists must not have a value"))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Replaces the default affinity (which prefers one storage pod per Kubernetes node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// With no `affinity`: `preferred` (the default) spreads pods over Kubernetes nodes when it
    /// can, `required` refuses to put two on one node, `none` adds no rule.
    #[serde(default)]
    pub pod_anti_affinity: AntiAffinity,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AntiAffinity {
    #[default]
    Preferred,
    Required,
    None,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.grpc != self.metrics").message("spec.ports.grpc and spec.ports.metrics must differ"))]
#[x_kube(validation = Rule::new("!has(self.admin) || self.admin != self.grpc && self.admin != self.metrics").message("spec.ports.admin must differ from spec.ports.grpc and spec.ports.metrics"))]
pub struct PortsSpec {
    /// Data, range metadata and health (gRPC); what peers read during moves. Default 7700.
    #[serde(default = "grpc_port")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("spec.ports.grpc must be a port number (1-65535)"))]
    pub grpc: i32,
    /// Prometheus metrics (HTTP /metrics). Default 9090.
    #[serde(default = "metrics_port")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("spec.ports.metrics must be a port number (1-65535)"))]
    pub metrics: i32,
    /// Admin changes (splits, merges, moves, routing; gRPC), open to the operator alone by the
    /// cluster's NetworkPolicy. Default 7701.
    #[serde(default = "admin_port")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("spec.ports.admin must be a port number (1-65535)"))]
    pub admin: i32,
}

fn grpc_port() -> i32 {
    7700
}

fn admin_port() -> i32 {
    7701
}

fn metrics_port() -> i32 {
    9090
}

impl Default for PortsSpec {
    fn default() -> Self {
        PortsSpec { grpc: grpc_port(), metrics: metrics_port(), admin: admin_port() }
    }
}

/// What the operator sees, written after every reconcile.
// Written as a merge patch: lists and `rollout` are serialized even when empty (`[]`, `null`),
// so they replace what the last status said instead of leaving it behind.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyValueClusterStatus {
    /// Creating, Running, Scaling, Updating, Rebalancing, Degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods the StatefulSet runs now (above spec.replicas while scaling in).
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default)]
    pub ranges: u32,
    #[serde(default)]
    pub moves_in_flight: u32,
    /// Replicas of each range: the factor the cluster was created with.
    #[serde(default)]
    pub replication_factor: u32,
    /// Ranges with fewer than `replicationFactor` voting replicas on pods that answer and hold
    /// their copy.
    #[serde(default)]
    pub under_replicated_ranges: u32,
    /// One entry per storage pod, from the last resharding round.
    #[serde(default)]
    pub pods: Vec<PodStatus>,
    /// The hottest keys, from the last resharding round.
    #[serde(default)]
    pub hot_keys: Vec<HotKey>,
    /// Ready, Progressing, Rebalancing, Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// A DrainFirst update in progress: the resharding loop drains `drainingPod`.
    #[serde(default)]
    pub rollout: Option<RolloutStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The pod whose ranges are moving away before it restarts at the new revision.
    #[serde(default)]
    pub draining_pod: Option<String>,
    /// Pods not yet at the StatefulSet's update revision.
    pub outdated_pods: u32,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Phase {
    Creating,
    Running,
    Scaling,
    /// A DrainFirst update is moving ranges off a pod or restarting it.
    Updating,
    Rebalancing,
    Degraded,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub name: String,
    /// up, draining, or down: <why>.
    pub state: String,
    pub ranges: u32,
    pub ops_per_sec: f64,
    pub size_bytes: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HotKey {
    /// Printable form of the key (non-printable bytes escaped).
    pub key: String,
    pub range_id: u64,
    pub ops_per_sec: f64,
}

impl KeyValueClusterSpec {
    pub fn image(&self) -> &str {
        self.image.as_deref().unwrap_or(DEFAULT_IMAGE)
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;
    use serde_json::{Value, json};

    use super::*;

    fn schema() -> Value {
        let crd = KeyValueCluster::crd();
        let schema = crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref());
        serde_json::to_value(schema.expect("derived CRD has a schema")).expect("schema is JSON")
    }

    fn object(spec: Value) -> Value {
        json!({"apiVersion": "kvfleet.io/v1alpha1", "kind": "KeyValueCluster",
               "metadata": {"name": "demo", "namespace": "default"}, "spec": spec})
    }

    /// The messages the API server would answer `kubectl apply` with (empty: accepted).
    fn refusals(spec: Value, old_spec: Option<Value>) -> Vec<String> {
        let old = old_spec.map(object);
        match kube::core::cel::Validator::new().validate(&schema(), &object(spec), old.as_ref()) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.into_vec().into_iter().map(|e| e.message).collect(),
        }
    }

    #[test]
    fn a_minimal_spec_is_accepted_and_defaults_fill_the_rest() {
        assert_eq!(refusals(json!({"replicas": 3}), None), Vec::<String>::new());
        let kvc: KeyValueCluster = serde_json::from_value(object(json!({"replicas": 3}))).unwrap();
        assert_eq!(kvc.spec.storage.size, "10Gi");
        assert_eq!(kvc.spec.storage.on_delete, VolumePolicy::Retain);
        assert_eq!(kvc.spec.storage.on_scale_in, VolumePolicy::Delete);
        assert_eq!(kvc.spec.durability, Durability::Sync);
        assert_eq!(kvc.spec.ports, PortsSpec { grpc: 7700, metrics: 9090, admin: 7701 });
        assert_eq!(kvc.spec.image(), DEFAULT_IMAGE);
        assert_eq!(kvc.spec.sharding.policy(), Policy::default());
    }

    /// The planner's knobs define the sharding fields' defaults and bounds: the schema's
    /// descriptions, CEL rules and messages must say what `kvfleet_planner::Knob` says.
    #[test]
    fn sharding_fields_state_the_planners_defaults_and_bounds() {
        let schema = schema();
        let sharding = &schema["properties"]["spec"]["properties"]["sharding"];
        let fields = sharding["properties"].as_object().expect("sharding has properties");
        assert_eq!(fields.len(), Knob::ALL.len(), "{:?}", fields.keys().collect::<Vec<_>>());
        for knob in Knob::ALL {
            let field = &fields[knob.field()];
            let description = field["description"].as_str().unwrap_or_default();
            let default = knob.default_on(Surface::Resource);
            assert!(description.contains(&format!("Default {default}.")), "{}: {description}", knob.field());
            let rule = &field["x-kubernetes-validations"][0];
            let (expression, message) = (rule["rule"].as_str().unwrap_or_default(), rule["message"].as_str());
            let refused = kvfleet_planner::PolicyError::OutOfBounds { knob, value: -1.0 }.describe(Surface::Resource);
            let expected = refused.split(" (got ").next().unwrap_or_default();
            assert!(message.unwrap_or_default().starts_with(expected), "{}: {message:?} != {expected:?}", knob.field());
            let bounds = knob.bounds();
            let low = knob.to_surface(Surface::Resource, bounds.low);
            let operator = if bounds.above { ">" } else { ">=" };
            assert!(expression.starts_with(&format!("self {operator} {low}")), "{}: {expression}", knob.field());
            if let Some(high) = bounds.high.map(|high| knob.to_surface(Surface::Resource, high)) {
                assert!(expression.contains(&format!("self <= {high}")), "{}: {expression}", knob.field());
            }
        }
        let crossed = sharding["x-kubernetes-validations"].as_array().expect("cross-field rules");
        for (knob, other) in [(Knob::MergeBelowQps, Knob::SplitQps), (Knob::MergeBelowBytes, Knob::SplitBytes)] {
            let message = kvfleet_planner::PolicyError::NotBelow { knob, other }.describe(Surface::Resource);
            let rule = crossed.iter().find(|r| r["message"] == message.as_str());
            let rule = rule.unwrap_or_else(|| panic!("no rule says {message:?}: {crossed:?}"));
            let default = other.default_on(Surface::Resource);
            assert!(rule["rule"].as_str().unwrap_or_default().contains(&format!(": {default}")), "{rule}");
        }
    }

    #[test]
    fn bad_specs_are_refused_with_a_message_naming_the_field_and_the_limit() {
        let cases = [
            (json!({"replicas": 0}), "spec.replicas must be at least 1"),
            (json!({"replicas": 1000}), "spec.replicas must be at most 256"),
            (json!({"replicas": 3, "sharding": {"splitQps": -5.0}}), "spec.sharding.splitQps must be above 0"),
            (
                json!({"replicas": 3, "sharding": {"mergeBelowQps": -1.0}}),
                "spec.sharding.mergeBelowQps must not be negative",
            ),
            (
                json!({"replicas": 3, "sharding": {"splitQps": 100.0, "mergeBelowQps": 500.0}}),
                "spec.sharding.mergeBelowQps must be below spec.sharding.splitQps (default 2000)",
            ),
            (
                json!({"replicas": 3, "sharding": {"mergeBelowMiB": 300}}),
                "spec.sharding.mergeBelowMiB must be below spec.sharding.splitMiB (default 256)",
            ),
            (
                json!({"replicas": 3, "sharding": {"moveCooldownSeconds": -1}}),
                "spec.sharding.moveCooldownSeconds must be between 0 and 604800 (a week)",
            ),
            (
                json!({"replicas": 3, "sharding": {"maxConcurrentMoves": 0}}),
                "spec.sharding.maxConcurrentMoves must be between 1 and 64",
            ),
            (
                json!({"replicas": 3, "storage": {"size": "lots"}}),
                "spec.storage.size must be a positive quantity such as 10Gi",
            ),
            (json!({"replicas": 3, "ports": {"grpc": 9090}}), "spec.ports.grpc and spec.ports.metrics must differ"),
            (json!({"replicas": 3, "ports": {"grpc": 70000}}), "spec.ports.grpc must be a port number (1-65535)"),
            (
                json!({"replicas": 3, "image": ""}),
                "spec.image must be an image reference such as ghcr.io/kvfleet/kvfleet-node:0.1.0, not empty and without spaces; omit it for the default image",
            ),
            (
                json!({"replicas": 3, "resources": {"limits": {"memory": "lots"}}}),
                "spec.resources.limits must be quantities such as 500m, 2 or 4Gi",
            ),
            (
                json!({"replicas": 3, "resources": {"requests": {"cpu": "2x"}}}),
                "spec.resources.requests must be quantities such as 500m, 2 or 4Gi",
            ),
            (
                json!({"replicas": 3, "resources": {"requests": {"memory": "4Gi"}, "limits": {"memory": "2Gi"}}}),
                "spec.resources: a request must not exceed its limit (requests.cpu <= limits.cpu, requests.memory <= limits.memory)",
            ),
            (
                json!({"replicas": 3, "scheduling": {"tolerations": [{"key": "k", "operator": "Matches"}]}}),
                "spec.scheduling.tolerations: operator must be Exists or Equal",
            ),
            (
                json!({"replicas": 3, "scheduling": {"tolerations": [{"key": "k", "effect": "NoRun"}]}}),
                "spec.scheduling.tolerations: effect must be NoSchedule, PreferNoSchedule or NoExecute (or empty for all)",
            ),
            (
                json!({"replicas": 1, "updateStrategy": {"type": "DrainFirst"}}),
                "spec.updateStrategy.type DrainFirst needs at least 2 replicas (a pod's ranges move to the others before it restarts); use Restart with 1 replica",
            ),
            (
                json!({"replicas": 3, "sharding": {"splitMiB": 9_000_000_000_000_000i64}}),
                "spec.sharding.splitMiB must be between 1 and 1048576 (1 TiB)",
            ),
            (
                json!({"replicas": 4, "replication": {"factor": 2}}),
                "spec.replication.factor must be 1, 3 or 5: a majority of an even count tolerates no more failures than one fewer",
            ),
            (
                json!({"replicas": 3, "replication": {"factor": 5}}),
                "spec.replication.factor must be at most spec.replicas: each of a range's replicas is on a different pod",
            ),
        ];
        for (spec, message) in cases {
            assert_eq!(refusals(spec.clone(), None), vec![message.to_string()], "spec {spec}");
        }
    }

    #[test]
    fn the_name_must_fit_the_objects_named_after_it() {
        let named = |name: &str| {
            let mut object = object(json!({"replicas": 3}));
            object["metadata"]["name"] = json!(name);
            match kube::core::cel::Validator::new().validate(&schema(), &object, None) {
                Ok(()) => Vec::new(),
                Err(errors) => errors.into_vec().into_iter().map(|e| e.message).collect::<Vec<_>>(),
            }
        };
        assert!(named("orders-eu-1").is_empty());
        assert!(named(&"a".repeat(52)).is_empty());
        for bad in ["a".repeat(53), "Orders".into(), "1orders".into(), "orders.eu".into(), "orders-".into()] {
            let refused = named(&bad);
            assert_eq!(refused.len(), 1, "{bad}: {refused:?}");
            assert!(
                refused[0].starts_with("metadata.name must be a DNS-1035 label of at most 52"),
                "{bad}: {refused:?}"
            );
        }
        let fine = [json!({"replicas": 2, "updateStrategy": {"type": "DrainFirst"}}), json!({"replicas": 1})];
        for spec in fine {
            assert_eq!(refusals(spec.clone(), None), Vec::<String>::new(), "{spec}");
        }
        let requests_within_limits = json!({"replicas": 3, "resources": {
            "requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "1024Mi"}}});
        assert_eq!(refusals(requests_within_limits, None), Vec::<String>::new());
    }

    #[test]
    fn storage_may_grow_but_never_shrink_or_change_class() {
        let with = |size: &str, class: Option<&str>| {
            let mut storage = json!({"size": size});
            if let Some(class) = class {
                storage["storageClassName"] = json!(class);
            }
            json!({"replicas": 3, "storage": storage})
        };
        assert!(refusals(with("20Gi", Some("fast")), Some(with("10Gi", Some("fast")))).is_empty());
        assert_eq!(
            refusals(with("5Gi", None), Some(with("10Gi", None))),
            vec!["spec.storage.size cannot shrink: a volume never gets smaller".to_string()]
        );
        assert_eq!(
            refusals(with("10Gi", Some("slow")), Some(with("10Gi", Some("fast")))),
            vec!["spec.storage.storageClassName cannot be changed after creation".to_string()]
        );
        assert_eq!(
            refusals(with("10Gi", Some("slow")), Some(with("10Gi", None))),
            vec!["spec.storage.storageClassName cannot be changed after creation".to_string()]
        );
    }

    #[test]
    fn sharding_overrides_reach_the_planner_policy() {
        let spec = ShardingSpec {
            split_qps: Some(500.0),
            split_mib: Some(32),
            move_cooldown_seconds: Some(5),
            ..Default::default()
        };
        let policy = spec.policy();
        assert_eq!((policy.split_qps, policy.split_bytes, policy.move_cooldown_secs), (500.0, 32 << 20, 5));
        assert_eq!(policy.merge_delay_secs, Policy::default().merge_delay_secs);
    }
}
