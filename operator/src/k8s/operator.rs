//! `kvfleet-operator run`: the in-cluster operator. Serves metrics and health, waits to lead
//! (Lease), then reconciles KeyValueClusters and runs one resharding loop per cluster until it
//! is stopped or loses the lease.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::events::Reporter;
use kube::runtime::watcher;
use kube::{Api, Client};
use parking_lot::Mutex;
use prometheus_client::registry::Registry;

use super::admin_auth::AdminKey;
use super::build::MANAGER;
use super::crd::KeyValueCluster;
use super::fleet::FleetManager;
use super::leader::{self, LeaseConfig};
use super::reconcile::{self, Context, ReconcileMetrics};
use super::server::{PdbVersion, ServerCapabilities};
use crate::error::OperatorError;
use kvfleet_resharding::leadership::Leadership;
use kvfleet_resharding::resharding_loop::LoopConfig;

#[derive(Debug, Clone, clap::Args)]
pub struct OperatorArgs {
    /// Watch KeyValueClusters in this namespace only (default: every namespace).
    #[arg(long, env = "KVFLEET_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Metrics (/metrics) and health (/healthz) listen address.
    #[arg(long, env = "KVFLEET_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kvfleet-system")]
    pub lease_namespace: String,
    #[arg(long, env = "KVFLEET_LEASE_NAME", default_value = "kvfleet-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease (its pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// The key each cluster's admin token is derived from (at least 32 bytes; the chart keeps it
    /// in a Secret). Without it the nodes' admin API is open to anything that can reach them.
    #[arg(long, env = "KVFLEET_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// A storage pod not Ready this many seconds after its creation is reported (a Warning Event
    /// and the Ready and Degraded conditions, with the scheduler's or the kubelet's reason).
    #[arg(long, env = "KVFLEET_POD_READY_TIMEOUT_SECS", default_value_t = 120)]
    pub pod_ready_timeout_secs: u64,
    /// Give each cluster a NetworkPolicy that opens its nodes' admin port to the operator's pods
    /// only (their namespace and the chart's `app.kubernetes.io/name: kvfleet-operator`).
    #[arg(long, env = "KVFLEET_NODE_NETWORK_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
    pub node_network_policy: bool,
    /// Seconds between two resharding rounds of a cluster.
    #[arg(long, env = "KVFLEET_RESHARD_INTERVAL_SECS", default_value_t = 5)]
    pub interval_secs: u64,
    /// Seconds a node may not answer before the replicas it holds of replicated ranges are
    /// re-created on other nodes (TiKV PD's max-store-down-time). A pod that comes back later
    /// drops them. Single copies are never replaced.
    #[arg(long, env = "KVFLEET_REPLACE_DOWN_AFTER_SECS", default_value_t = 1800, value_parser = clap::value_parser!(u64).range(10..))]
    pub replace_down_after_secs: u64,
}

