//! KeyValueCluster -> the Kubernetes objects that run it: StatefulSet (one PVC per pod),
//! headless and client Services, PodDisruptionBudget, node ConfigMap. Pure functions: no client,
//! no clock; every choice about how a storage pod runs is made here.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EnvFromSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, Secret,
    SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec, VolumeMount, VolumeResourceRequirements,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use super::crd::{AntiAffinity, Durability, KeyValueCluster, ReplicationDurability, UpdateType, VolumePolicy};

pub const MANAGER: &str = "kvfleet-operator";
pub const DATA_DIR: &str = "/data";
/// The volume claim template: each pod's claim is `data-<pod>`.
pub const DATA_VOLUME: &str = "data";
/// The uid the node image runs as (see docker/node.Dockerfile).
pub const NODE_UID: i64 = 10001;
const CONFIG_HASH_ANNOTATION: &str = "kvfleet.io/config-hash";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the KeyValueCluster has no {0} (it was not read from the API server?)")]
    MissingMetadata(&'static str),
}

/// The names of everything a cluster owns, derived from its name in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub cluster: String,
    pub namespace: String,
    /// StatefulSet, client Service and PodDisruptionBudget.
    pub statefulset: String,
    /// The headless Service that gives each pod a DNS name.
    pub headless: String,
    pub node_config: String,
    /// Where the resharding controller keeps its state.
    pub controller_state: String,
    /// The Secret with the cluster's admin token (`admin_auth`).
    pub admin_token: String,
}

impl Names {
    pub fn of(kvc: &KeyValueCluster) -> Result<Self, BuildError> {
        let cluster = kvc.metadata.name.clone().ok_or(BuildError::MissingMetadata("name"))?;
        let namespace = kvc.metadata.namespace.clone().ok_or(BuildError::MissingMetadata("namespace"))?;
        Ok(Names {
            statefulset: cluster.clone(),
            headless: format!("{cluster}-nodes"),
            node_config: format!("{cluster}-node-config"),
            controller_state: format!("{cluster}-controller-state"),
            admin_token: format!("{cluster}-admin-token"),
            cluster,
            namespace,
        })
    }

    pub fn pod(&self, ordinal: i32) -> String {
        format!("{}-{ordinal}", self.statefulset)
    }

    /// The stable address of a pod's gRPC endpoint (via the headless Service).
    pub fn pod_address(&self, pod: &str, grpc_port: i32) -> String {
        format!("{pod}.{}.{}.svc:{grpc_port}", self.headless, self.namespace)
    }
}

/// Labels on every object of a cluster; the selector labels pick its storage pods.
pub fn selector_labels(names: &Names) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "kvfleet".to_string()),
        ("app.kubernetes.io/instance".to_string(), names.cluster.clone()),
        ("app.kubernetes.io/component".to_string(), "storage".to_string()),
    ])
}

pub fn labels(names: &Names) -> BTreeMap<String, String> {
    let mut labels = selector_labels(names);
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
    labels
}

/// `key=value,...` for list calls.
pub fn selector_string(names: &Names) -> String {
    selector_labels(names).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn owner_reference(kvc: &KeyValueCluster) -> Result<OwnerReference, BuildError> {
    kvc.controller_owner_ref(&()).ok_or(BuildError::MissingMetadata("uid"))
}

/// Name, namespace, labels and the owner reference every object of a cluster carries.
pub fn metadata(kvc: &KeyValueCluster, names: &Names, name: &str) -> Result<ObjectMeta, BuildError> {
    Ok(ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(names.namespace.clone()),
        labels: Some(labels(names)),
        owner_references: Some(vec![owner_reference(kvc)?]),
        ..Default::default()
    })
}

