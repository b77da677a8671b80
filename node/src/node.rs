//! The node's core: serving keys only from ranges it owns (limits, ownership, gates, load
//! accounting around each storage call), metadata-only splits, and load reports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_proto::RangeBounds;
use kvfleet_proto::v1::{
    LoadReportResponse, Mutation, NotOwner, RangeDescriptor, RangeLoad as RangeLoadReport, RangeState, RequestHeader,
    ResponseHeader, SplitRangeRequest, mutation::Op as MutationOp,
};
use parking_lot::RwLock;
use tokio::sync::OwnedRwLockReadGuard;

use crate::config::NodeConfig;
use crate::error::NodeError;
use crate::load::RangeLoad;
use crate::metrics::NodeMetrics;
use crate::ranges::{
    NODE_ID_KEY, OwnedRange, RANGE_PREFIX, RangeTable, bootstrap_descriptor, decode_descriptor, descriptor_write,
};
use crate::replica::{Campaign, OpenGroup, RangeChange, ReadMode, ReplicaError, Replication, raft_id_of};
use crate::storage::{CF_META, Storage, WriteOp};

/// Most bytes one Scan page carries, whatever its pair limit.
const MAX_SCAN_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// How long a request waits on a frozen range before answering UNAVAILABLE (the client retries).
const FROZEN_WAIT: Duration = Duration::from_secs(5);
/// How many times a request re-routes after racing with a split before giving up.
const MAX_REROUTES: usize = 8;

pub struct Node {
    pub config: NodeConfig,
    pub address: String,
    pub storage: Storage,
    pub metrics: NodeMetrics,
    /// Shared with the Raft thread, which installs the splits replicated ranges apply.
    pub(crate) table: Arc<RwLock<RangeTable>>,
    started: Instant,
    pub(crate) peers: crate::peers::Peers,
    pub(crate) fence: crate::fencing::Fence,
    /// Admin calls must carry it (none: open).
    pub(crate) admin_token: kvfleet_proto::admin_auth::AdminToken,
    /// The Raft groups of this node's replicated ranges.
    pub replication: Arc<Replication>,
    /// Ranges whose keys a split or a merge proposed here is changing (see `KeyChanges`).
    pub(crate) key_changes: KeyChanges,
}

/// The ranges a split, or a merge from before its freeze to its end, is under way on here: one
/// at a time per range. The freeze records the left range's generation, which a split would
/// bump: the frozen range could then be neither merged nor thawed.
#[derive(Default)]
pub(crate) struct KeyChanges(parking_lot::Mutex<std::collections::HashSet<u64>>);

impl KeyChanges {
    /// Claims `range_id` until the claim is dropped; refused while another claim holds it.
    pub(crate) fn claim(&self, range_id: u64) -> Result<KeyChangeClaim<'_>, NodeError> {
        if !self.0.lock().insert(range_id) {
            // Transient (the other one ends soon): callers retry it as they retry an election.
            return Err(NodeError::Unavailable(format!(
                "a split or merge of range {range_id} is under way on this node; retry once it is done"
            )));
        }
        Ok(KeyChangeClaim { changes: self, range_id })
    }
}

pub(crate) struct KeyChangeClaim<'a> {
    changes: &'a KeyChanges,
    range_id: u64,
}

impl Drop for KeyChangeClaim<'_> {
    fn drop(&mut self) {
        self.changes.0.lock().remove(&self.range_id);
    }
}

/// A range held for the duration of one request (shared side of its gate).
pub struct RangeLease {
    pub range: Arc<OwnedRange>,
    _guard: OwnedRwLockReadGuard<()>,
}

impl RangeLease {
    pub fn response_header(&self, node_id: &str) -> ResponseHeader {
        ResponseHeader {
            range_id: self.range.desc.range_id,
            generation: self.range.desc.generation,
            node_id: node_id.to_string(),
        }
    }
}

pub struct ScanPage {
    pub header: ResponseHeader,
    pub pairs: Vec<(Bytes, Bytes)>,
    pub resume_key: Option<Bytes>,
}

