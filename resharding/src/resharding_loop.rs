//! The control loop: collect load from the nodes -> plan (kvfleet-planner) -> execute through the
//! nodes' admin API -> persist the state and what is in flight -> report status. One round at a
//! time; moves run as tasks across rounds, bounded by the policy's `max_concurrent_moves`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kvfleet_planner::{Action, ActionKind, MergeReason, MoveReason, NodeId, Plan, Planner, Policy, SplitReason};
use kvfleet_proto::admin_auth::AdminToken;
use kvfleet_proto::display_key;
use kvfleet_proto::v1::{
    BootstrapRequest, ChangeReplicasRequest, PublishRoutingRequest, RangeDescriptor, RangeState, Replica,
    ReplicaChange, ReplicaMembership, SplitRangeRequest, TransferLeaderRequest, replica_change,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::leadership::Leadership;
use crate::observe::{NodeClients, Observation, ObservedRange, describe_status, with_timeout};
use crate::platform::{Member, Platform, PlatformError};
use crate::replica_moves::{Endpoint, ReplicaMoveError};
use crate::state::{InFlightMove, ReshardingState, unix_now};
use crate::status::{IdReservation, StatusBoard};
use crate::{observe, replica_merges};
use kvfleet_client::client::normalize_address;

/// Rounds in a row a replica move's target may not answer before the move is given up.
const GIVE_UP_AFTER_ROUNDS: u32 = 10;
/// Rounds in a row a voter's node must answer without a copy before its replica counts as lost
/// (a node restarting, or opening its groups, is not).
const LOST_AFTER_ROUNDS: u32 = 5;
/// Rounds in a row a node must be missing from the members yet vote in ranges before its
/// replicas are re-created on members (a members list read in the middle of a change is not).
const DEPARTED_AFTER_ROUNDS: u32 = 3;
/// How long a range frozen for a merge (serving nothing) waits for a silent replica's node
/// before the freeze is undone: the range then serves from the others, and merges later.
const FROZEN_MERGE_PATIENCE: Duration = Duration::from_secs(10);
/// How long a round spends on one replicated merge (a freeze, a wait for every replica, the
/// merge): one not done by then is finished in a later round.
const REPLICA_MERGE_DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Time between the starts of two rounds.
    pub interval: Duration,
    pub policy: Policy,
    /// Deadline of each admin call except a move's copy.
    pub rpc_timeout: Duration,
    /// Deadline of a move's snapshot copy.
    pub import_timeout: Duration,
    /// Republish the range map to every node at least this often, even if it did not change
    /// (a restarted node has lost its routing hints).
    pub republish_every: Duration,
    /// Whether this controller may act now, and the epoch its admin calls carry.
    pub leadership: Leadership,
    /// The fleet's admin token, sent on every admin call (none: the nodes' admin API is open).
    pub admin_token: AdminToken,
    /// How many replicas a new fleet's range 1 gets (1, 3 or 5); splits keep a range's replicas
    /// and moves keep their count.
    pub replication_factor: usize,
    /// A replicated range's voter on a node that has not answered for this long is replaced on
    /// another node (TiKV PD's `max-store-down-time`): the range is one more failure from losing
    /// its majority until then. A node that comes back after it finds those replicas removed and
    /// drops them. Single copies are never replaced: their data is on that node only.
    pub replace_down_after: Duration,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            interval: Duration::from_secs(5),
            policy: Policy::default(),
            rpc_timeout: Duration::from_secs(10),
            import_timeout: Duration::from_secs(3600),
            republish_every: Duration::from_secs(30),
            leadership: Leadership::unconditional(),
            admin_token: AdminToken::none(),
            replication_factor: 1,
            replace_down_after: Duration::from_secs(30 * 60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

/// A replica move a task drives (`replica_moves`), ending with the range as its leader has it.
struct LiveMove {
    task: JoinHandle<Result<RangeDescriptor, ReplicaMoveError>>,
    /// Why this loop planned it; None for a move it resumed (its recorded reason is in the state).
    reason: Option<MoveReason>,
}

pub struct ReshardingLoop<P: Platform> {
    platform: Arc<P>,
    config: LoopConfig,
    planner: Planner,
    state: ReshardingState,
    clients: NodeClients,
    live_moves: HashMap<u64, LiveMove>,
    status: StatusBoard,
    published: Option<(u64, std::time::Instant)>,
    /// Node id -> how long it has not answered (rounds in a row, and since when).
    unanswered: HashMap<String, Silence>,
    /// (range id, node id) -> rounds in a row that voter's node answered holding no copy.
    missing: HashMap<(u64, String), u32>,
    /// Node id -> rounds in a row it voted in ranges without being a member.
    departed: HashMap<String, u32>,
}

/// A node's current silence: rounds in a row it did not answer, and the first round's time.
struct Silence {
    rounds: u32,
    since: std::time::Instant,
}

impl<P: Platform> ReshardingLoop<P> {
    /// A controller resuming from the platform's saved state, if any.
    pub async fn new(platform: Arc<P>, config: LoopConfig, status: StatusBoard) -> Result<Self, LoopError> {
        let state = platform.load_state().await?.unwrap_or_default();
        if !state.moves.is_empty() {
            tracing::info!(moves = state.moves.len(), "resuming: moves were in flight; finishing or rolling them back");
        }
        Ok(ReshardingLoop {
            planner: Planner::new(config.policy.clone()),
            clients: NodeClients::new(config.leadership.clone(), config.admin_token.clone()),
            platform,
            config,
            state,
            live_moves: HashMap::new(),
            status,
            published: None,
            unanswered: HashMap::new(),
            missing: HashMap::new(),
            departed: HashMap::new(),
        })
    }

    /// Rounds until `shutdown` turns true; then waits (bounded) for the moves under way and saves.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), LoopError> {
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reservations = self.status.take_reservations();
        loop {
            let mut reservation = None;
            tokio::select! {
                _ = ticker.tick() => {}
                Some(request) = reservations.recv() => reservation = Some(request),
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            let result = match reservation {
                Some(request) => self.reserve_range_ids(request).await,
                None => self.round().await,
            };
            match result {
                Ok(()) => {}
                Err(LoopError::Platform(PlatformError::Gone(why))) => {
                    tracing::info!(%why, "the fleet is gone; the resharding loop stops");
                    return Ok(());
                }
                Err(error @ LoopError::Platform(PlatformError::Superseded(_))) => {
                    tracing::error!(%error, "superseded; the resharding loop stops without saving");
                    return Err(error);
                }
                Err(error) => {
                    tracing::error!(%error, "resharding round failed");
                    self.status.event(format!("round failed: {error}"));
                }
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.rpc_timeout * 3;
        while !self.live_moves.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.reap_moves(unix_now().as_secs());
        }
        // A replica move left running would race the next loop resuming it; resuming is the same
        // code as going on, so stopping it here loses nothing.
        for live in self.live_moves.values() {
            live.task.abort();
        }
        self.platform.save_state(&self.state).await?;
        Ok(())
    }

    /// Hands out fresh range ids for a split or merge made by hand on one of this fleet's nodes,
    /// from the sequence the loop allocates from, saved before the answer.
    async fn reserve_range_ids(&mut self, request: IdReservation) -> Result<(), LoopError> {
        let IdReservation { count, node_address, reply } = request;
        let wanted = normalize_address(&node_address);
        let members = self.platform.members().await?;
        if !members.iter().any(|m| normalize_address(&m.address) == wanted) {
            let known: Vec<&str> = members.iter().map(|m| m.address.as_str()).collect();
            let _ = reply.send(Err(tonic::Status::failed_precondition(format!(
                "node {node_address} is not one of this resharding loop's nodes ({}): ask the loop of its own fleet",
                known.join(", ")
            ))));
            return Ok(());
        }
        let first = self.state.allocate_range_ids(u64::from(count));
        let saved = self.platform.save_state(&self.state).await;
        let answer = match &saved {
            Ok(()) => Ok(first),
            Err(error) => Err(tonic::Status::unavailable(format!("saving the reservation failed: {error}"))),
        };
        tracing::info!(first, count, node = %node_address, saved = saved.is_ok(), "reserved range ids for a change made by hand");
        // The caller may have given up; the ids stay reserved either way.
        let _ = reply.send(answer);
        saved.map_err(LoopError::from)
    }

    /// One round: collect -> recover -> publish -> plan -> execute -> persist -> status.
    pub async fn round(&mut self) -> Result<(), LoopError> {
        let now = unix_now().as_secs();
        let members = self.platform.members().await?;
        self.clients.route_admin_calls(&members);
        let mut observation = observe::collect(&self.clients, members, self.config.rpc_timeout).await;
        self.settle_departed(&mut observation);
        self.mark_lost_replicas(&mut observation);
        let max_range = observation.max_range_id();
        self.state.observe_range_ids(max_range);
        if !self.state.bootstrapped || !self.state.bootstrap_pending.is_empty() {
            self.bootstrap(&observation, max_range).await?;
            if !self.state.bootstrap_pending.is_empty() {
                // Range 1's replicas must not change before every one of them exists.
                return Ok(());
            }
        }
        if self.state.replication_factor.is_none()
            && self.state.moves.is_empty()
            && observation.unreachable().next().is_none()
            && observation.leaderless.is_empty()
        {
            // Created before the factor was recorded: as many voters as its ranges have (out of
            // a membership change), as a factor: 1, 3 or 5.
            let settled = observation.ranges.values().filter(|r| !r.desc.in_joint_membership());
            let voters =
                settled.map(|r| r.desc.replicas.iter().filter(|v| v.membership() == ReplicaMembership::Voter).count());
            self.state.replication_factor = voters.max().map(|n| match n {
                0..=1 => 1,
                2..=3 => 3,
                _ => 5,
            });
        }
        let observed_at = std::time::Instant::now();
        for node in &observation.nodes {
            let id = &node.member.node_id;
            if node.report.is_ok() {
                self.unanswered.remove(id);
            } else {
                self.unanswered.entry(id.clone()).or_insert(Silence { rounds: 0, since: observed_at }).rounds += 1;
            }
        }
        self.unanswered.retain(|id, _| observation.node(id).is_some());
        self.stop_stuck_replica_moves(&observation);
        self.reap_moves(now);
        self.recover_moves(&observation).await;
        self.remove_stray_learners(&observation).await;
        self.finish_frozen_merges(&observation).await?;
        self.publish_routing(&observation).await;

        // The factor the fleet was created with, else (not bootstrapped yet) the configured one.
        let factor = self.state.replication_factor.unwrap_or(self.config.replication_factor);
        let view = observe::cluster_view(&observation, &self.state, factor);
        let plan = self.planner.plan(&view, now);
        // Ranges on unreachable nodes are missing from the view; the planner acts on what it sees
        // and moves nothing onto those nodes.
        let degraded = observation.unreachable().next().is_some() || !observation.leaderless.is_empty();
        for (member, error) in observation.unreachable() {
            tracing::warn!(node = %member.node_id, %error, "node unreachable this round");
        }
        if !degraded {
            // Before executing: the ranges this round creates are not in the observation.
            let live: HashSet<u64> = observation.ranges.keys().copied().collect();
            self.state.forget_ranges_except(&live);
        }
        self.execute(&observation, &plan, now).await?;
        self.platform.save_state(&self.state).await?;
        self.status.record_round(&observation, &plan, &self.state, &self.live_move_reasons(), degraded, factor);
        Ok(())
    }

    /// The reason of each move this loop planned and a task drives; the others (resumed after a
    /// restart or a failure) show as recovering, with the reason the state recorded.
    fn live_move_reasons(&self) -> HashMap<u64, MoveReason> {
        self.live_moves.iter().filter_map(|(id, live)| Some((*id, live.reason.clone()?))).collect()
    }

    /// Collects the moves whose tasks ended. A failed move stays in the state for `recover_moves`.
    fn reap_moves(&mut self, now: u64) {
        let finished: Vec<u64> =
            self.live_moves.iter().filter(|(_, live)| live.task.is_finished()).map(|(id, _)| *id).collect();
        for move_id in finished {
            let Some(live) = self.live_moves.remove(&move_id) else { continue };
            self.reap_move(move_id, live.task, now);
        }
    }

    fn reap_move(&mut self, move_id: u64, task: JoinHandle<Result<RangeDescriptor, ReplicaMoveError>>, now: u64) {
        match futures::FutureExt::now_or_never(task).and_then(Result::ok) {
            Some(Ok(desc)) => {
                if let Some(mv) = self.state.finish_move(move_id) {
                    self.state.moved_at.insert(mv.range_id, now);
                    let voters: Vec<&str> = desc.replicas.iter().map(|r| r.node_id.as_str()).collect();
                    let text = format!(
                        "moved range {}'s replica {} -> {}: replicas now {}",
                        mv.range_id,
                        mv.from,
                        mv.to,
                        voters.join(", ")
                    );
                    tracing::info!(move_id, range_id = mv.range_id, from = %mv.from, to = %mv.to, conf_version = desc.conf_version, "replica move finished");
                    let took = (unix_now().as_millis() as u64).saturating_sub(mv.started_unix_ms);
                    self.status.move_finished(Duration::from_millis(took), text);
                }
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "replica move failed; it is run again from the membership next round");
                self.status.action_failed(ActionKind::Move, format!("{error}; retrying"));
            }
            None => tracing::error!(move_id, "replica move task panicked or was cancelled; retrying next round"),
        }
    }

    /// Resumes every move no task drives (failed, or from before a restart): each goes on from
    /// wherever its range's membership stands.
    async fn recover_moves(&mut self, observation: &Observation) {
        let pending: Vec<InFlightMove> =
            self.state.moves.iter().filter(|m| !self.live_moves.contains_key(&m.move_id)).cloned().collect();
        for mv in pending {
            self.resume_replica_move(observation, mv).await;
        }
    }

    /// Sends the range map to every node as routing hints when it changed, and periodically.
    /// A new fleet: once every node answers and none has ever held a range, the first
    /// `replication_factor` nodes create range 1 as a Raft group (of one voter for single
    /// copies). Recorded in the state before the first call, so it happens once per fleet.
    async fn bootstrap(&mut self, observation: &Observation, max_range_id: u64) -> Result<(), LoopError> {
        if !self.state.bootstrap_pending.is_empty() {
            return self.bootstrap_replicas(observation).await;
        }
        if max_range_id > 0 {
            self.state.bootstrapped = true;
            return Ok(());
        }
        if observation.nodes.is_empty() {
            return Ok(());
        }
        if observation.unreachable().next().is_some() {
            tracing::info!("new fleet: waiting for every node to answer before creating range 1");
            return Ok(());
        }
        let factor = self.config.replication_factor.max(1);
        self.state.replication_factor = Some(factor);
        if observation.nodes.len() < factor {
            tracing::info!(
                nodes = observation.nodes.len(),
                factor,
                "new fleet: waiting for enough nodes to replicate range 1"
            );
            return Ok(());
        }
        self.state.bootstrapped = true;
        self.state.bootstrap_replicas =
            observation.nodes[..factor].iter().map(|n| (n.member.node_id.clone(), n.member.address.clone())).collect();
        self.state.bootstrap_pending = self.state.bootstrap_replicas.iter().map(|(id, _)| id.clone()).collect();
        if let Err(error) = self.platform.save_state(&self.state).await {
            // Not recorded, so not asked: the next round starts over.
            self.state.bootstrapped = false;
            self.state.bootstrap_replicas.clear();
            self.state.bootstrap_pending.clear();
            return Err(error.into());
        }
        self.bootstrap_replicas(observation).await
    }

    /// Asks every node still pending to create the replicated range 1 (one whose answer was
    /// lost answers OK again: nothing changes range 1's replicas before all have answered).
    async fn bootstrap_replicas(&mut self, observation: &Observation) -> Result<(), LoopError> {
        let replicas: Vec<Replica> = self
            .state
            .bootstrap_replicas
            .iter()
            .map(|(node_id, address)| Replica {
                node_id: node_id.clone(),
                address: address.clone(),
                ..Default::default()
            })
            .collect();
        for replica in &replicas {
            if !self.state.bootstrap_pending.contains(&replica.node_id) {
                continue;
            }
            let admin_address =
                observation.node(&replica.node_id).map_or(replica.address.as_str(), |n| n.member.admin_address());
            let request = with_timeout(BootstrapRequest { replicas: replicas.clone() }, self.config.rpc_timeout);
            let result: Result<_, String> =
                async { self.clients.admin(admin_address)?.bootstrap(request).await.map_err(|s| describe_status(&s)) }
                    .await;
            match result {
                Ok(_) => {
                    self.state.bootstrap_pending.retain(|id| *id != replica.node_id);
                    self.platform.save_state(&self.state).await?;
                }
                Err(error) => {
                    tracing::warn!(node = %replica.node_id, %error, "creating range 1's replica failed; retrying next round")
                }
            }
        }
        if self.state.bootstrap_pending.is_empty() {
            let names: Vec<&str> = replicas.iter().map(|r| r.node_id.as_str()).collect();
            self.status.event(format!("new fleet: range 1 (the whole key space) replicated on {}", names.join(", ")));
        }
        Ok(())
    }

    async fn publish_routing(&mut self, observation: &Observation) {
        let fingerprint = observation.fingerprint();
        let fresh =
            self.published.is_some_and(|(seen, at)| seen == fingerprint && at.elapsed() < self.config.republish_every);
        if fresh || observation.ranges.is_empty() {
            return;
        }
        let routing = observation.routing();
        let mut all_ok = true;
        for node in observation.nodes.iter().filter(|n| n.report.is_ok()) {
            let request = with_timeout(PublishRoutingRequest { ranges: routing.clone() }, self.config.rpc_timeout);
            let result: Result<_, String> = async {
                self.clients
                    .admin(node.member.admin_address())?
                    .publish_routing(request)
                    .await
                    .map_err(|s| describe_status(&s))
            }
            .await;
            if let Err(error) = result {
                all_ok = false;
                tracing::warn!(node = %node.member.node_id, %error, "publishing routing hints failed");
            }
        }
        if all_ok {
            self.published = Some((fingerprint, std::time::Instant::now()));
        }
    }

    async fn execute(&mut self, observation: &Observation, plan: &Plan, now: u64) -> Result<(), LoopError> {
        // Ids first, persisted before any node sees them.
        let needed: u64 = plan
            .actions
            .iter()
            .map(|a| match a {
                // The right half's: the left one keeps the range's id, as a merged range does.
                Action::Split { .. } => 1,
                Action::Merge { .. } | Action::Move { .. } | Action::TransferLeader { .. } => 0,
            })
            .sum();
        if plan.actions.is_empty() {
            return Ok(());
        }
        let moves = plan.actions.iter().filter(|a| matches!(a, Action::Move { .. })).count() as u64;
        let mut next_range_id = self.state.allocate_range_ids(needed);
        let mut move_ids: Vec<u64> = (0..moves).map(|_| self.state.allocate_move_id()).collect();
        if needed + moves > 0 {
            self.platform.save_state(&self.state).await?;
        }

        for action in &plan.actions {
            match action {
                Action::Split { range, key, reason } => {
                    let right_id = next_range_id;
                    next_range_id += 1;
                    self.split(observation, *range, key, reason, right_id, now).await;
                }
                Action::Merge { left, right, reason } => {
                    self.merge(observation, (*left, *right), reason).await;
                }
                Action::Move { range, from, to, reason } => {
                    let move_id = move_ids.pop().unwrap_or_else(|| self.state.allocate_move_id());
                    self.start_move(observation, move_id, *range, *from, *to, reason).await?;
                }
                Action::TransferLeader { range, to, reason, .. } => {
                    self.transfer_leader(observation, *range, *to, reason, now).await;
                }
            }
        }
        Ok(())
    }

    async fn split(
        &mut self,
        observation: &Observation,
        range_id: u64,
        key: &[u8],
        reason: &SplitReason,
        right_id: u64,
        now: u64,
    ) {
        let Some(range) = observation.ranges.get(&range_id) else { return };
        let owner = &observation.nodes[range.owner].member;
        let request = SplitRangeRequest {
            range_id,
            expected_generation: range.desc.generation,
            split_key: key.to_vec().into(),
            right_id,
        };
        let started = std::time::Instant::now();
        let result: Result<_, String> = async {
            let request = with_timeout(request, self.config.rpc_timeout);
            self.clients.admin(owner.admin_address())?.split_range(request).await.map_err(|s| describe_status(&s))
        }
        .await;
        let why = reason.to_string();
        match result {
            Ok(answer) => {
                // The range keeps its id for the left half (the node says which ids).
                let answer = answer.into_inner();
                let left_id = answer.left.map_or(range_id, |d| d.range_id);
                let right_id = answer.right.map_or(right_id, |d| d.range_id);
                self.state.split_at.insert(left_id, now);
                self.state.split_at.insert(right_id, now);
                let text = format!(
                    "split range {range_id} at {} on {} ({why}) -> {left_id}, {right_id}",
                    display_key(key),
                    owner.node_id
                );
                tracing::info!(range_id, key = %display_key(key), node = %owner.node_id, reason = %why, left_id, right_id, took_ms = started.elapsed().as_secs_f64() * 1e3, "split");
                self.status.action_done(ActionKind::Split, text);
            }
            Err(error) => {
                tracing::warn!(range_id, %error, "split failed");
                self.status.action_failed(ActionKind::Split, format!("split of range {range_id} failed: {error}"));
            }
        }
    }

    /// Merges two ranges through their logs (`replica_merges`): their replicas are on the same
    /// nodes (the planner aligned them); a merge interrupted before is finished.
    async fn merge(&mut self, observation: &Observation, (left, right): (u64, u64), reason: &MergeReason) {
        let seeds: Vec<String> = observation.nodes.iter().map(|n| n.member.admin_address().to_string()).collect();
        let started = std::time::Instant::now();
        let merged = replica_merges::merge_replicated(&self.clients, left, right, &seeds, REPLICA_MERGE_DEADLINE).await;
        match merged {
            Ok(merged) => {
                let took_ms = started.elapsed().as_secs_f64() * 1e3;
                tracing::info!(left, right, merged = merged.range_id, %reason, took_ms, "merged replicated ranges");
                self.status.action_done(
                    ActionKind::Merge,
                    format!(
                        "merged ranges {left} + {right} -> {} {} through their logs ({reason})",
                        merged.range_id,
                        merged.span()
                    ),
                );
            }
            Err(error) => {
                tracing::warn!(left, right, %error, "replicated merge not done");
                self.status.action_failed(ActionKind::Merge, error.to_string());
            }
        }
    }

    /// Finishes the merges whose right range is frozen (interrupted by a crash of this loop or
    /// of a node): a frozen range serves nothing until it is merged. If the left neighbour's
    /// replicas are on other nodes (moved meanwhile, by hand), one moves onto the frozen range's
    /// nodes first: the frozen range's replicas cannot move.
    async fn finish_frozen_merges(&mut self, observation: &Observation) -> Result<(), LoopError> {
        for (left, right) in observation.frozen_merges() {
            let (Some(l), Some(r)) = (observation.ranges.get(&left), observation.ranges.get(&right)) else { continue };
            if self.state.moves.iter().any(|m| m.range_id == left) {
                continue;
            }
            let (left_nodes, right_nodes) = (l.desc.replica_nodes(), r.desc.replica_nodes());
            let answering = |node: &&str| observation.node(node).is_some_and(|n| n.report.is_ok());
            // The left range the freeze recorded changed since (split, merged away, frozen
            // itself, or its refusal of this merge applied and the thaw not yet): the merge can
            // never be applied; the freeze is undone.
            let recorded = (r.desc.merge_left_id, r.desc.merge_left_generation);
            let left_changed =
                recorded.0 != 0 && (recorded != (left, l.desc.generation) || l.desc.is_frozen_for_merge());
            // Silent too long (or gone from the fleet): rather than serve nothing until the node
            // is back, if ever, the freeze is undone while a majority can do it.
            let mut stalling: Vec<String> = Vec::new();
            for node in right_nodes.iter().chain(&left_nodes).filter(|node| self.stalls_frozen_merge(node)) {
                if !stalling.iter().any(|n| n == node) {
                    stalling.push(node.to_string());
                }
            }
            let right_stalled = right_nodes.iter().any(|node| stalling.iter().any(|n| n == node));
            let majority_answers = right_nodes.iter().filter(|node| answering(node)).count() * 2 > right_nodes.len();
            if (left_changed || right_stalled) && majority_answers {
                let why = if left_changed {
                    format!(
                        "the range it was to merge into (range {} at generation {}) changed since",
                        recorded.0, recorded.1
                    )
                } else {
                    format!(
                        "a replica of it is on node(s) {} (silent for {} s, or gone from the fleet)",
                        stalling.join(", "),
                        FROZEN_MERGE_PATIENCE.min(self.config.replace_down_after).as_secs()
                    )
                };
                self.abort_frozen_merge(observation, right, &stalling, why).await;
                continue;
            }
            if left_changed {
                continue;
            }
            // The merge waits for every replica of the frozen range: not worth a round's time
            // while one of their nodes does not answer.
            if !right_nodes.iter().all(answering) {
                tracing::info!(left, right, "a range frozen for a merge waits for its replicas' nodes to answer");
                continue;
            }
            if left_nodes == right_nodes {
                self.merge(observation, (left, right), &MergeReason::Frozen).await;
                continue;
            }
            let from = left_nodes.iter().find(|n| !right_nodes.contains(n)).and_then(|n| observation.node_index(n));
            let to = right_nodes.iter().find(|n| !left_nodes.contains(n)).and_then(|n| observation.node_index(n));
            let (Some(from), Some(to)) = (from, to) else { continue };
            let move_id = self.state.allocate_move_id();
            let reason = MoveReason::ColocateForMerge { neighbour: right };
            self.start_move(observation, move_id, left, NodeId(from as u32), NodeId(to as u32), &reason).await?;
        }
        Ok(())
    }

    /// Whether a frozen range's merge has waited long enough for `node_id`: a member silent for
    /// `FROZEN_MERGE_PATIENCE` (or `replace_down_after`, if shorter), or a node gone from the
    /// members for `DEPARTED_AFTER_ROUNDS` rounds.
    fn stalls_frozen_merge(&self, node_id: &str) -> bool {
        self.silent_for(node_id, FROZEN_MERGE_PATIENCE.min(self.config.replace_down_after))
            || self.departed.get(node_id).is_some_and(|&rounds| rounds >= DEPARTED_AFTER_ROUNDS)
    }

    /// Undoes the freeze of `right`, whose merge waits for silent nodes (`lost`; see
    /// `finish_frozen_merges`): it serves again from the others, its replicas on nodes down for
    /// good are replaced as any range's are, and the planner may merge it later.
    async fn abort_frozen_merge(&mut self, observation: &Observation, right: u64, lost: &[String], why: String) {
        let seeds: Vec<String> = observation.nodes.iter().map(|n| n.member.admin_address().to_string()).collect();
        // Never decommissioned: only a person can say that a node's disk is gone for good.
        match replica_merges::abort_frozen_merge(&self.clients, right, lost, &[], &seeds, REPLICA_MERGE_DEADLINE).await
        {
            Ok(replica_merges::Thawed { range: thawed, .. }) => {
                tracing::warn!(
                    right,
                    generation = thawed.generation,
                    %why,
                    "undid a merge's freeze"
                );
                self.status.merge_aborted(format!(
                    "range {right} {} is serving again: it was frozen to be merged, but {why}; so its merge was \
                     refused for good and its freeze undone",
                    thawed.span()
                ));
            }
            Err(error) => {
                tracing::warn!(right, %error, "undoing a merge's freeze failed; retrying next round");
                self.status.action_failed(ActionKind::Merge, error);
            }
        }
    }

    async fn start_move(
        &mut self,
        observation: &Observation,
        move_id: u64,
        range_id: u64,
        from: NodeId,
        to: NodeId,
        reason: &MoveReason,
    ) -> Result<(), LoopError> {
        let Some(range) = observation.ranges.get(&range_id).filter(|r| r.desc.state() == RangeState::Active) else {
            return Ok(());
        };
        // The source may have left the fleet (`Observation::departed`); the target is a member.
        let (Some(source), Some(target)) =
            (observation.any_node(from.0 as usize), observation.nodes.get(to.0 as usize))
        else {
            return Ok(());
        };
        let why = reason.to_string();
        let mv = InFlightMove {
            move_id,
            range_id,
            generation: range.desc.generation,
            from: source.node_id.clone(),
            to: target.member.node_id.clone(),
            reason: why.clone(),
            started_unix_ms: unix_now().as_millis() as u64,
        };
        // Recorded before any node hears of it: a restarted controller knows what to resume.
        self.state.moves.push(mv.clone());
        self.platform.save_state(&self.state).await?;
        tracing::info!(move_id, range_id, from = %mv.from, to = %mv.to, reason = %why, "replica move started");
        self.status.action_done(
            ActionKind::Move,
            format!("moving range {range_id}'s replica {} -> {} ({why})", mv.from, mv.to),
        );
        self.spawn_replica_move(observation, &mv, Some(reason.clone()));
        Ok(())
    }

    /// Runs replica move `mv` as a task: from wherever its range's membership stands (each step
    /// does only what is not in force yet, so this both starts and resumes a move).
    fn spawn_replica_move(&mut self, observation: &Observation, mv: &InFlightMove, reason: Option<MoveReason>) {
        let endpoint = |node_id: &str| {
            let member = observation.node(node_id).map(|n| &n.member);
            let known = observation
                .ranges
                .get(&mv.range_id)
                .and_then(|r| r.desc.replicas.iter().find(|r| r.node_id == node_id));
            let address = member.map(|m| m.address.clone()).or_else(|| known.map(|r| r.address.clone()))?;
            Some(Endpoint { node_id: node_id.to_string(), address })
        };
        let Some(to) = endpoint(&mv.to) else { return };
        // A source neither a member nor in the membership any more (it left the fleet, and the
        // move removed it before a crash) needs no address: the move reads its end from the
        // membership and finishes.
        let from = endpoint(&mv.from).unwrap_or_else(|| Endpoint { node_id: mv.from.clone(), address: String::new() });
        let seeds: Vec<String> = observation.nodes.iter().map(|n| n.member.admin_address().to_string()).collect();
        let (clients, range_id, deadline) = (self.clients.clone(), mv.range_id, self.config.import_timeout);
        let task = tokio::spawn(async move {
            if from == to {
                // A replica that lost its copy, re-created on its own node.
                crate::replica_moves::readd_replica(&clients, range_id, &seeds, &to, deadline).await
            } else {
                crate::replica_moves::move_replica(&clients, range_id, &seeds, &from, &to, deadline).await
            }
        });
        self.live_moves.insert(mv.move_id, LiveMove { task, reason });
    }

    /// Resumes a replica move no task drives (it failed, or this controller restarted). One whose
    /// target left the fleet is dropped: the membership is valid between any two steps, and a
    /// learner left on a gone node holds no vote.
    async fn resume_replica_move(&mut self, observation: &Observation, mv: InFlightMove) {
        if observation.node(&mv.to).is_none() {
            self.state.finish_move(mv.move_id);
            self.status.event(format!(
                "dropped the move of range {}'s replica {} -> {}: {} is no longer a member",
                mv.range_id, mv.from, mv.to, mv.to
            ));
            return;
        }
        if mv.from == mv.to {
            // A re-creation is never given up while its node is a member: cut off between its
            // removal and its promotion, the range would stay a voter short. It waits for the
            // node to answer.
            if observation.node(&mv.to).is_some_and(|n| n.report.is_ok()) {
                self.spawn_replica_move(observation, &mv, None);
            }
            return;
        }
        if let Some(why) = overtaken(observation, &mv) {
            self.state.finish_move(mv.move_id);
            self.status
                .event(format!("dropped the move of range {}'s replica {} -> {}: {why}", mv.range_id, mv.from, mv.to));
            return;
        }
        if !self.target_usable(observation, &mv.to) {
            self.abandon_replica_move(observation, mv).await;
            return;
        }
        tracing::info!(move_id = mv.move_id, range_id = mv.range_id, from = %mv.from, to = %mv.to, "resuming a replica move");
        self.spawn_replica_move(observation, &mv, None);
    }

    /// Gives up a replica move whose target stopped answering or drains, unless the target
    /// votes already (then the move finishes, removing the source, once it answers again): a
    /// learner added on it is removed, and the planner picks another target next round.
    async fn abandon_replica_move(&mut self, observation: &Observation, mv: InFlightMove) {
        let Some(range) = observation.ranges.get(&mv.range_id) else {
            tracing::info!(move_id = mv.move_id, "the moving range has no leader this round; the move waits");
            return;
        };
        let membership = range.desc.replicas.iter().find(|r| r.node_id == mv.to).map(|r| r.membership());
        match membership {
            Some(ReplicaMembership::Learner) => {
                if let Err(error) = self.remove_learner(observation, range, &mv.to).await {
                    tracing::warn!(move_id = mv.move_id, %error, "removing the abandoned move's learner failed; retrying next round");
                    return;
                }
            }
            Some(_) => {
                // It votes already: going on only removes the source (or leaves the joint
                // membership), which a drain of the target then undoes with a move of its own.
                if observation.node(&mv.to).is_some_and(|n| n.report.is_ok()) {
                    tracing::info!(move_id = mv.move_id, to = %mv.to, "the move's target votes already: finishing the move");
                    self.spawn_replica_move(observation, &mv, None);
                } else {
                    tracing::info!(move_id = mv.move_id, to = %mv.to, "the move's target votes already: it finishes once the target answers");
                }
                return;
            }
            None => {}
        }
        self.state.finish_move(mv.move_id);
        self.status.event(format!(
            "gave up moving range {}'s replica {} -> {}: {} does not answer or drains; another target is planned",
            mv.range_id, mv.from, mv.to, mv.to
        ));
    }

    /// Drains (`Member::draining`) only the departed nodes missing from the members for
    /// `DEPARTED_AFTER_ROUNDS` rounds in a row or that a move in flight takes a replica off; the
    /// others are only held to be down meanwhile (no voluntary move on their ranges). Adds every
    /// non-member a move in flight takes a replica off, voting or not any more: the move stays in
    /// flight for the planner, which plans nothing else on its range. Says so when a node first
    /// counts as departed.
    fn settle_departed(&mut self, observation: &mut Observation) {
        let mut departed = HashMap::new();
        for member in &observation.departed {
            let rounds = self.departed.get(&member.node_id).copied().unwrap_or(0) + 1;
            departed.insert(member.node_id.clone(), rounds);
            if rounds == DEPARTED_AFTER_ROUNDS {
                let voting =
                    observation.ranges.values().filter(|r| r.desc.replicas.iter().any(|v| v.node_id == member.node_id));
                let ranges: Vec<String> = voting.map(|r| r.desc.range_id.to_string()).collect();
                tracing::warn!(node = %member.node_id, ranges = %ranges.join(","), "a node that is not a member of the fleet holds replicas: re-creating them on members");
                self.status.node_left_fleet(format!(
                    "node {} is not a member of the fleet but holds replicas of ranges {}: they are re-created on members (learners removed)",
                    member.node_id,
                    ranges.join(", ")
                ));
            }
        }
        self.departed = departed;
        let moving_off = |node_id: &str| self.state.moves.iter().any(|m| m.from == node_id);
        for member in &mut observation.departed {
            member.draining = self.departed.get(&member.node_id).is_some_and(|&rounds| rounds >= DEPARTED_AFTER_ROUNDS)
                || moving_off(&member.node_id);
        }
        for mv in &self.state.moves {
            if observation.any_node_index(&mv.from).is_none() {
                observation.departed.push(Member { draining: true, ..Member::at(&mv.from, "") });
            }
        }
    }

    /// Removes `node_id`'s learner from `range`, through its leader.
    async fn remove_learner(
        &self,
        observation: &Observation,
        range: &ObservedRange,
        node_id: &str,
    ) -> Result<(), String> {
        let request = ChangeReplicasRequest {
            range_id: range.desc.range_id,
            expected_conf_version: range.desc.conf_version,
            changes: vec![ReplicaChange {
                kind: replica_change::Kind::Remove as i32,
                replica: Some(Replica { node_id: node_id.to_string(), ..Default::default() }),
            }],
        };
        let leader = &observation.nodes[range.owner].member;
        let request = with_timeout(request, self.config.rpc_timeout);
        self.clients.admin(leader.admin_address())?.change_replicas(request).await.map_err(|s| describe_status(&s))?;
        Ok(())
    }

    /// Removes the learners left on departed nodes being drained (a move whose target left the
    /// fleet is dropped, and its learner would stay: the leader would send it appends forever,
    /// and a range with a learner counts as changing its membership, so it would get no voter
    /// it lacks). Not while a move of the range is in flight or its membership is joint.
    async fn remove_stray_learners(&mut self, observation: &Observation) {
        for range in observation.ranges.values().filter(|r| !r.desc.in_joint_membership()) {
            if self.state.moves.iter().any(|m| m.range_id == range.desc.range_id) {
                continue;
            }
            let stray = range.desc.replicas.iter().filter(|r| r.membership() == ReplicaMembership::Learner);
            let stray = stray.filter(|r| observation.departed.iter().any(|m| m.node_id == r.node_id && m.draining));
            let Some(learner) = stray.map(|r| r.node_id.clone()).next() else { continue };
            let range_id = range.desc.range_id;
            match self.remove_learner(observation, range, &learner).await {
                Ok(()) => {
                    tracing::info!(range_id, node = %learner, "removed a learner left on a node that left the fleet");
                    self.status.event(format!("removed range {range_id}'s learner on {learner}, which left the fleet"));
                }
                Err(error) => {
                    tracing::warn!(range_id, node = %learner, %error, "removing a learner on a node that left the fleet failed; retrying next round")
                }
            }
        }
    }

    /// Marks as lost (`ObservedRange::lost`, for the planner to re-create elsewhere) the voting
    /// replicas of replicated ranges whose node has not answered for `replace_down_after` (as of
    /// the rounds before this one).
    fn mark_replicas_on_down_nodes(&self, observation: &mut Observation) {
        let after = self.config.replace_down_after;
        let down = |node_id: &str| self.down_too_long(node_id);
        let departed = &observation.departed;
        let nodes = &observation.nodes;
        for range in observation.ranges.values_mut().filter(|r| !r.desc.in_joint_membership()) {
            let voters: Vec<&str> = range
                .desc
                .replicas
                .iter()
                .filter(|r| r.membership() == ReplicaMembership::Voter)
                .map(|r| r.node_id.as_str())
                .collect();
            let on_down: Vec<usize> = voters
                .iter()
                .filter(|id| down(id))
                .filter_map(|id| nodes.iter().position(|n| n.member.node_id == *id))
                .collect();
            // A single copy (one voter, maybe with a learner on the way) has its data there only;
            // a range whose majority is down (or departed) cannot change its membership: both wait.
            let departed_voters = voters.iter().filter(|id| departed.iter().any(|m| m.node_id == **id)).count();
            if voters.len() < 2 || (voters.len() - on_down.len() - departed_voters) * 2 <= voters.len() {
                continue;
            }
            for index in on_down {
                if !range.lost.contains(&index) {
                    range.lost.push(index);
                    let node = &nodes[index].member.node_id;
                    tracing::warn!(range_id = range.desc.range_id, %node, after_secs = after.as_secs(), "a voter's node has not answered for too long: replacing its replica elsewhere");
                }
            }
        }
    }

    /// Marks the voting replicas whose node has answered without a copy for `LOST_AFTER_ROUNDS`
    /// rounds in a row as lost (`ObservedRange::lost`), for the planner to re-create; then those
    /// on nodes down too long (`mark_replicas_on_down_nodes`).
    fn mark_lost_replicas(&mut self, observation: &mut Observation) {
        self.mark_replicas_on_down_nodes(observation);
        let mut missing = HashMap::new();
        for (range_id, index) in observation.copies_missing() {
            let key = (range_id, observation.nodes[index].member.node_id.clone());
            let rounds = self.missing.get(&key).copied().unwrap_or(0) + 1;
            if rounds >= LOST_AFTER_ROUNDS
                && let Some(range) = observation.ranges.get_mut(&range_id)
            {
                if range.lost.is_empty() {
                    tracing::warn!(range_id, node = %key.1, rounds, "a voting replica's node holds no copy: re-creating it");
                }
                range.lost.push(index);
            }
            missing.insert(key, rounds);
        }
        self.missing = missing;
    }

    /// Whether member `node_id` has not answered for `replace_down_after`.
    fn down_too_long(&self, node_id: &str) -> bool {
        self.silent_for(node_id, self.config.replace_down_after)
    }

    /// Whether member `node_id` has not answered for `at_least` (as of the rounds so far).
    fn silent_for(&self, node_id: &str, at_least: Duration) -> bool {
        self.unanswered.get(node_id).is_some_and(|silence| silence.since.elapsed() >= at_least)
    }

    fn unanswered_rounds(&self, node_id: &str) -> u32 {
        self.unanswered.get(node_id).map_or(0, |silence| silence.rounds)
    }

    /// Whether a replica move's target takes ranges: a member, not draining to go away (one
    /// draining to restart comes back), and not silent for `GIVE_UP_AFTER_ROUNDS` rounds in a row
    /// (a restart is a round or two).
    fn target_usable(&self, observation: &Observation, node_id: &str) -> bool {
        observation.node(node_id).is_some_and(|n| !n.member.draining || n.member.restarting)
            && self.unanswered_rounds(node_id) < GIVE_UP_AFTER_ROUNDS
    }

    /// Stops the tasks of replica moves whose target stopped answering or drains; the next
    /// round gives them up (`abandon_replica_move`).
    fn stop_stuck_replica_moves(&mut self, observation: &Observation) {
        let stuck = |m: &&InFlightMove| m.from != m.to && !self.target_usable(observation, &m.to);
        for mv in self.state.moves.iter().filter(stuck) {
            if let Some(LiveMove { task, .. }) = self.live_moves.get(&mv.move_id) {
                tracing::warn!(move_id = mv.move_id, to = %mv.to, "replica move target does not answer or drains; stopping the move");
                task.abort();
            }
        }
    }

    /// Hands range `range_id`'s leadership to node `to` (which holds a voting replica).
    async fn transfer_leader(
        &mut self,
        observation: &Observation,
        range_id: u64,
        to: NodeId,
        reason: &MoveReason,
        now: u64,
    ) {
        let (Some(range), Some(target)) = (observation.ranges.get(&range_id), observation.nodes.get(to.0 as usize))
        else {
            return;
        };
        let leader = &observation.nodes[range.owner].member;
        let to_node_id = target.member.node_id.clone();
        let request =
            with_timeout(TransferLeaderRequest { range_id, to_node_id: to_node_id.clone() }, self.config.rpc_timeout);
        let result: Result<_, String> = async {
            self.clients.admin(leader.admin_address())?.transfer_leader(request).await.map_err(|s| describe_status(&s))
        }
        .await;
        match result {
            Ok(_) => {
                self.state.moved_at.insert(range_id, now);
                tracing::info!(range_id, from = %leader.node_id, to = %to_node_id, %reason, "leadership transferred");
                self.status.action_done(
                    ActionKind::TransferLeader,
                    format!("range {range_id}'s leadership {} -> {to_node_id} ({reason})", leader.node_id),
                );
            }
            Err(error) => {
                tracing::warn!(range_id, %error, "leader transfer failed");
                self.status.action_failed(
                    ActionKind::TransferLeader,
                    format!("leader transfer of range {range_id} to {to_node_id} failed: {error}"),
                );
            }
        }
    }
}

/// Why replica move `mv` (between two nodes) has nothing left to do, if so: done by others
/// meanwhile (a user or a second controller moved the range on: neither node holds a replica of
/// it), or its range is gone (merged away: no node holds it, and every node answered).
fn overtaken(observation: &Observation, mv: &InFlightMove) -> Option<String> {
    if let Some(range) = observation.ranges.get(&mv.range_id) {
        let member = |node: &str| range.desc.replicas.iter().any(|r| r.node_id == node);
        let (from, to) = (mv.from.as_str(), mv.to.as_str());
        return (!member(from) && !member(to))
            .then(|| format!("neither {from} nor {to} holds a replica of it any more (it was moved on meanwhile)"));
    }
    let all_answered = observation.unreachable().next().is_none();
    let held = observation.nodes.iter().any(|n| n.holds(mv.range_id).is_some());
    (all_answered && !held).then(|| "no node holds the range any more (it was merged away)".to_string())
}