/// The node's configuration, passed as environment (the node reads KVFLEET_* variables).
pub fn node_config(kvc: &KeyValueCluster) -> Result<ConfigMap, BuildError> {
    let names = Names::of(kvc)?;
    let durability = match kvc.spec.durability {
        Durability::Sync => "sync",
        Durability::Async => "async",
    };
    let data = BTreeMap::from([
        ("KVFLEET_DATA_DIR".to_string(), DATA_DIR.to_string()),
        ("KVFLEET_LISTEN".to_string(), format!("0.0.0.0:{}", kvc.spec.ports.grpc)),
        ("KVFLEET_METRICS_LISTEN".to_string(), format!("0.0.0.0:{}", kvc.spec.ports.metrics)),
        ("KVFLEET_ADMIN_LISTEN".to_string(), format!("0.0.0.0:{}", kvc.spec.ports.admin)),
        ("KVFLEET_DURABILITY".to_string(), durability.to_string()),
        ("KVFLEET_LOG_FORMAT".to_string(), "json".to_string()),
    ]);
    let mut data = data;
    // Only when not the node's default: the configuration hash (and so every pod) stays as it
    // was for clusters that do not ask.
    if kvc.spec.replication.durability == ReplicationDurability::Fast {
        data.insert("KVFLEET_REPLICATION_DURABILITY".to_string(), "fast".to_string());
    }
    Ok(ConfigMap { metadata: metadata(kvc, &names, &names.node_config)?, data: Some(data), ..Default::default() })
}

/// Pods restart when their configuration changes: the template carries a hash of it. The hash
/// must stay the same across operator builds (std's `DefaultHasher` may change with any Rust
/// release, and every storage pod would then restart after an operator upgrade): FNV-1a (64
/// bits) over the entries in key order, each key and value followed by a 0 byte.
fn config_hash(config: &ConfigMap) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for (key, value) in config.data.iter().flatten() {
        for byte in key.bytes().chain([0]).chain(value.bytes()).chain([0]) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(PRIME);
        }
    }
    format!("{hash:016x}")
}

/// The StatefulSet at `replicas` pods (the reconciler decides the count: during a scale-in it
/// stays above spec.replicas until the pods going away are empty).
pub fn statefulset(kvc: &KeyValueCluster, replicas: i32) -> Result<StatefulSet, BuildError> {
    let names = Names::of(kvc)?;
    let spec = &kvc.spec;
    let config = node_config(kvc)?;
    // HTTP probes on the node's metrics port: /healthz (the process serves, its data recovered)
    // and /readyz (it takes traffic; cleared on SIGTERM). They work on every Kubernetes version,
    // unlike gRPC probes (1.24+).
    let http_probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Default::default()
    };
    let container = Container {
        name: "node".into(),
        image: Some(spec.image().to_string()),
        image_pull_policy: Some(format!("{:?}", spec.image_pull_policy)),
        env: Some(vec![
            field_env("KVFLEET_NODE_ID", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            EnvVar {
                name: "KVFLEET_ADVERTISE".into(),
                value: Some(format!("$(KVFLEET_NODE_ID).{}.$(POD_NAMESPACE).svc:{}", names.headless, spec.ports.grpc)),
                ..Default::default()
            },
            // Admin calls need this token (`admin_auth`). Optional: an operator run without an
            // admin key creates no Secret, and the nodes' admin API is then open.
            EnvVar {
                name: "KVFLEET_ADMIN_TOKEN".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: names.admin_token.clone(),
                        key: ADMIN_TOKEN_KEY.into(),
                        optional: Some(true),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource { name: names.node_config.clone(), optional: Some(false) }),
            ..Default::default()
        }]),
        ports: Some(vec![
            // The protocol is written out: it is a key of the port lists, and an API server's
            // server-side apply refuses an element without it (1.20: "omits key field").
            ContainerPort {
                name: Some("grpc".into()),
                container_port: spec.ports.grpc,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: spec.ports.metrics,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: spec.ports.admin,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        // RocksDB recovery of a large WAL can take a while: up to 5 minutes before liveness counts.
        startup_probe: Some(http_probe("/healthz", 5, 60)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        resources: spec.resources.clone(),
        volume_mounts: Some(vec![VolumeMount {
            name: DATA_VOLUME.into(),
            mount_path: DATA_DIR.into(),
            ..Default::default()
        }]),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(NODE_UID),
            run_as_group: Some(NODE_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let scheduling = &spec.scheduling;
    let pod = PodSpec {
        containers: vec![container],
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            fs_group: Some(NODE_UID),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..Default::default()
        }),
        // The node stops taking writes, fsyncs and exits within its 10 s shutdown grace.
        termination_grace_period_seconds: Some(30),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        node_selector: (!scheduling.node_selector.is_empty()).then(|| scheduling.node_selector.clone()),
        tolerations: (!scheduling.tolerations.is_empty()).then(|| scheduling.tolerations.clone()),
        topology_spread_constraints: (!scheduling.topology_spread_constraints.is_empty())
            .then(|| scheduling.topology_spread_constraints.clone()),
        affinity: scheduling.affinity.clone().or_else(|| default_affinity(&names, scheduling.pod_anti_affinity)),
        ..Default::default()
    };
    let volume_policy = |policy: VolumePolicy| format!("{policy:?}");
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.into()),
            labels: Some(selector_labels(&names)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), Quantity(spec.storage.size.clone()))])),
                limits: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(StatefulSet {
        metadata: metadata(kvc, &names, &names.statefulset)?,
        spec: StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(names.headless.clone()),
            selector: LabelSelector { match_labels: Some(selector_labels(&names)), match_expressions: None },
            // Pods are independent storage nodes: start and stop them together, not in order.
            pod_management_policy: Some("Parallel".into()),
            // DrainFirst: the StatefulSet controller leaves pods alone; the reconciler deletes
            // each outdated pod once its ranges have moved away (see `rollout`).
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some(
                    match spec.update_strategy.type_ {
                        UpdateType::Restart => "RollingUpdate",
                        UpdateType::DrainFirst => "OnDelete",
                    }
                    .into(),
                ),
                rolling_update: None,
            }),
            persistent_volume_claim_retention_policy: Some(StatefulSetPersistentVolumeClaimRetentionPolicy {
                when_scaled: Some(volume_policy(spec.storage.on_scale_in)),
                when_deleted: Some(volume_policy(spec.storage.on_delete)),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&names)),
                    annotations: Some(BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_string(), config_hash(&config))])),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: Some(vec![claim]),
            ..Default::default()
        },
        status: None,
    })
}