impl Node {
    /// Opens storage, checks the data directory belongs to this node, recovers the persisted
    /// range descriptors, and bootstraps the first range if asked to and none exist.
    pub async fn open(config: NodeConfig, metrics: NodeMetrics) -> Result<Self, NodeError> {
        let address = config.advertise_address();
        let storage = Storage::open(
            &config.data_dir,
            config.durability,
            config.fsync_interval(),
            config.max_key_bytes,
            metrics.storage.clone(),
        )?;
        match storage.meta_get(NODE_ID_KEY)? {
            Some(stored) if stored != config.node_id.as_bytes() => {
                return Err(NodeError::Invalid(format!(
                    "data directory {} belongs to node {:?}, not {:?}",
                    config.data_dir.display(),
                    String::from_utf8_lossy(&stored),
                    config.node_id
                )));
            }
            Some(_) => {}
            None => {
                let op = WriteOp::Put {
                    cf: CF_META,
                    key: Bytes::from_static(NODE_ID_KEY),
                    value: Bytes::from(config.node_id.clone().into_bytes()),
                };
                storage.write_durable(vec![op]).await?;
            }
        }

        let mut table = RangeTable::new(config.node_id.clone());
        let window = config.load_window_secs as usize;
        let accounting = config.load_accounting;
        for (key, value) in storage.meta_entries(RANGE_PREFIX)? {
            let mut desc = decode_descriptor(&key, &value)?;
            // The advertised address may change between runs; the stored one is only a hint.
            for replica in &mut desc.replicas {
                if replica.node_id == config.node_id {
                    replica.address = address.clone();
                }
            }
            crate::upgrade::refuse_mid_move(&desc)?;
            table.install(desc, || Arc::new(RangeLoad::new(accounting, window)))?;
        }
        let fence = crate::fencing::Fence::recover(&storage)?;
        let admin_token = match config.admin_token.as_deref() {
            None => kvfleet_proto::admin_auth::AdminToken::none(),
            Some(token) => kvfleet_proto::admin_auth::AdminToken::new(token)
                .map_err(|e| NodeError::Invalid(format!("--admin-token (KVFLEET_ADMIN_TOKEN): {e}")))?,
        };
        let raft_channels = kvfleet_client::ChannelPool::new(kvfleet_client::ChannelConfig {
            connect_timeout: Duration::from_secs(1),
            local_address: config.peer_source_ip,
            ..kvfleet_client::ChannelConfig::default()
        });
        let settings = crate::replica::ReplicationSettings {
            data_dir: config.data_dir.clone(),
            log_keep_entries: config.raft_log_keep_entries,
            snapshot_send_bytes_per_sec: config.snapshot_send_mib_per_sec.saturating_mul(1 << 20),
            key_space_end: storage.key_space_end().to_vec(),
            fast_ack: match config.replication_durability {
                crate::config::ReplicationDurability::Majority => None,
                crate::config::ReplicationDurability::Fast => Some(metrics.fast_ack.clone()),
            },
            unsynced_single_copies: config.durability == crate::config::Durability::Async,
        };
        let table = Arc::new(RwLock::new(table));
        let on_range_change: crate::replica::OnRangeChange = {
            let (table, gauge) = (table.clone(), metrics.ranges.clone());
            let (db, key_space_end) = (storage.db(), storage.key_space_end().to_vec());
            let runtime = tokio::runtime::Handle::current();
            Box::new(move |change| {
                let mut table = table.write();
                let load = || Arc::new(RangeLoad::new(accounting, window));
                let (range_id, known) = match change {
                    RangeChange::Split(split) => {
                        (split.left.range_id, table.apply_replicated_split(&split.left, &split.right, load))
                    }
                    RangeChange::Replaced(desc) => (desc.range_id, table.replace_replicated(desc)),
                    RangeChange::Added(desc) => (desc.range_id, table.add_replica(desc.clone(), load())),
                    RangeChange::Merged { left, right } => {
                        let known = table.replace_replicated(left);
                        table.retire(right.clone());
                        (left.range_id, known)
                    }
                    RangeChange::Removed(tombstone) => {
                        let range_id = tombstone.range_id;
                        let removed = table.by_id(range_id).cloned();
                        table.retire(tombstone.clone());
                        let (db, end, tombstone) = (db.clone(), key_space_end.clone(), tombstone.clone());
                        // Requests already serving from the replica finish first (its gate).
                        runtime.spawn(async move {
                            let _served = match removed {
                                Some(range) => Some(range.gate.clone().write_owned().await),
                                None => None,
                            };
                            let deleted = tokio::task::spawn_blocking(move || {
                                crate::membership::delete_removed_data(&db, &end, &tombstone)
                            })
                            .await;
                            match deleted.map_err(|e| e.to_string()).and_then(|outcome| outcome) {
                                Ok(()) => tracing::info!("deleted the data of a removed replica"),
                                Err(error) => tracing::warn!(%error, "a removed replica's data not deleted (retried at the next start)"),
                            }
                        });
                        (range_id, true)
                    }
                };
                if !known {
                    tracing::warn!(range_id, "a replicated range changed that this node does not own");
                }
                gauge.set(table.owned_count() as i64);
            })
        };
        let replication = Arc::new(Replication::start(
            &config.node_id,
            storage.db(),
            raft_channels,
            admin_token.clone(),
            settings,
            on_range_change,
        )?);
        let node = Node {
            replication,
            address,
            storage,
            metrics,
            table,
            started: Instant::now(),
            config,
            peers: crate::peers::Peers::new(admin_token.clone()),
            fence,
            admin_token,
            key_changes: KeyChanges::default(),
        };
        node.delete_removed_replicas()?;
        node.adopt_legacy_ranges()?;
        node.open_groups()?;
        if node.config.bootstrap && !node.table.read().has_history() {
            node.bootstrap().await?;
        }
        if !node.config.initial_replicas.is_empty() && !node.table.read().has_history() {
            let members = node.config.initial_members().map_err(NodeError::Invalid)?;
            node.bootstrap_replicated(members).await?;
        }
        node.update_range_gauge();
        Ok(node)
    }

