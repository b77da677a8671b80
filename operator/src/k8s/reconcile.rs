//! The reconciler: validate -> decide the scale step -> build (pure) -> apply (server-side apply,
//! one field manager, owner references) -> step a DrainFirst update (restart a pod once its
//! ranges have moved away) -> make sure the resharding loop runs -> write status and Events. Everything it writes is owned by the KeyValueCluster, so deleting the resource
//! garbage-collects it; no finalizer is needed.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource};
use kvfleet_resharding::fleet::FleetView;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::admin_auth::AdminKey;
use super::build::{self, BuildError, MANAGER, Names, cluster_key};
use super::crd::{KeyValueCluster, UpdateType, VolumePolicy};
use super::fleet::Fleets;
use super::pods::{self, StuckPod};
use super::rollout::{self, PodView, RolloutStep};
use super::scale::{self, ScaleStep};
use super::server::{PdbVersion, ServerCapabilities};
use super::status::{self, API_REFUSED_REASON, Observed, Problem};
use super::volumes::{self, Resize};
use kvfleet_planner::Surface;
use kvfleet_resharding::leadership::{Leadership, NotLeading};

/// Re-read the cluster this often even when nothing changes: the status follows the resharding
/// loop, and a scale-in advances as pods empty.
const REFRESH: Duration = Duration::from_secs(10);
const REFRESH_WHILE_SCALING: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("{what} {name}: {source}")]
    Api { what: &'static str, name: String, source: kube::Error },
    #[error(transparent)]
    NotLeading(#[from] NotLeading),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Default)]
pub struct ReconcileMetrics {
    reconciles: Family<OutcomeLabels, Counter>,
}

impl ReconcileMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ReconcileMetrics::default();
        registry.register("kvfleet_operator_reconciles", "Reconciles, by outcome", metrics.reconciles.clone());
        metrics
    }

    fn count(&self, outcome: &'static str) {
        self.reconciles.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

pub struct Context {
    pub client: Client,
    pub fleets: Arc<dyn Fleets>,
    /// One recorder for the process: it folds repeats of an event into a series.
    pub recorder: Recorder,
    pub metrics: ReconcileMetrics,
    /// What the API server serves (discovered at start).
    pub server: ServerCapabilities,
    /// Whether this replica leads: a deposed one must not apply anything.
    pub leadership: Leadership,
    /// Derives each cluster's admin token, written into a Secret for its pods (none: no Secret,
    /// the nodes' admin API is open).
    pub admin_key: Option<AdminKey>,
    /// A pod not Ready this long after its creation is reported, with why (`pods.rs`).
    pub pod_ready_timeout: Duration,
    /// What was last applied for each cluster: an unchanged cluster is not applied again.
    pub applied: AppliedCache,
    /// Each cluster gets a NetworkPolicy opening its admin port to these pods only (None: no
    /// NetworkPolicy).
    pub network_policy: Option<build::OperatorPods>,
}

/// Re-apply an unchanged cluster's objects this often anyway: how long a child object edited by
/// hand (or deleted) may take to be put back.
const REAPPLY_EVERY: Duration = Duration::from_secs(300);

/// What this replica last applied for each cluster (a fingerprint of every object) and when, so
/// that an idle cluster costs the API server reads, not writes.
#[derive(Default)]
pub struct AppliedCache(parking_lot::Mutex<std::collections::HashMap<String, (u64, std::time::Instant)>>);

impl AppliedCache {
    /// Within one process only (std's hasher), over the objects as they would be sent.
    pub fn fingerprint(objects: &impl Serialize) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        serde_json::to_string(objects).unwrap_or_default().hash(&mut hasher);
        hasher.finish()
    }

    fn unchanged(&self, cluster: &str, fingerprint: u64) -> bool {
        let applied = self.0.lock();
        applied.get(cluster).is_some_and(|(last, at)| *last == fingerprint && at.elapsed() < REAPPLY_EVERY)
    }

    fn record(&self, cluster: String, fingerprint: u64) {
        self.0.lock().insert(cluster, (fingerprint, std::time::Instant::now()));
    }
}

/// Checks the CEL rules cannot express (or that an older CRD may not carry): the message names
/// the field and the limit.
pub fn validate(kvc: &KeyValueCluster) -> Result<(), String> {
    let spec = &kvc.spec;
    if spec.replicas < 1 || spec.replicas > super::crd::MAX_REPLICAS {
        return Err(format!(
            "spec.replicas is {}; it must be between 1 and {}",
            spec.replicas,
            super::crd::MAX_REPLICAS
        ));
    }
    if spec.image.as_deref().is_some_and(|i| i.trim().is_empty() || i.contains(' ')) {
        return Err("spec.image is empty or has spaces; omit it for the default image".into());
    }
    let name = kvc.metadata.name.as_deref().unwrap_or_default();
    let dns_1035 = name.len() <= 52
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !dns_1035 {
        return Err(format!(
            "metadata.name {name:?} must be a DNS-1035 label of at most 52 characters (the Services and pods are \
             named after it)"
        ));
    }
    if spec.replication.factor.is_some_and(|f| ![1, 3, 5].contains(&f) || f > spec.replicas) {
        return Err(format!("spec.replication.factor must be 1, 3 or 5 and at most spec.replicas ({})", spec.replicas));
    }
    if spec.update_strategy.type_ == super::crd::UpdateType::DrainFirst && spec.replicas < 2 {
        return Err("spec.updateStrategy.type DrainFirst needs at least 2 replicas; use Restart with 1".into());
    }
    if let Some(resources) = &spec.resources {
        let parse = |kind: &str,
                     map: &Option<
            std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
        >| {
            map.iter()
                .flatten()
                .map(|(resource, quantity)| {
                    volumes::quantity_bytes(&quantity.0).map(|value| (resource.clone(), value)).ok_or_else(|| {
                        format!(
                            "spec.resources.{kind}.{resource} is {:?}, not a quantity such as 500m, 2 or 4Gi",
                            quantity.0
                        )
                    })
                })
                .collect::<Result<std::collections::BTreeMap<_, _>, String>>()
        };
        let requests = parse("requests", &resources.requests)?;
        let limits = parse("limits", &resources.limits)?;
        for (resource, request) in &requests {
            if limits.get(resource).is_some_and(|limit| request > limit) {
                return Err(format!("spec.resources.requests.{resource} exceeds spec.resources.limits.{resource}"));
            }
        }
    }
    let ports = &spec.ports;
    for (name, port) in [("grpc", ports.grpc), ("metrics", ports.metrics), ("admin", ports.admin)] {
        if !(1..=65535).contains(&port) {
            return Err(format!("spec.ports.{name} is {port}; it must be a port number (1-65535)"));
        }
    }
    if ports.grpc == ports.metrics {
        return Err(format!("spec.ports.grpc and spec.ports.metrics must differ (both {})", ports.grpc));
    }
    if ports.admin == ports.grpc || ports.admin == ports.metrics {
        return Err(format!(
            "spec.ports.admin ({}) must differ from spec.ports.grpc and spec.ports.metrics",
            ports.admin
        ));
    }
    for toleration in &spec.scheduling.tolerations {
        if let Some(operator) = toleration.operator.as_deref().filter(|o| !matches!(*o, "Exists" | "Equal")) {
            return Err(format!("spec.scheduling.tolerations: operator {operator:?} must be Exists or Equal"));
        }
        let effect = toleration.effect.as_deref().unwrap_or_default();
        if !matches!(effect, "" | "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            return Err(format!(
                "spec.scheduling.tolerations: effect {effect:?} must be NoSchedule, PreferNoSchedule or NoExecute (or \
                 empty for all)"
            ));
        }
        if toleration.operator.as_deref() == Some("Exists")
            && toleration.value.as_deref().is_some_and(|v| !v.is_empty())
        {
            return Err("spec.scheduling.tolerations: a toleration with operator Exists must not have a value".into());
        }
    }
    spec.sharding.policy().validate().map_err(|error| error.describe(Surface::Resource))
}