/// The key of the admin token in its Secret.
pub const ADMIN_TOKEN_KEY: &str = "token";

/// The Secret holding the cluster's admin token, owned by the cluster.
pub fn admin_token_secret(kvc: &KeyValueCluster, token: &str) -> Result<Secret, BuildError> {
    let names = Names::of(kvc)?;
    Ok(Secret {
        metadata: metadata(kvc, &names, &names.admin_token)?,
        data: Some(BTreeMap::from([(ADMIN_TOKEN_KEY.to_string(), k8s_openapi::ByteString(token.as_bytes().to_vec()))])),
        type_: Some("Opaque".into()),
        ..Default::default()
    })
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), api_version: None }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One storage pod per Kubernetes node: losing a node then loses one pod's ranges, not several.
fn default_affinity(names: &Names, rule: AntiAffinity) -> Option<Affinity> {
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector { match_labels: Some(selector_labels(names)), match_expressions: None }),
        topology_key: "kubernetes.io/hostname".into(),
        ..Default::default()
    };
    let anti = match rule {
        AntiAffinity::None => return None,
        AntiAffinity::Preferred => PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: term,
            }]),
            ..Default::default()
        },
        AntiAffinity::Required => PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..Default::default()
        },
    };
    Some(Affinity { pod_anti_affinity: Some(anti), ..Default::default() })
}

/// Gives each pod a DNS name (`<pod>.<cluster>-nodes.<ns>.svc`), which is the address nodes
/// advertise. Not-ready pods are published too: the controller must reach a starting pod.
pub fn headless_service(kvc: &KeyValueCluster) -> Result<Service, BuildError> {
    let names = Names::of(kvc)?;
    Ok(Service {
        metadata: metadata(kvc, &names, &names.headless)?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&names)),
            ports: Some(service_ports(kvc)),
            ..Default::default()
        }),
        status: None,
    })
}