    /// Creates range 1 over the whole key space as a Raft group of this node alone (a single
    /// copy), once: refused on a node with any other range history.
    pub async fn bootstrap(&self) -> Result<RangeDescriptor, NodeError> {
        self.bootstrap_replicated(vec![(self.config.node_id.clone(), self.address.clone())]).await
    }

    /// Starts the Raft group of every replicated range this node owns, from its log.
    fn open_groups(&self) -> Result<(), NodeError> {
        let log = self.log_store()?;
        // Pending snapshots first: one of a merged range retires the ranges it took.
        for desc in self.owned_ranges_raw() {
            self.install_pending_snapshot(&log, desc.range_id)?;
        }
        for desc in self.owned_ranges_raw() {
            let range_id = desc.range_id;
            let storage = log
                .open_group(range_id)
                .map_err(|e| NodeError::Corrupt(format!("the Raft log of range {range_id}: {e}")))?
                .ok_or_else(|| {
                    NodeError::Corrupt(format!("range {range_id} is replicated but this node has no Raft log for it"))
                })?;
            self.start_group(&desc, storage)?;
        }
        // A replica just added whose first snapshot was taken but not installed before the stop
        // (its range is in no descriptor yet): installed now, and its group started.
        let pending = log.pending_groups().map_err(|e| NodeError::Corrupt(format!("the Raft logs: {e}")))?;
        for range_id in pending.into_iter().filter(|id| self.table.read().by_id(*id).is_none()) {
            let storage = log
                .open_group(range_id)
                .map_err(|e| NodeError::Corrupt(format!("the Raft log of range {range_id}: {e}")))?;
            let (Some(storage), Some(desc)) = (storage, self.install_pending_snapshot(&log, range_id)?) else {
                continue;
            };
            self.start_group(&desc, storage)?;
        }
        // Every pending snapshot is installed: files left from before (made for followers, or
        // fetched and never taken) are of no use any more.
        self.replication.snapshot_files().remove_all();
        Ok(())
    }

    /// Installs the snapshot `range_id`'s group took before the node stopped, if its data was
    /// not installed yet, and the range table learns what changed. Returns the range's
    /// descriptor if a snapshot was installed.
    pub(crate) fn install_pending_snapshot(
        &self,
        log: &kvfleet_replication::LogStore,
        range_id: u64,
    ) -> Result<Option<RangeDescriptor>, NodeError> {
        let pending = log
            .pending_snapshot(range_id)
            .map_err(|e| NodeError::Corrupt(format!("the Raft log of range {range_id}: {e}")))?;
        let Some(pending) = pending else { return Ok(None) };
        let installer = crate::replica::snapshot::Installer {
            db: self.storage.db(),
            log: log.clone(),
            files: self.replication.snapshot_files().clone(),
        };
        let outcome = installer
            .install(range_id, pending.index, pending.term, &pending.data)
            .map_err(|e| NodeError::Corrupt(format!("range {range_id}: installing its snapshot again: {e}")))?;
        if let Some(newer) = outcome.obsolete {
            tracing::warn!(range_id, newer, "a snapshot of a range merged into another here was not installed");
        }
        let (changed, retired) = (outcome.changed, outcome.retired);
        let mut table = self.table.write();
        for tombstone in retired {
            tracing::info!(range_id, taken = tombstone.range_id, "the snapshot retired a range it took");
            table.retire(tombstone);
        }
        match changed {
            Some(crate::replica::snapshot::Installed::Added(desc)) => {
                table.add_replica(desc, self.new_load());
            }
            Some(crate::replica::snapshot::Installed::Replaced { desc, .. }) => {
                table.replace_replicated(&desc);
            }
            None => {}
        }
        tracing::info!(range_id, index = pending.index, "installed a snapshot taken before the restart");
        Ok(table.by_id(range_id).map(|range| range.desc.clone()))
    }