pub async fn reconcile(kvc: Arc<KeyValueCluster>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    ctx.leadership.current()?;
    let result = reconcile_inner(&kvc, &ctx).await;
    ctx.metrics.count(if result.is_ok() { "ok" } else { "error" });
    if let Err(ReconcileError::Api { what, name, source: kube::Error::Api(status) }) = &result {
        let message = format!("{what} {name}: {} (HTTP {})", status.message, status.code);
        report_refusal(&kvc, &ctx, &message).await;
    }
    result
}

/// An apply the API server refused (4xx) or failed (5xx, as server-side apply reports schema
/// errors) is reported like an invalid spec, with the API's message, not only logged. Best
/// effort: the reconcile is retried either way.
async fn report_refusal(kvc: &KeyValueCluster, ctx: &Context, message: &str) {
    let Ok(names) = Names::of(kvc) else { return };
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let current = sets.get_opt(&names.statefulset).await.ok().flatten();
    if let Err(error) = report_problem(ctx, kvc, &names, current.as_ref(), Problem::ApiRefused(message)).await {
        tracing::warn!(%error, "could not report a refused apply in the status");
    }
}

/// A cluster that cannot be built as asked: a Warning event and `Degraded=True` with the
/// problem's reason and message; the StatefulSet keeps its size.
async fn report_problem(
    ctx: &Context,
    kvc: &KeyValueCluster,
    names: &Names,
    current: Option<&StatefulSet>,
    problem: Problem<'_>,
) -> Result<(), ReconcileError> {
    let (reason, message) = match problem {
        Problem::InvalidSpec(message) => ("InvalidSpec", message),
        Problem::ApiRefused(message) => (API_REFUSED_REASON, message),
    };
    publish(&ctx.recorder, kvc, EventType::Warning, reason, message).await;
    let fleet = ctx.fleets.status(&cluster_key(kvc));
    let step = ScaleStep::Steady { replicas: current.and_then(|s| s.spec.replicas).unwrap_or(0) };
    let observed = Observed {
        kvc,
        statefulset: current,
        fleet: fleet.as_ref(),
        step: &step,
        rollout: None,
        problem: Some(problem),
        stuck: &[],
        now: now(),
    };
    write_status(ctx, names, &observed).await
}