pub async fn run(args: OperatorArgs) -> Result<(), OperatorError> {
    let admin_key = match args.admin_key.as_deref() {
        Some(key) => Some(AdminKey::new(key).map_err(|e| OperatorError::Invalid(format!("--admin-key: {e}")))?),
        None => {
            tracing::warn!("no --admin-key (KVFLEET_ADMIN_KEY): the nodes' admin API is open to every pod");
            None
        }
    };
    let identity = args.identity.clone().unwrap_or_else(|| format!("kvfleet-operator-{}", std::process::id()));
    let leadership = Leadership::elected();
    let client = api_client(&identity, &leadership).await?;
    let registry = Arc::new(Mutex::new(Registry::default()));
    let metrics = ReconcileMetrics::register(&mut registry.lock());
    let encode_registry = registry.clone();
    kvfleet_proto::metrics_http::spawn_with(
        args.metrics_listen,
        move |body: &mut String| prometheus_client::encoding::text::encode(body, &encode_registry.lock()),
        kvfleet_proto::metrics_http::Readiness::ready(),
        std::future::pending(),
    );

    let lease = LeaseConfig::new(args.lease_namespace.clone(), args.lease_name.clone(), identity.clone());
    tokio::select! {
        _ = leader::acquire(client.clone(), &lease, &leadership) => {}
        _ = shutdown_signal() => return Ok(()),
    }

    let reporter = Reporter { controller: "kvfleet-operator".into(), instance: Some(identity) };
    let base = LoopConfig {
        interval: Duration::from_secs(args.interval_secs.max(1)),
        replace_down_after: Duration::from_secs(args.replace_down_after_secs),
        leadership: leadership.clone(),
        ..LoopConfig::default()
    };
    let fleets = Arc::new(FleetManager::new(client.clone(), reporter.clone(), base, registry, admin_key.clone()));
    let recorder = kube::runtime::events::Recorder::new(client.clone(), reporter);
    let server = ServerCapabilities::discover(&client).await;
    tracing::info!(?server, "what the API server serves");
    let context = Arc::new(Context {
        client: client.clone(),
        fleets,
        recorder,
        metrics,
        server,
        leadership: leadership.clone(),
        admin_key,
        pod_ready_timeout: Duration::from_secs(args.pod_ready_timeout_secs),
        applied: Default::default(),
        network_policy: args.node_network_policy.then(|| super::build::OperatorPods::of_chart(&args.lease_namespace)),
    });

    let scope = args.watch_namespace.as_deref();
    // Only the objects this operator manages are watched (and cached).
    let managed = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    let mut controller =
        kube::runtime::Controller::new(scoped::<KeyValueCluster>(&client, scope), watcher::Config::default())
            .owns(scoped::<StatefulSet>(&client, scope), managed.clone())
            .owns(scoped::<Service>(&client, scope), managed.clone())
            .owns(scoped::<ConfigMap>(&client, scope), managed.clone());
    // A watch of a version the server does not serve fails forever and, through the shared
    // backoff, delays every other trigger: watch PDBs only where policy/v1 is served (elsewhere
    // the periodic requeue puts a changed PDB back).
    if server.pdb_version == PdbVersion::V1 {
        controller = controller.owns(scoped::<PodDisruptionBudget>(&client, scope), managed);
    }
    let controller = controller
        .graceful_shutdown_on(shutdown_signal())
        .run(reconcile::reconcile, reconcile::error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile trigger failed");
            }
        });
    tokio::select! {
        _ = controller => {
            leader::release(client, &lease, &leadership).await;
            Ok(())
        }
        _ = leader::hold(client.clone(), &lease, &leadership) => {
            Err(OperatorError::Kubernetes("lost the leader lease; exiting so a standby takes over".into()))
        }
    }
}

/// The API client: its User-Agent names this replica (the API server's audit log then says which
/// replica made each call), and it sends no write but the leader Lease's unless this replica
/// leads, so a reconcile already under way when the replica stalled writes nothing after it.
async fn api_client(identity: &str, leadership: &Leadership) -> Result<Client, OperatorError> {
    let mut config = kube::Config::infer().await.map_err(|e| OperatorError::Kubernetes(e.to_string()))?;
    let agent = format!("kvfleet-operator/{} ({identity})", env!("CARGO_PKG_VERSION"));
    let agent = http::HeaderValue::from_str(&agent)
        .map_err(|e| OperatorError::Kubernetes(format!("identity {identity:?} cannot be sent in a header: {e}")))?;
    config.headers.push((http::header::USER_AGENT, agent));
    let leadership = leadership.clone();
    let only_while_leading = tower::filter::FilterLayer::new(move |request: http::Request<kube::client::Body>| {
        let write = request.method() != http::Method::GET;
        let lease = request.uri().path().starts_with("/apis/coordination.k8s.io/");
        if write && !lease {
            leadership.current().map_err(|e| Box::new(e) as tower::BoxError)?;
        }
        Ok::<_, tower::BoxError>(request)
    });
    let builder =
        kube::client::ClientBuilder::try_from(config).map_err(|e| OperatorError::Kubernetes(e.to_string()))?;
    Ok(builder.with_layer(&only_while_leading).build())
}

/// An API over one namespace, or over every namespace when `namespace` is None.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