    /// Stops the Raft thread after its current pass, then the write pipelines after the writes
    /// already queued, and fsyncs the WAL. Later writes fail.
    pub fn shutdown(&self) -> Result<(), NodeError> {
        self.replication.stop();
        self.storage.shutdown()
    }

    pub(crate) fn log_store(&self) -> Result<kvfleet_replication::LogStore, NodeError> {
        kvfleet_replication::LogStore::with_db(self.storage.db())
            .map_err(|e| NodeError::Corrupt(format!("opening the Raft logs: {e}")))
    }

    /// Starts the Raft group of `desc`'s range over `storage`, from the index its data reflects.
    pub(crate) fn start_group(
        &self,
        desc: &RangeDescriptor,
        storage: kvfleet_replication::GroupStorage,
    ) -> Result<(), NodeError> {
        let range_id = desc.range_id;
        let applied = crate::replica::apply::applied_index(&self.storage.db(), range_id)
            .map_err(|e| NodeError::Corrupt(format!("range {range_id}: {e}")))?;
        // A single copy's one voter campaigns without waiting for raft-rs's randomized election
        // timeout (nobody else can lead it; a campaign wrongly judged so is refused by the
        // others), once the node has been up one election timeout (see the driver's `open`).
        let lone_voter = matches!(desc.replicas.as_slice(), [only] if only.node_id == self.config.node_id);
        let campaign = if lone_voter { Campaign::OnceVotesOpen } else { Campaign::OnTimeout };
        self.open_group(desc, storage, applied, campaign)
    }

    pub(crate) fn open_group(
        &self,
        desc: &RangeDescriptor,
        storage: kvfleet_replication::GroupStorage,
        applied: u64,
        campaign: Campaign,
    ) -> Result<(), NodeError> {
        let members = desc.replicas.iter().map(|r| (r.raft_id, r.address.clone())).collect();
        self.replication
            .open(OpenGroup {
                range_id: desc.range_id,
                storage,
                applied,
                members,
                campaign,
                span: crate::replica::snapshot::Span::of(desc),
            })
            .map_err(|e| NodeError::Unavailable(e.to_string()))
    }

    /// Creates range 1 over the whole key space as a Raft group of `members` (node id, address),
    /// once. Every listed node does the same; the first listed campaigns at once. Asked again
    /// with the same nodes while range 1 still has exactly them, answers the range it made (a
    /// caller retrying after a lost answer); refused on a node with any other range history,
    /// before anything is written.
    pub async fn bootstrap_replicated(&self, members: Vec<(String, String)>) -> Result<RangeDescriptor, NodeError> {
        crate::config::check_members("the bootstrap's replicas", &members, &self.config.node_id)
            .map_err(NodeError::Invalid)?;
        if let Some(made) = self.bootstrapped_with(&members) {
            return Ok(made);
        }
        if self.table.read().has_history() {
            return Err(NodeError::Move(format!(
                "node {} already holds or held ranges; a fleet is bootstrapped only once",
                self.config.node_id
            )));
        }
        let replicas: Vec<kvfleet_proto::v1::Replica> = members
            .iter()
            .map(|(node_id, address)| kvfleet_proto::v1::Replica {
                node_id: node_id.clone(),
                address: address.clone(),
                role: kvfleet_proto::v1::ReplicaRole::Follower as i32,
                raft_id: raft_id_of(node_id),
                ..Default::default()
            })
            .collect();
        let desc = RangeDescriptor { replicas, ..bootstrap_descriptor(&self.config.node_id, &self.address) };
        let voters: Vec<u64> = desc.replicas.iter().map(|r| r.raft_id).collect();
        let log = self.log_store()?;
        // The log first: a crash before the descriptor is written leaves a log that the next
        // attempt reuses.
        let storage = match log.open_group(desc.range_id) {
            Ok(Some(storage)) => Ok(storage),
            Ok(None) => log.create_group_at_start(desc.range_id, &voters),
            Err(error) => Err(error),
        }
        .map_err(|e| NodeError::Corrupt(format!("creating the Raft log of range 1: {e}")))?;
        self.persist(&[&desc]).await?;
        self.table.write().install(desc.clone(), || self.new_load())?;
        // Nobody has ever led the new group: its first listed replica campaigns at once.
        let first = members.first().is_some_and(|(id, _)| *id == self.config.node_id);
        let campaign = if first { Campaign::Now } else { Campaign::OnTimeout };
        self.open_group(&desc, storage, kvfleet_replication::SPLIT_LOG_START, campaign)?;
        self.update_range_gauge();
        tracing::info!(replicas = members.len(), "bootstrapped range 1 covering the whole key space, replicated");
        Ok(desc)
    }