async fn reconcile_inner(kvc: &KeyValueCluster, ctx: &Context) -> Result<Action, ReconcileError> {
    let names = Names::of(kvc)?;
    let ns = names.namespace.as_str();
    let recorder = &ctx.recorder;
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let current =
        sets.get_opt(&names.statefulset).await.map_err(api_error("reading StatefulSet", &names.statefulset))?;

    let fleet = ctx.fleets.status(&cluster_key(kvc));
    if let Err(why) = validate(kvc) {
        report_problem(ctx, kvc, &names, current.as_ref(), Problem::InvalidSpec(&why)).await?;
        return Ok(Action::requeue(REFRESH * 6));
    }
    // What CEL cannot see: the factor the cluster's ranges were made with (the default depends
    // on the pods at creation). Fewer pods could never hold every replica: nothing is changed.
    if let Some(factor) = fleet.as_ref().filter(|f| f.round > 0).map(|f| f.replication_factor)
        && factor as i32 > kvc.spec.replicas
    {
        let why = format!(
            "spec.replicas {} is below the {factor} replicas each range of this cluster has (each on a different pod); scale to at least {factor}",
            kvc.spec.replicas
        );
        report_problem(ctx, kvc, &names, current.as_ref(), Problem::InvalidSpec(&why)).await?;
        return Ok(Action::requeue(REFRESH * 6));
    }

    // Orphan-deleted for a volume resize: recreated once the API server has removed it.
    if current.as_ref().is_some_and(|s| s.metadata.deletion_timestamp.is_some()) {
        return Ok(Action::requeue(REFRESH_WHILE_SCALING));
    }
    let step = scale::decide(&names, kvc.spec.replicas, current.as_ref().and_then(|s| s.spec.replicas), fleet.as_ref());
    let mut kvc = kvc.clone();
    if let Some(sts) = current.as_ref() {
        // The template keeps the volumes' size unless this reconcile grows them.
        let keep = match volumes::decide(sts, &kvc.spec.storage.size) {
            Resize::Unchanged => None,
            Resize::Grow { from, to } if matches!(step, ScaleStep::Steady { .. }) => {
                match grow_volumes(ctx, &kvc, &names, sts, &to).await? {
                    Ok(()) => return Ok(Action::requeue(REFRESH_WHILE_SCALING)),
                    Err(why) => {
                        publish(recorder, &kvc, EventType::Warning, "VolumeResizeFailed", &why).await;
                        Some(from)
                    }
                }
            }
            // One thing at a time: the resize waits until the scale step is done.
            Resize::Grow { from, .. } => Some(from),
            Resize::Shrink { from, to } | Resize::Unknown { from, to } => {
                let why = format!(
                    "spec.storage.size {to} is not larger than the volumes' {from}; volumes never shrink, keeping {from}"
                );
                publish(recorder, &kvc, EventType::Warning, "VolumeResizeRefused", &why).await;
                Some(from)
            }
        };
        if let Some(size) = keep {
            kvc.spec.storage.size = size;
        }
    }
    let kvc = &kvc;
    let desired = build::desired(kvc, step.replicas())?;
    let secret = match ctx.admin_key.as_ref().and_then(|key| key.token_for(kvc)) {
        Some(token) => Some(build::admin_token_secret(kvc, &token)?),
        None => None,
    };
    let mut statefulset = desired.statefulset.clone();
    if !ctx.server.claim_retention_policy {
        // An older server refuses the field: volumes are then always retained.
        statefulset.spec.persistent_volume_claim_retention_policy = None;
    }
    let policy = match &ctx.network_policy {
        Some(operator) => Some(build::network_policy(kvc, operator)?),
        None => None,
    };
    let key = cluster_key(kvc);
    let fingerprint = AppliedCache::fingerprint(&(&desired, &secret, &policy, &statefulset, ctx.server.pdb_version));
    let applied = match current {
        Some(current) if ctx.applied.unchanged(&key, fingerprint) => current,
        _ => {
            apply(&ctx.client, ns, &desired.node_config).await?;
            if let Some(secret) = &secret {
                apply(&ctx.client, ns, secret).await?;
            }
            apply(&ctx.client, ns, &desired.headless).await?;
            apply(&ctx.client, ns, &desired.client).await?;
            apply_pdb(ctx, ns, &desired.pdb).await?;
            if let Some(policy) = &policy {
                apply(&ctx.client, ns, policy).await?;
            }
            let applied = apply(&ctx.client, ns, &statefulset).await?;
            ctx.applied.record(key, fingerprint);
            applied
        }
    };
    match &step {
        // A cluster that had pods lost only its StatefulSet (a volume resize): the pods stay.
        ScaleStep::Create { .. } if kvc.status.as_ref().is_some_and(|s| s.replicas > 0) => {
            let note = "StatefulSet created again; it adopts the running pods and their volumes";
            publish(recorder, kvc, EventType::Normal, "StatefulSetRecreated", note).await
        }
        ScaleStep::Create { .. } => publish(recorder, kvc, EventType::Normal, "Created", &step.describe()).await,
        ScaleStep::Grow { .. } => publish(recorder, kvc, EventType::Normal, "ScalingOut", &step.describe()).await,
        ScaleStep::Shrink { .. } => publish(recorder, kvc, EventType::Normal, "ScaledIn", &step.describe()).await,
        ScaleStep::Drain { .. } | ScaleStep::Steady { .. } => {}
    }
    let rollout = roll_out(ctx, kvc, &names, &applied, fleet.as_ref(), &step).await?;
    ctx.fleets.ensure(kvc, &names);
    let stuck = stuck_pods(ctx, &names, &applied).await?;
    if !stuck.is_empty() {
        let text = stuck.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        let note = format!("not ready after {}s: {text}", ctx.pod_ready_timeout.as_secs());
        publish(recorder, kvc, EventType::Warning, status::STUCK_REASON, &note).await;
    }
    let observed = Observed {
        kvc,
        statefulset: Some(&applied),
        fleet: fleet.as_ref(),
        step: &step,
        rollout: rollout.as_ref(),
        problem: None,
        stuck: &stuck,
        now: now(),
    };
    write_status(ctx, &names, &observed).await?;
    let busy = matches!(step, ScaleStep::Drain { .. } | ScaleStep::Shrink { .. })
        || rollout.as_ref().is_some_and(RolloutStep::in_progress);
    Ok(Action::requeue(if busy { REFRESH_WHILE_SCALING } else { REFRESH }))
}