/// The address clients use: any pod answers (it forwards or tells the client the owner).
pub fn client_service(kvc: &KeyValueCluster) -> Result<Service, BuildError> {
    let names = Names::of(kvc)?;
    Ok(Service {
        metadata: metadata(kvc, &names, &names.statefulset)?,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&names)),
            ports: Some(service_ports(kvc)),
            ..Default::default()
        }),
        status: None,
    })
}

fn service_ports(kvc: &KeyValueCluster) -> Vec<ServicePort> {
    let port = |name: &str, number: i32| ServicePort {
        name: Some(name.into()),
        port: number,
        target_port: Some(IntOrString::String(name.into())),
        // A key of the list, like the containers' ports' (see `statefulset`).
        protocol: Some("TCP".into()),
        app_protocol: (name == "grpc").then(|| "kubernetes.io/h2c".to_string()),
        ..Default::default()
    };
    vec![port("grpc", kvc.spec.ports.grpc), port("metrics", kvc.spec.ports.metrics)]
}

/// At most one storage pod down at a time by voluntary disruption (drains, upgrades): each range
/// has one copy, so a pod down is its ranges unavailable.
pub fn pod_disruption_budget(kvc: &KeyValueCluster) -> Result<PodDisruptionBudget, BuildError> {
    let names = Names::of(kvc)?;
    Ok(PodDisruptionBudget {
        metadata: metadata(kvc, &names, &names.statefulset)?,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(selector_labels(&names)), match_expressions: None }),
            ..Default::default()
        }),
        status: None,
    })
}

/// Everything `apply` writes for a cluster, in the order it writes them.
#[derive(serde::Serialize)]
pub struct Desired {
    pub node_config: ConfigMap,
    pub headless: Service,
    pub client: Service,
    pub pdb: PodDisruptionBudget,
    pub statefulset: StatefulSet,
}

pub fn desired(kvc: &KeyValueCluster, replicas: i32) -> Result<Desired, BuildError> {
    Ok(Desired {
        node_config: node_config(kvc)?,
        headless: headless_service(kvc)?,
        client: client_service(kvc)?,
        pdb: pod_disruption_budget(kvc)?,
        statefulset: statefulset(kvc, replicas)?,
    })
}

/// The pods of the operator that may administer a cluster's nodes (the chart's labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorPods {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

impl OperatorPods {
    pub fn of_chart(namespace: &str) -> Self {
        OperatorPods {
            namespace: namespace.to_string(),
            labels: BTreeMap::from([("app.kubernetes.io/name".to_string(), "kvfleet-operator".to_string())]),
        }
    }
}

/// The cluster's NetworkPolicy: its data and metrics ports open (clients, peers, Prometheus), its
/// admin port to the operator's pods only. Namespaces are matched by their
/// `kubernetes.io/metadata.name` label (set by Kubernetes 1.21+). Enforced only by a network
/// plugin that implements NetworkPolicies.
pub fn network_policy(kvc: &KeyValueCluster, operator: &OperatorPods) -> Result<NetworkPolicy, BuildError> {
    let names = Names::of(kvc)?;
    let port = |number: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(number)),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let labels = |map: BTreeMap<String, String>| LabelSelector { match_labels: Some(map), ..Default::default() };
    let operator_pods = NetworkPolicyPeer {
        namespace_selector: Some(labels(BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            operator.namespace.clone(),
        )]))),
        pod_selector: Some(labels(operator.labels.clone())),
        ..Default::default()
    };
    Ok(NetworkPolicy {
        metadata: metadata(kvc, &names, &names.statefulset)?,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(labels(selector_labels(&names))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    ports: Some(vec![port(kvc.spec.ports.grpc), port(kvc.spec.ports.metrics)]),
                    from: None,
                },
                NetworkPolicyIngressRule {
                    ports: Some(vec![port(kvc.spec.ports.admin)]),
                    from: Some(vec![operator_pods]),
                },
            ]),
            egress: None,
        }),
    })
}

/// The ordinal of a StatefulSet pod name (`demo-3` -> 3) if it belongs to `names`.
pub fn pod_ordinal(names: &Names, pod: &str) -> Option<i32> {
    pod.strip_prefix(&names.statefulset)?.strip_prefix('-')?.parse().ok()
}