    /// Range 1 as this node bootstrapped it, if it did so replicated on exactly `members`.
    fn bootstrapped_with(&self, members: &[(String, String)]) -> Option<RangeDescriptor> {
        let desc = self.table.read().owned().find(|r| r.desc.range_id == 1).map(|r| r.desc.clone())?;
        let mut held: Vec<&str> = desc.replicas.iter().map(|r| r.node_id.as_str()).collect();
        let mut asked: Vec<&str> = members.iter().map(|(id, _)| id.as_str()).collect();
        held.sort_unstable();
        asked.sort_unstable();
        (held == asked).then_some(desc)
    }

    /// Waits until the range may serve the read here as `mode` promises.
    async fn read_barrier(&self, lease: &RangeLease, key: &[u8], mode: ReadMode) -> Result<(), NodeError> {
        let range_id = lease.range.desc.range_id;
        let outcome = match mode {
            ReadMode::Linearizable => self.replication.read_barrier(range_id, false).await,
            ReadMode::Follower => self.replication.read_barrier(range_id, true).await,
            ReadMode::Stale(bound) => self.replication.stale_barrier(range_id, bound).await,
        };
        outcome.map_err(|error| self.replica_error(&lease.range.desc, key, error))?;
        if lease.range.is_replaced() {
            // A split applied while the read waited: the key may be in the new range now, whose
            // writes this range's read index does not cover.
            return Err(self.rerouted(&lease.range.desc, key));
        }
        Ok(())
    }

    /// The range that holds `key` as this node knows it: its own, or the best hint it has.
    fn descriptor_holding(&self, key: &[u8]) -> Option<RangeDescriptor> {
        match self.table.read().route(key, None) {
            Ok(range) => Some(range.desc.clone()),
            Err(not_owner) => not_owner.hint,
        }
    }

    /// NotOwner for a request that held `desc` while a split replaced it: the range that holds
    /// `key` now is the hint.
    fn rerouted(&self, desc: &RangeDescriptor, key: &[u8]) -> NodeError {
        let hint = self.descriptor_holding(key).map(|d| self.replication.with_roles(d));
        NodeError::NotOwner(Box::new(NotOwner {
            key: Bytes::copy_from_slice(key),
            node_id: self.config.node_id.clone(),
            hint,
            reason: format!(
                "range {} {} split while the request waited; retry on the range that holds the key now",
                desc.range_id,
                desc.span()
            ),
        }))
    }

    /// Writes `mutations` to the range through its Raft log: OK once a majority logged them
    /// (see the durability modes) and this node applied them.
    async fn write_range(&self, lease: &RangeLease, key: &[u8], mutations: Vec<Mutation>) -> Result<(), NodeError> {
        let outcome = self.replication.propose(lease.range.desc.range_id, mutations).await;
        outcome.map_err(|error| self.replica_error(&lease.range.desc, key, error))
    }

    /// What a client is told when a replicated range cannot serve it here: where the leader is
    /// (NotOwner with the descriptor, leader marked), or to retry.
    pub(crate) fn replica_error(&self, desc: &RangeDescriptor, key: &[u8], error: ReplicaError) -> NodeError {
        match error {
            ReplicaError::NotLeader { leader: Some(leader), range_id } if leader != self.replication.raft_id() => {
                let hint = crate::replica::with_leader(desc.clone(), Some(leader));
                let leader_name = hint.leader().map(|r| r.node_id.clone()).unwrap_or_default();
                NodeError::NotOwner(Box::new(NotOwner {
                    key: Bytes::copy_from_slice(key),
                    node_id: self.config.node_id.clone(),
                    hint: Some(hint),
                    reason: format!(
                        "node {} is a follower of range {range_id}; its leader is node {leader_name}",
                        self.config.node_id
                    ),
                }))
            }
            ReplicaError::NotLeader { range_id, .. } => {
                NodeError::Unavailable(format!("range {range_id} has no leader yet (an election is under way); retry"))
            }
            ReplicaError::Stopped(_) => NodeError::ShuttingDown,
            ReplicaError::OutsideRange { .. } => self.rerouted(desc, key),
            error @ (ReplicaError::SplitRefused { .. } | ReplicaError::MergeRefused { .. }) => {
                NodeError::Move(error.to_string())
            }
            other => NodeError::Unavailable(other.to_string()),
        }
    }