/// Pods not Ready past the bound, with why. Read only while the StatefulSet reports fewer ready
/// pods than it runs (an idle healthy cluster lists nothing).
async fn stuck_pods(ctx: &Context, names: &Names, statefulset: &StatefulSet) -> Result<Vec<StuckPod>, ReconcileError> {
    let Some(status) = statefulset.status.as_ref() else { return Ok(Vec::new()) };
    if status.ready_replicas.unwrap_or(0) >= status.replicas {
        return Ok(Vec::new());
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let pods = api
        .list(&ListParams::default().labels(&build::selector_string(names)))
        .await
        .map_err(api_error("listing the pods of", &names.statefulset))?;
    Ok(pods::stuck(&pods.items, k8s_openapi::jiff::Timestamp::now(), ctx.pod_ready_timeout))
}

/// A DrainFirst update: decide the step from the pods, and delete the pod it names once its
/// ranges have moved away (the StatefulSet, OnDelete, recreates it at the new revision).
async fn roll_out(
    ctx: &Context,
    kvc: &KeyValueCluster,
    names: &Names,
    statefulset: &StatefulSet,
    fleet: Option<&FleetView>,
    step: &ScaleStep,
) -> Result<Option<RolloutStep>, ReconcileError> {
    if kvc.spec.update_strategy.type_ != UpdateType::DrainFirst || !rollout::pending(statefulset) {
        return Ok(None);
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let pods = api
        .list(&ListParams::default().labels(&build::selector_string(names)))
        .await
        .map_err(api_error("listing the pods of", &names.statefulset))?;
    let pods: Vec<PodView> = pods.items.iter().filter_map(|p| PodView::of(names, p)).collect();
    let decided = rollout::decide(names, statefulset, &pods, fleet, step);
    let previous = kvc.status.as_ref();
    let was_draining = previous.and_then(|s| s.rollout.as_ref()).and_then(|r| r.draining_pod.as_deref());
    let was_blocked = previous.is_some_and(|s| s.conditions.iter().any(|c| c.reason == rollout::BLOCKED_REASON));
    let recorder = &ctx.recorder;
    match &decided {
        RolloutStep::Drain { pod, .. } if was_draining != Some(pod.as_str()) => {
            publish(recorder, kvc, EventType::Normal, "DrainingForUpdate", &decided.describe()).await;
        }
        RolloutStep::Restart { pod, uid, .. } => {
            // Only the pod that was drained: a pod recreated meanwhile has another uid (409).
            let preconditions = uid.clone().map(|uid| Preconditions { uid: Some(uid), resource_version: None });
            match api.delete(pod, &DeleteParams { preconditions, ..Default::default() }).await {
                Ok(_) => publish(recorder, kvc, EventType::Normal, "RestartingPod", &decided.describe()).await,
                Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
                Err(source) => return Err(api_error("deleting pod", pod)(source)),
            }
        }
        RolloutStep::Blocked { .. } if !was_blocked => {
            publish(recorder, kvc, EventType::Warning, rollout::BLOCKED_REASON, &decided.describe()).await;
        }
        _ => {}
    }
    Ok(Some(decided))
}

/// Grows every pod's volume claim to `size`, then deletes the StatefulSet, orphaning its pods
/// and claims, so the next reconcile creates it with the new claim template (`volumes`).
/// `Ok(Err(why))`: a claim refused the new size (its storage class cannot expand); nothing else
/// changed.
async fn grow_volumes(
    ctx: &Context,
    kvc: &KeyValueCluster,
    names: &Names,
    statefulset: &StatefulSet,
    size: &str,
) -> Result<Result<(), String>, ReconcileError> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let patch = serde_json::json!({ "spec": { "resources": { "requests": { "storage": size } } } });
    for ordinal in 0..statefulset.spec.replicas.unwrap_or(0) {
        let claim = volumes::claim_name(names, ordinal);
        match claims.patch(&claim, &PatchParams::apply(MANAGER), &Patch::Merge(&patch)).await {
            Ok(_) => {}
            // Its pod was never created: the new template will make it at the new size.
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(kube::Error::Api(status)) => {
                return Ok(Err(format!(
                    "growing volume {claim} to {size}: {} (does its storage class allow volume expansion?)",
                    status.message
                )));
            }
            Err(source) => return Err(api_error("growing volume", &claim)(source)),
        }
    }
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &names.namespace);
    if kvc.spec.storage.on_delete == VolumePolicy::Delete && ctx.server.claim_retention_policy {
        // Claims the StatefulSet owns would follow it: retain them for the switch (the new
        // StatefulSet takes the spec's policy back).
        let retain =
            serde_json::json!({ "spec": { "persistentVolumeClaimRetentionPolicy": { "whenDeleted": "Retain" } } });
        sets.patch(&names.statefulset, &PatchParams::apply(MANAGER), &Patch::Merge(&retain))
            .await
            .map_err(api_error("retaining the volumes of", &names.statefulset))?;
    }
    let preconditions =
        statefulset.metadata.uid.clone().map(|uid| Preconditions { uid: Some(uid), resource_version: None });
    let params =
        DeleteParams { propagation_policy: Some(PropagationPolicy::Orphan), preconditions, ..Default::default() };
    sets.delete(&names.statefulset, &params).await.map_err(api_error("replacing", &names.statefulset))?;
    let note =
        format!("volumes grown to {size}; the StatefulSet is recreated with the new size, its pods keep running");
    publish(&ctx.recorder, kvc, EventType::Normal, "VolumesResized", &note).await;
    Ok(Ok(()))
}

/// Server-side apply of one object with the operator's field manager (forced: the operator owns
/// these fields; a person's `kubectl edit` of them is put back).
async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K, ReconcileError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let body = build::typed_json(object).map_err(|e| ReconcileError::Api {
        what: "encoding",
        name: name.clone(),
        source: kube::Error::SerdeError(e),
    })?;
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body))
        .await
        .map_err(api_error("applying", &name))
}

/// The PodDisruptionBudget, as the version the server serves (`PdbVersion`).
async fn apply_pdb(
    ctx: &Context,
    namespace: &str,
    pdb: &k8s_openapi::api::policy::v1::PodDisruptionBudget,
) -> Result<(), ReconcileError> {
    if ctx.server.pdb_version == PdbVersion::V1 {
        return apply(&ctx.client, namespace, pdb).await.map(|_| ());
    }
    let name = pdb.metadata.name.clone().unwrap_or_default();
    let mut body = build::typed_json(pdb).map_err(|e| ReconcileError::Api {
        what: "encoding",
        name: name.clone(),
        source: kube::Error::SerdeError(e),
    })?;
    body["apiVersion"] = "policy/v1beta1".into();
    let resource = kube::discovery::ApiResource {
        group: "policy".into(),
        version: "v1beta1".into(),
        api_version: "policy/v1beta1".into(),
        kind: "PodDisruptionBudget".into(),
        plural: "poddisruptionbudgets".into(),
    };
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(ctx.client.clone(), namespace, &resource);
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body))
        .await
        .map(|_| ())
        .map_err(api_error("applying", &name))
}