/// An object as JSON with its apiVersion and kind, which k8s-openapi leaves out of the
/// serialized form and server-side apply (and any manifest) needs.
pub fn typed_json<K: Resource<DynamicType = ()> + serde::Serialize>(
    object: &K,
) -> serde_json::Result<serde_json::Value> {
    let mut value = serde_json::to_value(object)?;
    value["apiVersion"] = K::api_version(&()).into();
    value["kind"] = K::kind(&()).into();
    Ok(value)
}

/// The cluster's key for maps of per-cluster state: `namespace/name`.
pub fn cluster_key(kvc: &KeyValueCluster) -> String {
    format!("{}/{}", kvc.namespace().unwrap_or_default(), kvc.name_any())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm};

    use super::*;
    use crate::k8s::crd::{Durability, VolumePolicy};
    use crate::k8s::fixtures::cluster;

    fn pod_spec(sts: &StatefulSet) -> &PodSpec {
        sts.spec.template.spec.as_ref().unwrap()
    }

    #[test]
    fn statefulset_runs_hardened_storage_pods_with_a_volume_each() {
        let kvc = cluster("demo", 3);
        let sts = statefulset(&kvc, 4).unwrap();
        let spec = &sts.spec;
        assert_eq!(spec.replicas, Some(4), "the reconciler's count, not spec.replicas");
        assert_eq!(spec.service_name.as_deref(), Some("demo-nodes"));
        let owner = &sts.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("KeyValueCluster", "demo", Some(true))
        );

        let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
        let requests = claim.spec.as_ref().unwrap().resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(requests["storage"], Quantity("10Gi".into()));
        let retention = spec.persistent_volume_claim_retention_policy.as_ref().unwrap();
        assert_eq!(
            (retention.when_scaled.as_deref(), retention.when_deleted.as_deref()),
            (Some("Delete"), Some("Retain"))
        );

        let pod = pod_spec(&sts);
        let container = &pod.containers[0];
        let security = container.security_context.as_ref().unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        let probe_path = |probe: &Option<Probe>| {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.port, IntOrString::String("metrics".into()), "probes use the metrics port");
            get.path.clone().unwrap()
        };
        assert_eq!(probe_path(&container.readiness_probe), "/readyz");
        assert_eq!(probe_path(&container.liveness_probe), "/healthz");
        assert_eq!(probe_path(&container.startup_probe), "/healthz");
        let advertise = container.env.as_ref().unwrap().iter().find(|e| e.name == "KVFLEET_ADVERTISE").unwrap();
        assert_eq!(advertise.value.as_deref(), Some("$(KVFLEET_NODE_ID).demo-nodes.$(POD_NAMESPACE).svc:7700"));
        assert_eq!(container.volume_mounts.as_ref().unwrap()[0].mount_path, DATA_DIR);
        let anti = pod.affinity.as_ref().unwrap().pod_anti_affinity.as_ref().unwrap();
        assert!(anti.preferred_during_scheduling_ignored_during_execution.is_some());
        assert!(anti.required_during_scheduling_ignored_during_execution.is_none());
    }

    #[test]
    fn spec_choices_reach_the_pods() {
        let mut kvc = cluster("demo", 3);
        kvc.spec.storage.size = "50Gi".into();
        kvc.spec.storage.storage_class_name = Some("fast-ssd".into());
        kvc.spec.storage.on_scale_in = VolumePolicy::Retain;
        kvc.spec.storage.on_delete = VolumePolicy::Delete;
        kvc.spec.ports.grpc = 8000;
        kvc.spec.image = Some("registry.local/kvfleet-node:dev".into());
        kvc.spec.scheduling.node_selector.insert("disk".into(), "nvme".into());
        kvc.spec.scheduling.pod_anti_affinity = AntiAffinity::Required;
        let sts = statefulset(&kvc, 3).unwrap();
        let spec = &sts.spec;
        let claim = spec.volume_claim_templates.as_ref().unwrap()[0].spec.as_ref().unwrap();
        assert_eq!(claim.storage_class_name.as_deref(), Some("fast-ssd"));
        assert_eq!(claim.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"], Quantity("50Gi".into()));
        let retention = spec.persistent_volume_claim_retention_policy.as_ref().unwrap();
        assert_eq!(
            (retention.when_scaled.as_deref(), retention.when_deleted.as_deref()),
            (Some("Retain"), Some("Delete"))
        );
        let pod = pod_spec(&sts);
        assert_eq!(pod.containers[0].image.as_deref(), Some("registry.local/kvfleet-node:dev"));
        let ports = pod.containers[0].ports.as_ref().unwrap();
        assert_eq!((ports[0].name.as_deref(), ports[0].container_port), (Some("grpc"), 8000));
        assert_eq!(pod.node_selector.as_ref().unwrap()["disk"], "nvme");
        let anti = pod.affinity.as_ref().unwrap().pod_anti_affinity.as_ref().unwrap();
        assert_eq!(anti.required_during_scheduling_ignored_during_execution.as_ref().unwrap().len(), 1);
        let config = node_config(&kvc).unwrap();
        assert_eq!(config.data.as_ref().unwrap()["KVFLEET_LISTEN"], "0.0.0.0:8000");
    }

    #[test]
    fn a_users_affinity_replaces_the_default_and_none_drops_it() {
        let mut kvc = cluster("demo", 3);
        let affinity = Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "zone".into(),
                            operator: "In".into(),
                            values: Some(vec!["a".into()]),
                        }]),
                        match_fields: None,
                    }],
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        kvc.spec.scheduling.affinity = Some(affinity.clone());
        assert_eq!(pod_spec(&statefulset(&kvc, 3).unwrap()).affinity, Some(affinity));
        kvc.spec.scheduling.affinity = None;
        kvc.spec.scheduling.pod_anti_affinity = AntiAffinity::None;
        assert_eq!(pod_spec(&statefulset(&kvc, 3).unwrap()).affinity, None);
    }

    #[test]
    fn a_configuration_change_rolls_the_pods() {
        let hash = |kvc: &KeyValueCluster| {
            let sts = statefulset(kvc, 3).unwrap();
            sts.spec.template.metadata.unwrap().annotations.unwrap()[CONFIG_HASH_ANNOTATION].clone()
        };
        let mut kvc = cluster("demo", 3);
        let before = hash(&kvc);
        kvc.spec.replicas = 5;
        assert_eq!(hash(&kvc), before, "scaling does not restart pods");
        kvc.spec.durability = Durability::Async;
        assert_ne!(hash(&kvc), before);
        assert_eq!(node_config(&kvc).unwrap().data.unwrap()["KVFLEET_DURABILITY"], "async");
        let before = hash(&kvc);
        kvc.spec.replication.durability = ReplicationDurability::Majority;
        assert_eq!(hash(&kvc), before, "the default said out loud restarts nothing");
        assert!(!node_config(&kvc).unwrap().data.unwrap().contains_key("KVFLEET_REPLICATION_DURABILITY"));
        kvc.spec.replication.durability = ReplicationDurability::Fast;
        assert_ne!(hash(&kvc), before);
        assert_eq!(node_config(&kvc).unwrap().data.unwrap()["KVFLEET_REPLICATION_DURABILITY"], "fast");
    }

    #[test]
    fn drain_first_leaves_restarts_to_the_operator() {
        let strategy = |kvc: &KeyValueCluster| statefulset(kvc, 3).unwrap().spec.update_strategy.unwrap().type_;
        let mut kvc = cluster("demo", 3);
        assert_eq!(strategy(&kvc).as_deref(), Some("RollingUpdate"));
        kvc.spec.update_strategy.type_ = UpdateType::DrainFirst;
        assert_eq!(strategy(&kvc).as_deref(), Some("OnDelete"));
    }

    #[test]
    fn services_and_budget() {
        let kvc = cluster("demo", 3);
        let headless = headless_service(&kvc).unwrap();
        let spec = headless.spec.as_ref().unwrap();
        assert_eq!(headless.metadata.name.as_deref(), Some("demo-nodes"));
        assert_eq!((spec.cluster_ip.as_deref(), spec.publish_not_ready_addresses), (Some("None"), Some(true)));
        let client = client_service(&kvc).unwrap();
        let spec = client.spec.as_ref().unwrap();
        assert_eq!(client.metadata.name.as_deref(), Some("demo"));
        assert_eq!(spec.ports.as_ref().unwrap()[0].port, 7700);
        assert_eq!(spec.selector, Some(selector_labels(&Names::of(&kvc).unwrap())));
        let pdb = pod_disruption_budget(&kvc).unwrap();
        assert_eq!(pdb.spec.unwrap().max_unavailable, Some(IntOrString::Int(1)));
    }

    #[test]
    fn the_configuration_hash_is_the_same_in_every_build() {
        // Pinned: a different value here restarts every storage pod after an operator upgrade
        // (changed once, on purpose, when the nodes got their admin port).
        let kvc = cluster("demo", 3);
        assert_eq!(config_hash(&node_config(&kvc).unwrap()), "1826afa78e60289c");
        let mut other = kvc.clone();
        other.spec.durability = crate::k8s::crd::Durability::Async;
        assert_ne!(config_hash(&node_config(&other).unwrap()), "1826afa78e60289c");
    }

    #[test]
    fn every_port_names_its_protocol() {
        // A key of the port lists: server-side apply refuses an element without it.
        let kvc = cluster("demo", 3);
        for service in [headless_service(&kvc).unwrap(), client_service(&kvc).unwrap()] {
            let ports = service.spec.unwrap().ports.unwrap();
            assert!(ports.iter().all(|p| p.protocol.as_deref() == Some("TCP")), "{ports:?}");
        }
        let pod = statefulset(&kvc, 3).unwrap().spec.template.spec.unwrap();
        let ports = pod.containers[0].ports.clone().unwrap();
        assert!(ports.iter().all(|p| p.protocol.as_deref() == Some("TCP")), "{ports:?}");
    }

    #[test]
    fn a_cluster_without_identity_is_refused_not_guessed() {
        let mut kvc = cluster("demo", 3);
        kvc.metadata.uid = None;
        assert!(matches!(statefulset(&kvc, 3), Err(BuildError::MissingMetadata("uid"))));
        kvc.metadata.namespace = None;
        assert!(matches!(Names::of(&kvc), Err(BuildError::MissingMetadata("namespace"))));
    }

    #[test]
    fn pod_names_and_ordinals() {
        let names = Names::of(&cluster("demo", 3)).unwrap();
        assert_eq!(names.pod(2), "demo-2");
        assert_eq!(pod_ordinal(&names, "demo-12"), Some(12));
        assert_eq!(pod_ordinal(&names, "demo-x"), None);
        assert_eq!(pod_ordinal(&names, "demox-1"), None);
        assert_eq!(names.pod_address("demo-0", 7700), "demo-0.demo-nodes.ns.svc:7700");
    }

    #[test]
    fn the_network_policy_opens_the_admin_port_to_the_operator_only() {
        let kvc = cluster("demo", 3);
        let policy = network_policy(&kvc, &OperatorPods::of_chart("kvfleet-system")).unwrap();
        let rules = policy.spec.unwrap().ingress.unwrap();
        let ports = |rule: &NetworkPolicyIngressRule| {
            rule.ports.iter().flatten().filter_map(|p| p.port.clone()).collect::<Vec<_>>()
        };
        assert_eq!(ports(&rules[0]), [IntOrString::Int(7700), IntOrString::Int(9090)]);
        assert!(rules[0].from.is_none(), "data and metrics: from anywhere");
        assert_eq!(ports(&rules[1]), [IntOrString::Int(7701)]);
        let from = &rules[1].from.as_ref().unwrap()[0];
        let namespace = from.namespace_selector.as_ref().unwrap().match_labels.as_ref().unwrap();
        assert_eq!(namespace["kubernetes.io/metadata.name"], "kvfleet-system");
        let pods = from.pod_selector.as_ref().unwrap().match_labels.as_ref().unwrap();
        assert_eq!(pods["app.kubernetes.io/name"], "kvfleet-operator");
    }
}