    pub(crate) fn update_range_gauge(&self) {
        self.metrics.ranges.set(self.table.read().owned_count() as i64);
    }

    pub(crate) fn new_load(&self) -> Arc<RangeLoad> {
        Arc::new(RangeLoad::new(self.config.load_accounting, self.config.load_window_secs as usize))
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The ranges this node owns, replicated ones with the replica roles this node knows.
    pub fn owned_ranges(&self) -> Vec<RangeDescriptor> {
        self.owned_ranges_raw().into_iter().map(|d| self.replication.with_roles(d)).collect()
    }

    /// `owned_ranges`, with how far behind each replica is on the ranges this node leads.
    pub async fn owned_ranges_with_lag(&self) -> Vec<RangeDescriptor> {
        let mut ranges = self.owned_ranges();
        let Ok(lag) = self.replication.lag().await else { return ranges };
        for desc in &mut ranges {
            let Some(behind) = lag.get(&desc.range_id) else { continue };
            for replica in &mut desc.replicas {
                replica.behind_entries = behind.iter().find(|(id, _)| *id == replica.raft_id).map(|(_, n)| *n);
            }
        }
        ranges
    }

    pub(crate) fn owned_ranges_raw(&self) -> Vec<RangeDescriptor> {
        self.table.read().owned().map(|r| r.desc.clone()).collect()
    }

    /// The highest range id this node ever recorded (see `ListRangesResponse`).
    pub fn max_range_id(&self) -> u64 {
        self.table.read().max_range_id()
    }

    /// Admits an admin call from operator `epoch` (see `fencing`).
    pub async fn admit_operator(&self, epoch: u64, call: crate::fencing::Call) -> Result<(), NodeError> {
        self.fence.admit(&self.storage, epoch, call).await
    }

    pub fn operator_epoch(&self) -> u64 {
        self.fence.highest()
    }

    pub fn routing_hints(&self) -> Vec<RangeDescriptor> {
        self.table.read().routing_hints().cloned().collect()
    }

    pub fn set_routing(&self, ranges: Vec<RangeDescriptor>) -> usize {
        self.table.write().set_routing(ranges)
    }

    /// Routes `key` and holds its range's gate shared, re-routing if a split replaced the range
    /// while this request waited.
    async fn lease(&self, key: &[u8], header: Option<&RequestHeader>) -> Result<RangeLease, NodeError> {
        for _ in 0..MAX_REROUTES {
            let range = self.table.read().route(key, header).map_err(|detail| {
                self.metrics.not_owner.inc();
                NodeError::NotOwner(detail)
            })?;
            let guard = range.gate.clone().read_owned().await;
            if !range.is_replaced() {
                return Ok(RangeLease { range, _guard: guard });
            }
        }
        Err(NodeError::Invalid("the range map kept changing while routing; retry".into()))
    }

    /// Like `lease`, for serving a request: while a range is frozen to be merged, reads and
    /// writes wait until it is retired (and NotOwner points at the merged range) or unfrozen.
    /// Reads wait too: the merged range may acknowledge writes this one has not seen.
    pub async fn serving_lease(&self, key: &[u8], header: Option<&RequestHeader>) -> Result<RangeLease, NodeError> {
        let deadline = tokio::time::Instant::now() + FROZEN_WAIT;
        loop {
            let lease = self.lease(key, header).await?;
            if lease.range.desc.state() != RangeState::Frozen {
                return Ok(lease);
            }
            let range = lease.range.clone();
            drop(lease);
            let changed = range.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !range.is_replaced() && tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(NodeError::Frozen(range.desc.range_id));
            }
        }
    }

    pub fn check_key(&self, key: &[u8]) -> Result<(), NodeError> {
        check_limit("max_key_bytes", key.len(), self.config.max_key_bytes)
    }

    pub fn check_value(&self, value: &[u8]) -> Result<(), NodeError> {
        check_limit("max_value_bytes", value.len(), self.config.max_value_bytes)
    }