async fn write_status(ctx: &Context, names: &Names, observed: &Observed<'_>) -> Result<(), ReconcileError> {
    let status = status::compute(observed);
    if observed.kvc.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<KeyValueCluster> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let patch = serde_json::json!({ "status": status });
    api.patch_status(&names.cluster, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(api_error("writing the status of", &names.cluster))?;
    Ok(())
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

async fn publish(recorder: &Recorder, kvc: &KeyValueCluster, type_: EventType, reason: &str, note: &str) {
    let event =
        Event { type_, reason: reason.into(), note: Some(note.into()), action: "Reconcile".into(), secondary: None };
    if let Err(error) = recorder.publish(&event, &kvc.object_ref(&())).await {
        tracing::warn!(%error, reason, "publishing an event failed");
    }
}

fn api_error(what: &'static str, name: &str) -> impl FnOnce(kube::Error) -> ReconcileError {
    let name = name.to_string();
    move |source| ReconcileError::Api { what, name, source }
}

/// After a failed reconcile: log, retry with a short backoff.
pub fn error_policy(kvc: Arc<KeyValueCluster>, error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(cluster = %cluster_key(&kvc), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
pub(crate) mod tests {
    use kube::runtime::events::Reporter;
    use kvfleet_resharding::fleet::NodeState;
    use serde_json::{Value, json};

    use super::*;
    use crate::k8s::fixtures::{Draining, Recorded, Reply, Up, cluster, expect, fleet_status, verifier};

    /// Stands in for the resharding loops: a fixed status, and a count of `ensure` calls.
    #[derive(Default)]
    struct FakeFleets {
        status: Option<FleetView>,
        ensured: parking_lot::Mutex<u32>,
    }

    impl Fleets for FakeFleets {
        fn status(&self, _key: &str) -> Option<FleetView> {
            self.status.clone()
        }
        fn ensure(&self, _kvc: &KeyValueCluster, _names: &Names) {
            *self.ensured.lock() += 1;
        }
    }

    fn context(client: Client, fleets: Arc<FakeFleets>) -> Arc<Context> {
        let reporter = Reporter { controller: "kvfleet-operator".into(), instance: None };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            fleets,
            metrics: ReconcileMetrics::default(),
            server: ServerCapabilities::default(),
            leadership: Leadership::unconditional(),
            admin_key: Some(test_key()),
            pod_ready_timeout: Duration::from_secs(120),
            applied: AppliedCache::default(),
            network_policy: Some(build::OperatorPods::of_chart("kvfleet-system")),
        })
    }

    /// One reconcile of `kvc` against the scripted API server, the resharding loops reporting
    /// `fleet`: its result, the calls made, and how many times the loop was ensured.
    async fn reconcile_once(
        kvc: &KeyValueCluster,
        fleet: Option<FleetView>,
        script: Vec<crate::k8s::fixtures::Expect>,
    ) -> (Action, Vec<Recorded>, u32) {
        let (client, server) = verifier(script);
        let fleets = Arc::new(FakeFleets { status: fleet, ..Default::default() });
        let action =
            reconcile(Arc::new(kvc.clone()), context(client, fleets.clone())).await.expect("reconcile succeeds");
        let calls = server.await.expect("every scripted call came, in order");
        let ensured = *fleets.ensured.lock();
        (action, calls, ensured)
    }

    fn test_key() -> AdminKey {
        AdminKey::new("the operator's key in the unit tests, 32+ bytes").unwrap()
    }

    const STS: &str = "/apis/apps/v1/namespaces/ns/statefulsets/demo";
    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";
    const STATUS: &str = "/apis/kvfleet.io/v1alpha1/namespaces/ns/keyvalueclusters/demo/status";

    /// The five server-side applies of a reconcile, in order.
    fn applies() -> Vec<crate::k8s::fixtures::Expect> {
        vec![
            expect("PATCH", "/api/v1/namespaces/ns/configmaps/demo-node-config", Reply::Echo),
            expect("PATCH", "/api/v1/namespaces/ns/secrets/demo-admin-token", Reply::Echo),
            expect("PATCH", "/api/v1/namespaces/ns/services/demo-nodes", Reply::Echo),
            expect("PATCH", "/api/v1/namespaces/ns/services/demo", Reply::Echo),
            expect("PATCH", "/apis/policy/v1/namespaces/ns/poddisruptionbudgets/demo", Reply::Echo),
            expect("PATCH", "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/demo", Reply::Echo),
            expect("PATCH", STS, Reply::Echo),
        ]
    }

    fn status_reply(kvc: &KeyValueCluster) -> Reply {
        Reply::Json(serde_json::to_value(kvc).unwrap())
    }

    fn existing_statefulset(kvc: &KeyValueCluster, replicas: i32) -> Value {
        let mut sts = build::typed_json(&build::statefulset(kvc, replicas).unwrap()).unwrap();
        sts["status"] = json!({"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas});
        sts
    }

    /// The applies of a reconcile of an existing cluster: the API server answers the
    /// StatefulSet's apply with the live object (status included).
    fn applies_to_existing(live: Value) -> Vec<crate::k8s::fixtures::Expect> {
        let mut script = applies();
        script.pop();
        script.push(expect("PATCH", STS, Reply::Json(live)));
        script
    }

    fn fleet(pods: &[(&str, NodeState, u32)]) -> FleetView {
        fleet_status(pods, 0)
    }

    fn find<'a>(calls: &'a [Recorded], method: &str, path: &str) -> Vec<&'a Recorded> {
        calls.iter().filter(|c| c.method == method && c.path == path).collect()
    }

    /// Every request the reconcile tests saw, for the RBAC test.
    pub(crate) async fn all_reconcile_calls() -> Vec<Recorded> {
        let mut calls = Vec::new();
        calls.extend(creates_everything_with_server_side_apply().await);
        calls.extend(scale_in_drains_before_the_statefulset_shrinks().await);
        calls.extend(an_invalid_spec_is_refused_without_touching_anything().await);
        calls.extend(drain_first_update_restarts_a_pod_only_once_it_is_empty().await);
        calls.extend(growing_storage_resizes_claims_then_recreates_the_statefulset().await);
        calls
    }

    async fn creates_everything_with_server_side_apply() -> Vec<Recorded> {
        let kvc = cluster("demo", 3);
        let mut script = vec![expect("GET", STS, Reply::NotFound)];
        script.extend(applies());
        script.push(expect("POST", EVENTS, Reply::Echo));
        script.push(expect("PATCH", STATUS, status_reply(&kvc)));
        let (action, calls, ensured) = reconcile_once(&kvc, None, script).await;
        assert_eq!(action, Action::requeue(REFRESH));
        assert_eq!(ensured, 1, "the resharding loop is started");

        for apply in calls.iter().filter(|c| c.method == "PATCH" && !c.path.ends_with("/status")) {
            assert!(apply.query.contains("fieldManager=kvfleet-operator"), "{}: {}", apply.path, apply.query);
            assert!(apply.query.contains("force=true"), "{}: {}", apply.path, apply.query);
            assert!(apply.body["apiVersion"].is_string() && apply.body["kind"].is_string(), "{}", apply.path);
            assert_eq!(apply.body["metadata"]["ownerReferences"][0]["kind"], "KeyValueCluster", "{}", apply.path);
        }
        let sts = find(&calls, "PATCH", STS)[0];
        assert_eq!(sts.body["spec"]["replicas"], 3);
        // The pods take the admin token from the Secret the operator derived it into.
        let secret = find(&calls, "PATCH", "/api/v1/namespaces/ns/secrets/demo-admin-token")[0];
        let token = test_key().token_for(&kvc).expect("a token");
        let encoded = serde_json::to_value(k8s_openapi::ByteString(token.into_bytes())).unwrap();
        assert_eq!(secret.body["data"]["token"], encoded);
        let env = &sts.body["spec"]["template"]["spec"]["containers"][0]["env"];
        let from_secret = env.as_array().unwrap().iter().find(|e| e["name"] == "KVFLEET_ADMIN_TOKEN").expect("env");
        assert_eq!(from_secret["valueFrom"]["secretKeyRef"]["name"], "demo-admin-token");
        let event = find(&calls, "POST", EVENTS)[0];
        assert_eq!(event.body["reason"], "Created");
        assert_eq!(event.body["regarding"]["name"], "demo");
        let status = &find(&calls, "PATCH", STATUS)[0].body["status"];
        assert_eq!(status["phase"], "Creating");
        assert_eq!(status["observedGeneration"], 1);
        calls
    }

    async fn scale_in_drains_before_the_statefulset_shrinks() -> Vec<Recorded> {
        let mut kvc = cluster("demo", 5);
        kvc.spec.replicas = 3;
        let mut calls = Vec::new();

        // Step 1: pods 3 and 4 still hold ranges: the StatefulSet stays at 5, no event.
        let live = existing_statefulset(&kvc, 5);
        let mut script = vec![expect("GET", STS, Reply::Json(live.clone()))];
        script.extend(applies_to_existing(live));
        script.push(expect("PATCH", STATUS, status_reply(&kvc)));
        let holding = fleet(&[("demo-0", Up, 3), ("demo-3", Draining, 2), ("demo-4", Draining, 1)]);
        let (action, step1, _) = reconcile_once(&kvc, Some(holding), script).await;
        assert_eq!(action, Action::requeue(REFRESH_WHILE_SCALING));
        assert_eq!(find(&step1, "PATCH", STS)[0].body["spec"]["replicas"], 5, "no volume holding a range goes");
        let status = &find(&step1, "PATCH", STATUS)[0].body["status"];
        assert_eq!(status["phase"], "Scaling");
        let progressing = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Progressing").unwrap();
        assert_eq!(progressing["status"], "True");
        let message = progressing["message"].as_str().unwrap();
        assert!(message.contains("moving ranges off demo-3 (2 ranges), demo-4 (1 ranges)"), "{message}");
        calls.extend(step1);

        // Step 2: both empty: the StatefulSet shrinks to 3, and an event says so.
        let live = existing_statefulset(&kvc, 5);
        let mut script = vec![expect("GET", STS, Reply::Json(live.clone()))];
        script.extend(applies_to_existing(live));
        script.push(expect("POST", EVENTS, Reply::Echo));
        script.push(expect("PATCH", STATUS, status_reply(&kvc)));
        let empty = fleet(&[("demo-0", Up, 6), ("demo-3", Draining, 0), ("demo-4", Draining, 0)]);
        let (_, step2, _) = reconcile_once(&kvc, Some(empty), script).await;
        assert_eq!(find(&step2, "PATCH", STS)[0].body["spec"]["replicas"], 3);
        let event = find(&step2, "POST", EVENTS)[0];
        assert_eq!(event.body["reason"], "ScaledIn");
        assert!(event.body["note"].as_str().unwrap().contains("from 5 to 3"));
        calls.extend(step2);
        calls
    }

    async fn an_invalid_spec_is_refused_without_touching_anything() -> Vec<Recorded> {
        // CEL refuses this at the API server; a CRD applied before the rule existed would not.
        let mut kvc = cluster("demo", 3);
        kvc.spec.sharding.split_qps = Some(100.0);
        kvc.spec.sharding.merge_below_qps = Some(500.0);
        let script = vec![
            expect("GET", STS, Reply::NotFound),
            expect("POST", EVENTS, Reply::Echo),
            expect("PATCH", STATUS, status_reply(&kvc)),
        ];
        let (_, calls, ensured) = reconcile_once(&kvc, None, script).await;
        assert_eq!(ensured, 0, "no resharding for a refused spec");
        let event = find(&calls, "POST", EVENTS)[0];
        assert_eq!(
            (event.body["type"].as_str(), event.body["reason"].as_str()),
            (Some("Warning"), Some("InvalidSpec"))
        );
        assert_eq!(
            event.body["note"],
            "spec.sharding.mergeBelowQps must be below spec.sharding.splitQps (default 2000)"
        );
        let status = &find(&calls, "PATCH", STATUS)[0].body["status"];
        assert_eq!(status["phase"], "Degraded");
        calls
    }

    const PODS: &str = "/api/v1/namespaces/ns/pods";

    /// The pods of a StatefulSet being updated: all still at the old revision, ready.
    fn old_pods(count: usize) -> Reply {
        let items: Vec<Value> = (0..count)
            .map(|i| {
                json!({"metadata": {"name": format!("demo-{i}"), "uid": format!("uid-{i}"),
                                    "labels": {"controller-revision-hash": "demo-old"}},
                       "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
            })
            .collect();
        Reply::Json(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}))
    }

    async fn drain_first_update_restarts_a_pod_only_once_it_is_empty() -> Vec<Recorded> {
        let mut kvc = cluster("demo", 3);
        kvc.spec.update_strategy.type_ = UpdateType::DrainFirst;
        let mut live = existing_statefulset(&kvc, 3);
        live["status"]["updatedReplicas"] = json!(0);
        live["status"]["currentRevision"] = json!("demo-old");
        live["status"]["updateRevision"] = json!("demo-new");
        let mut calls = Vec::new();

        // Round 1: demo-2 (highest ordinal) still serves ranges: it is named for draining, not deleted.
        let mut script = vec![expect("GET", STS, Reply::Json(live.clone()))];
        script.extend(applies_to_existing(live.clone()));
        script.push(expect("GET", PODS, old_pods(3)));
        script.push(expect("POST", EVENTS, Reply::Echo));
        script.push(expect("PATCH", STATUS, status_reply(&kvc)));
        let serving = fleet(&[("demo-0", Up, 2), ("demo-1", Up, 2), ("demo-2", Up, 2)]);
        let (action, round1, _) = reconcile_once(&kvc, Some(serving), script).await;
        assert_eq!(action, Action::requeue(REFRESH_WHILE_SCALING));
        assert_eq!(find(&round1, "PATCH", STS)[0].body["spec"]["updateStrategy"]["type"], "OnDelete");
        assert!(find(&round1, "GET", PODS)[0].query.contains("labelSelector="), "only this cluster's pods are listed");
        assert_eq!(find(&round1, "POST", EVENTS)[0].body["reason"], "DrainingForUpdate");
        let status = find(&round1, "PATCH", STATUS)[0].body["status"].clone();
        assert_eq!(status["phase"], "Updating");
        assert_eq!(status["rollout"], json!({"drainingPod": "demo-2", "outdatedPods": 3}));
        calls.extend(round1);

        // Round 2: the resharding loop drained demo-2: exactly that pod (by uid) is deleted.
        let mut kvc = kvc.clone();
        kvc.status = serde_json::from_value(status).expect("the status written reads back");
        let mut script = vec![expect("GET", STS, Reply::Json(live.clone()))];
        script.extend(applies_to_existing(live));
        script.push(expect("GET", PODS, old_pods(3)));
        script.push(expect(
            "DELETE",
            format!("{PODS}/demo-2"),
            Reply::Json(json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "demo-2"}})),
        ));
        script.push(expect("POST", EVENTS, Reply::Echo));
        script.push(expect("PATCH", STATUS, status_reply(&kvc)));
        let drained = fleet(&[("demo-0", Up, 3), ("demo-1", Up, 3), ("demo-2", Draining, 0)]);
        let (_, round2, _) = reconcile_once(&kvc, Some(drained), script).await;
        assert_eq!(find(&round2, "DELETE", &format!("{PODS}/demo-2"))[0].body["preconditions"]["uid"], "uid-2");
        let event = find(&round2, "POST", EVENTS)[0];
        assert_eq!(event.body["reason"], "RestartingPod");
        assert!(event.body["note"].as_str().unwrap().contains("demo-2 holds no ranges"), "{}", event.body["note"]);
        calls.extend(round2);
        calls
    }

    fn sized(replicas: i32, size: &str) -> KeyValueCluster {
        let mut kvc = cluster("demo", replicas);
        kvc.spec.storage.size = size.into();
        kvc
    }

    async fn growing_storage_resizes_claims_then_recreates_the_statefulset() -> Vec<Recorded> {
        let mut kvc = sized(3, "20Gi");
        kvc.spec.storage.on_delete = crate::k8s::crd::VolumePolicy::Delete;
        let mut live = existing_statefulset(&sized(3, "10Gi"), 3);
        live["metadata"]["uid"] = json!("sts-uid");
        let claim = |i: i32| format!("/api/v1/namespaces/ns/persistentvolumeclaims/data-demo-{i}");
        let mut calls = Vec::new();

        // Round 1: every claim grows, the volumes are retained, the StatefulSet goes (orphaning its pods).
        let mut script = vec![expect("GET", STS, Reply::Json(live.clone()))];
        script.extend((0..3).map(|i| expect("PATCH", claim(i), Reply::Echo)));
        script.push(expect("PATCH", STS, Reply::Json(live.clone())));
        script.push(expect("DELETE", STS, Reply::Json(live.clone())));
        script.push(expect("POST", EVENTS, Reply::Echo));
        let (action, round1, _) = reconcile_once(&kvc, None, script).await;
        assert_eq!(action, Action::requeue(REFRESH_WHILE_SCALING));
        for i in 0..3 {
            assert_eq!(find(&round1, "PATCH", &claim(i))[0].body["spec"]["resources"]["requests"]["storage"], "20Gi");
        }
        let retain = find(&round1, "PATCH", STS)[0];
        assert_eq!(retain.body["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"], "Retain");
        let delete = find(&round1, "DELETE", STS)[0];
        assert_eq!(delete.body["propagationPolicy"], "Orphan", "pods and volumes outlive the StatefulSet");
        assert_eq!(delete.body["preconditions"]["uid"], "sts-uid");
        assert_eq!(find(&round1, "POST", EVENTS)[0].body["reason"], "VolumesResized");
        calls.extend(round1);

        // Round 2: the StatefulSet is gone: created again with the new claim size.
        kvc.status = Some(crate::k8s::crd::KeyValueClusterStatus { replicas: 3, ..Default::default() });
        let mut script = vec![expect("GET", STS, Reply::NotFound)];
        script.extend(applies());
        script.push(expect("POST", EVENTS, Reply::Echo));
        script.push(expect("PATCH", STATUS, status_reply(&kvc)));
        let (_, round2, _) = reconcile_once(&kvc, None, script).await;
        let sts = &find(&round2, "PATCH", STS)[0].body["spec"];
        assert_eq!(sts["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"], "20Gi");
        assert_eq!(sts["persistentVolumeClaimRetentionPolicy"]["whenDeleted"], "Delete");
        assert_eq!(find(&round2, "POST", EVENTS)[0].body["reason"], "StatefulSetRecreated");
        calls.extend(round2);
        calls
    }

    #[tokio::test]
    async fn reconcile_grows_volumes_then_recreates_the_statefulset() {
        growing_storage_resizes_claims_then_recreates_the_statefulset().await;
    }

    #[tokio::test]
    async fn a_claim_that_cannot_grow_keeps_the_old_size_and_says_why() {
        let kvc = sized(3, "20Gi");
        let live = existing_statefulset(&sized(3, "10Gi"), 3);
        let mut script = vec![
            expect("GET", STS, Reply::Json(live.clone())),
            expect(
                "PATCH",
                "/api/v1/namespaces/ns/persistentvolumeclaims/data-demo-0",
                Reply::Error(403, "only dynamically provisioned pvc can be resized"),
            ),
            expect("POST", EVENTS, Reply::Echo),
        ];
        script.extend(applies_to_existing(live));
        script.push(expect("PATCH", STATUS, status_reply(&kvc)));
        let (_, calls, _) = reconcile_once(&kvc, None, script).await;
        let event = find(&calls, "POST", EVENTS)[0];
        assert_eq!(
            (event.body["type"].as_str(), event.body["reason"].as_str()),
            (Some("Warning"), Some("VolumeResizeFailed"))
        );
        let note = event.body["note"].as_str().unwrap();
        assert!(note.contains("data-demo-0") && note.contains("only dynamically provisioned"), "{note}");
        let sts = &find(&calls, "PATCH", STS)[0].body["spec"];
        assert_eq!(sts["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"], "10Gi");
    }

    #[tokio::test]
    async fn reconcile_creates_everything_with_server_side_apply() {
        creates_everything_with_server_side_apply().await;
    }

    #[tokio::test]
    async fn reconcile_scale_in_drains_before_the_statefulset_shrinks() {
        scale_in_drains_before_the_statefulset_shrinks().await;
    }

    #[tokio::test]
    async fn reconcile_drain_first_update_restarts_a_pod_only_once_it_is_empty() {
        drain_first_update_restarts_a_pod_only_once_it_is_empty().await;
    }

    #[tokio::test]
    async fn reconcile_refuses_an_invalid_spec_without_touching_anything() {
        an_invalid_spec_is_refused_without_touching_anything().await;
    }

    /// Where the API server runs no CEL (before 1.25; the 1.20 of the tests), the operator itself
    /// refuses what the CRD's rules would, with the same kind of message.
    #[test]
    fn validate_refuses_what_the_crd_rules_refuse() {
        let with = |edit: &dyn Fn(&mut KeyValueCluster)| {
            let mut kvc = cluster("demo", 3);
            edit(&mut kvc);
            validate(&kvc)
        };
        assert_eq!(with(&|_| {}), Ok(()));
        type Edit<'a> = &'a dyn Fn(&mut KeyValueCluster);
        let cases: [(Edit, &str); 10] = [
            (&|k| k.metadata.name = Some("a".repeat(53)), "must be a DNS-1035 label of at most 52"),
            (&|k| k.metadata.name = Some("Demo".into()), "must be a DNS-1035 label"),
            (
                &|k| {
                    k.spec.replicas = 1;
                    k.spec.update_strategy.type_ = crate::k8s::crd::UpdateType::DrainFirst;
                },
                "DrainFirst needs at least 2 replicas",
            ),
            (
                &|k| k.spec.resources = serde_json::from_value(json!({"limits": {"memory": "lots"}})).unwrap(),
                "spec.resources.limits.memory is \"lots\", not a quantity",
            ),
            (
                &|k| {
                    let resources = json!({"requests": {"memory": "4Gi"}, "limits": {"memory": "2Gi"}});
                    k.spec.resources = serde_json::from_value(resources).unwrap();
                },
                "spec.resources.requests.memory exceeds spec.resources.limits.memory",
            ),
            (
                &|k| k.spec.scheduling.tolerations = serde_json::from_value(json!([{"operator": "Matches"}])).unwrap(),
                "operator \"Matches\" must be Exists or Equal",
            ),
            (
                &|k| k.spec.scheduling.tolerations = serde_json::from_value(json!([{"effect": "Sometimes"}])).unwrap(),
                "effect \"Sometimes\" must be NoSchedule, PreferNoSchedule or NoExecute",
            ),
            (
                &|k| {
                    let toleration = json!([{"key": "dedicated", "operator": "Exists", "value": "kv"}]);
                    k.spec.scheduling.tolerations = serde_json::from_value(toleration).unwrap();
                },
                "operator Exists must not have a value",
            ),
            (&|k| k.spec.ports.admin = 70000, "spec.ports.admin is 70000; it must be a port number (1-65535)"),
            (&|k| k.spec.ports.metrics = k.spec.ports.grpc, "spec.ports.grpc and spec.ports.metrics must differ"),
        ];
        for (edit, expected) in cases {
            let refused = with(edit).expect_err(expected);
            assert!(refused.contains(expected), "{refused:?} should say {expected:?}");
        }
    }
}
