//! One resharding loop per KeyValueCluster: started by the reconciler, restarted when the
//! sharding policy changes, ended when the cluster is deleted. Its status feeds the reconciler
//! (scale-in, the resource's status) and its events become Kubernetes Events on the cluster.

use std::collections::HashMap;
use std::sync::Arc;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use kvfleet_planner::Policy;
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::admin_auth::AdminKey;
use super::build::{Names, cluster_key};
use super::crd::KeyValueCluster;
use super::platform::KubernetesPlatform;
use kvfleet_resharding::fleet::FleetView;
use kvfleet_resharding::status::{LoopMetrics, StatusBoard};
use kvfleet_resharding::{LoopConfig, ReshardingLoop};

/// What the reconciler needs of the resharding loops (a fake stands in for it in tests).
pub trait Fleets: Send + Sync + 'static {
    /// The last round's view of a cluster (`namespace/name`), if a round ran.
    fn status(&self, key: &str) -> Option<FleetView>;
    /// Runs the cluster's loop with the spec's policy (starts it, or restarts it on a change).
    fn ensure(&self, kvc: &KeyValueCluster, names: &Names);
}

struct Fleet {
    policy: Policy,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

pub struct FleetManager {
    client: Client,
    /// Derives each cluster's admin token (none: admin calls go unauthenticated).
    admin_key: Option<AdminKey>,
    reporter: Reporter,
    base: LoopConfig,
    /// Every cluster's series, labelled `cluster`; a deleted cluster's are removed.
    metrics: Arc<LoopMetrics>,
    fleets: Mutex<HashMap<String, Fleet>>,
    /// One per cluster, kept across restarts of its loop (a policy change); dropped, and its
    /// series removed, when the cluster is deleted.
    boards: Arc<Mutex<HashMap<String, StatusBoard>>>,
}

impl FleetManager {
    pub fn new(
        client: Client,
        reporter: Reporter,
        base: LoopConfig,
        registry: Arc<Mutex<Registry>>,
        admin_key: Option<AdminKey>,
    ) -> Self {
        FleetManager {
            client,
            admin_key,
            reporter,
            base,
            metrics: LoopMetrics::register(&mut registry.lock()),
            fleets: Mutex::new(HashMap::new()),
            boards: Default::default(),
        }
    }

    fn board(&self, key: &str) -> StatusBoard {
        self.boards
            .lock()
            .entry(key.to_string())
            .or_insert_with(|| StatusBoard::for_fleet(self.metrics.clone(), vec![("cluster", key.to_string())]))
            .clone()
    }

    fn start(&self, kvc: &KeyValueCluster, names: &Names, policy: Policy, after: Option<Fleet>) -> Fleet {
        let key = cluster_key(kvc);
        let board = self.board(&key);
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        board.set_event_sink(events_tx);
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let object = kvc.object_ref(&());
        tokio::spawn(forward_events(events_rx, recorder, object));

        let platform =
            Arc::new(KubernetesPlatform::new(self.client.clone(), names.clone(), self.base.leadership.clone()));
        let admin_token = self.admin_key.as_ref().map(|key| key.admin_token(kvc)).unwrap_or_default();
        let replication_factor = kvc.spec.replication_factor();
        let config = LoopConfig { policy: policy.clone(), admin_token, replication_factor, ..self.base.clone() };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let boards = self.boards.clone();
        let task = tokio::spawn(async move {
            if let Some(previous) = after {
                // The old loop saves its state on the way out; the new one starts from it.
                let _ = previous.shutdown.send(true);
                let _ = previous.task.await;
            }
            let stopped = shutdown_rx.clone();
            let ended = board.clone();
            let result = async { ReshardingLoop::new(platform, config, board).await?.run(shutdown_rx).await }.await;
            match result {
                // Not stopped, yet ended: its cluster is gone, and so are its series.
                Ok(()) if !*stopped.borrow() => {
                    ended.retire();
                    boards.lock().remove(&key);
                    tracing::info!(cluster = %key, "resharding loop ended: the cluster was deleted");
                }
                Ok(()) => tracing::info!(cluster = %key, "resharding loop stopped"),
                Err(error) => tracing::error!(cluster = %key, %error, "resharding loop failed"),
            }
        });
        Fleet { policy, shutdown, task }
    }
}

impl Fleets for FleetManager {
    fn status(&self, key: &str) -> Option<FleetView> {
        let board = self.boards.lock().get(key).cloned()?;
        Some(board.fleet()).filter(|f| f.round > 0)
    }

    fn ensure(&self, kvc: &KeyValueCluster, names: &Names) {
        let key = cluster_key(kvc);
        let policy = kvc.spec.sharding.policy();
        let mut fleets = self.fleets.lock();
        let fleet = match fleets.remove(&key) {
            Some(fleet) if fleet.policy == policy && !fleet.task.is_finished() => fleet,
            Some(fleet) if !fleet.task.is_finished() => {
                tracing::info!(cluster = %key, "sharding policy changed; restarting the resharding loop");
                self.start(kvc, names, policy, Some(fleet))
            }
            _ => self.start(kvc, names, policy, None),
        };
        fleets.insert(key, fleet);
    }
}

async fn forward_events(
    mut events: tokio::sync::mpsc::UnboundedReceiver<kvfleet_resharding::status::BoardEvent>,
    recorder: Recorder,
    object: k8s_openapi::api::core::v1::ObjectReference,
) {
    while let Some(event) = events.recv().await {
        let published = recorder
            .publish(
                &Event {
                    type_: if event.warning { EventType::Warning } else { EventType::Normal },
                    reason: event.reason.into(),
                    note: Some(event.text),
                    action: "Reshard".into(),
                    secondary: None,
                },
                &object,
            )
            .await;
        if let Err(error) = published {
            tracing::warn!(%error, "publishing an event failed");
        }
    }
}