    pub async fn get(
        &self,
        header: Option<&RequestHeader>,
        key: &[u8],
        mode: ReadMode,
    ) -> Result<(ResponseHeader, Option<Bytes>), NodeError> {
        self.check_key(key)?;
        let lease = self.serving_lease(key, header).await?;
        self.read_barrier(&lease, key, mode).await?;
        let value = self.storage.get(key)?;
        lease.range.load.record_read(key, key.len() + value.as_ref().map_or(0, Bytes::len));
        Ok((lease.response_header(&self.config.node_id), value))
    }

    pub async fn put(
        &self,
        header: Option<&RequestHeader>,
        key: Bytes,
        value: Bytes,
    ) -> Result<ResponseHeader, NodeError> {
        self.check_key(&key)?;
        self.check_value(&value)?;
        let lease = self.serving_lease(&key, header).await?;
        lease.range.load.record_write(&key, key.len() + value.len());
        let mutation = Mutation { op: MutationOp::Put as i32, key: key.clone(), value };
        self.write_range(&lease, &key, vec![mutation]).await?;
        Ok(lease.response_header(&self.config.node_id))
    }

    pub async fn delete(&self, header: Option<&RequestHeader>, key: Bytes) -> Result<ResponseHeader, NodeError> {
        self.check_key(&key)?;
        let lease = self.serving_lease(&key, header).await?;
        lease.range.load.record_write(&key, key.len());
        let mutation = Mutation { op: MutationOp::Delete as i32, key: key.clone(), value: Bytes::new() };
        self.write_range(&lease, &key, vec![mutation]).await?;
        Ok(lease.response_header(&self.config.node_id))
    }

    /// Applies `mutations` atomically. Every key must be in the range that holds the first.
    pub async fn batch(
        &self,
        header: Option<&RequestHeader>,
        mutations: &[Mutation],
    ) -> Result<(ResponseHeader, u32), NodeError> {
        let Some(first) = mutations.first() else {
            return Err(NodeError::Invalid("a batch needs at least one mutation".into()));
        };
        let mut total = 0usize;
        for (index, mutation) in mutations.iter().enumerate() {
            self.check_key(&mutation.key)?;
            total += mutation.key.len() + mutation.value.len();
            match mutation.op() {
                MutationOp::Put => self.check_value(&mutation.value)?,
                MutationOp::Delete => {}
                MutationOp::Unspecified => {
                    return Err(NodeError::Invalid(format!(
                        "mutation {index} has no op (expected OP_PUT or OP_DELETE)"
                    )));
                }
            }
        }
        check_limit("max_batch_bytes", total, self.config.max_batch_bytes)?;
        let lease = self.serving_lease(&first.key, header).await?;
        if let Some(outside) = mutations.iter().find(|m| !lease.range.desc.contains_key(&m.key)) {
            // Not atomic across ranges: refuse the whole batch, and say where the key lives.
            let hint = self.descriptor_holding(&outside.key);
            let reason = format!(
                "batch spans ranges: key {} is outside range {} {}; a batch is atomic only within one range",
                kvfleet_proto::display_key(&outside.key),
                lease.range.desc.range_id,
                lease.range.desc.span()
            );
            return Err(NodeError::NotOwner(Box::new(NotOwner {
                key: outside.key.clone(),
                node_id: self.config.node_id.clone(),
                hint,
                reason,
            })));
        }
        for mutation in mutations {
            lease.range.load.record_write(&mutation.key, mutation.key.len() + mutation.value.len());
        }
        let applied = mutations.len() as u32;
        self.write_range(&lease, &first.key, mutations.to_vec()).await?;
        Ok((lease.response_header(&self.config.node_id), applied))
    }

    /// One page of `[start, end)` from the range holding `start`, from one consistent view.
    pub async fn scan(
        &self,
        header: Option<&RequestHeader>,
        start: &[u8],
        end: &[u8],
        limit: u32,
        keys_only: bool,
        mode: ReadMode,
    ) -> Result<ScanPage, NodeError> {
        self.check_key(start)?;
        self.check_key(end)?;
        if !end.is_empty() && end <= start {
            return Err(NodeError::Invalid(format!(
                "scan end {} is not after start {}",
                kvfleet_proto::display_key(end),
                kvfleet_proto::display_key(start)
            )));
        }
        let limit = match limit {
            0 => self.config.max_scan_limit,
            n => n.min(self.config.max_scan_limit),
        } as usize;
        let lease = self.serving_lease(start, header).await?;
        self.read_barrier(&lease, start, mode).await?;
        let range_end = lease.range.desc.end_key.clone();
        let range_ends_first = !range_end.is_empty() && (end.is_empty() || range_end.as_ref() < end);
        let bound = if range_ends_first { range_end.as_ref() } else { end };
        let (pairs, resume) = self.storage.scan(start, bound, limit, MAX_SCAN_PAGE_BYTES, keys_only)?;
        let bytes: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
        lease.range.load.record_read(start, bytes);
        let resume_key = resume.or_else(|| range_ends_first.then(|| range_end.clone()));
        Ok(ScanPage { header: lease.response_header(&self.config.node_id), pairs, resume_key })
    }

    /// Splits a range through its Raft log: the leader proposes the split, and every replica
    /// applies it at the same index, in the write that applies the entry (two descriptors, the
    /// new range's log). The range keeps its id and Raft group for the left half; the right half
    /// is a new group on the same replicas. No data moves, no request waits: a write ordered after the split to a key it moved away is
    /// refused on every replica and retried on the new range.
    pub async fn split(&self, mut request: SplitRangeRequest) -> Result<[RangeDescriptor; 2], NodeError> {
        self.check_key(&request.split_key)?;
        request.right_id = nonzero_or_random(request.right_id);
        let range_id = request.range_id;
        let right_id = request.right_id;
        let _claim = self.key_changes.claim(range_id)?;
        let desc = {
            let table = self.table.read();
            let desc = table.check_split(&request)?.clone();
            if right_id == range_id || table.knows_id(right_id) {
                return Err(NodeError::Invalid(format!("split id {right_id} must be new on this node")));
            }
            desc
        };
        let split = kvfleet_proto::v1::RaftSplit {
            expected_generation: desc.generation,
            split_key: request.split_key.clone(),
            right_id,
        };
        let outcome = self.replication.propose_split(range_id, split).await;
        outcome.map_err(|error| self.replica_error(&desc, &request.split_key, error))?;
        // Range metadata is durable before OK in every mode: a single copy's log entries may
        // not be fsynced yet (`--durability async`).
        self.storage.sync_wal().await?;
        let [left, right] = crate::replica::apply::split_halves(desc, &request.split_key, right_id);
        tracing::info!(
            range_id,
            right = right_id,
            split_key = %kvfleet_proto::display_key(&request.split_key),
            generation = left.generation,
            "split replicated range through its log"
        );
        Ok([self.replication.with_roles(left), self.replication.with_roles(right)])
    }

    /// Writes descriptors to the metadata column family in one fsynced batch.
    pub(crate) async fn persist(&self, descriptors: &[&RangeDescriptor]) -> Result<(), NodeError> {
        let ops = descriptors.iter().map(|d| descriptor_write(d)).collect();
        self.storage.write_durable(ops).await
    }

    pub fn load_report(&self, sample_keys: usize, hot_keys: usize) -> Result<LoadReportResponse, NodeError> {
        let ranges: Vec<Arc<OwnedRange>> = self.table.read().owned().cloned().collect();
        let mut reports = Vec::with_capacity(ranges.len());
        for range in ranges {
            let rates = range.load.rates();
            let (approx_size_bytes, approx_keys) =
                self.storage.approximate_size(&range.desc.start_key, &range.desc.end_key)?;
            reports.push(RangeLoadReport {
                range: Some(self.replication.with_roles(range.desc.clone())),
                reads_per_sec: rates.reads,
                writes_per_sec: rates.writes,
                read_bytes_per_sec: rates.read_bytes,
                write_bytes_per_sec: rates.write_bytes,
                approx_size_bytes,
                approx_keys,
                key_samples: range.load.key_samples(sample_keys),
                hot_keys: range.load.hot_keys(hot_keys),
            });
        }
        Ok(LoadReportResponse {
            node_id: self.config.node_id.clone(),
            window_ms: self.config.load_window_secs * 1000,
            ranges: reports,
            load_accounting: self.config.load_accounting,
        })
    }

    /// Closes one load-accounting tick on every owned range.
    pub fn tick_load(&self, elapsed: Duration) {
        let ranges: Vec<Arc<OwnedRange>> = self.table.read().owned().cloned().collect();
        for range in ranges {
            range.load.tick(elapsed);
        }
    }
}

fn check_limit(limit: &'static str, size: usize, max: usize) -> Result<(), NodeError> {
    if size > max {
        return Err(NodeError::Limit { limit, size: size as u64, max: max as u64 });
    }
    Ok(())
}

fn nonzero_or_random(id: u64) -> u64 {
    if id != 0 {
        return id;
    }
    loop {
        let id = rand::random::<u64>() >> 1;
        if id > 1 {
            return id;
        }
    }
}
