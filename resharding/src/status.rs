//! What the resharding loop reports: the typed fleet view (`crate::fleet`) platforms decide on,
//! the status API people look at (`kvctl status --controller`, the playground's live view; the
//! `kvfleet.v1.Controller` gRPC service renders the fleet view), Prometheus metrics, events, and
//! the log lines of decisions not taken.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use kvfleet_planner::{ActionKind, MoveReason, Plan};
use kvfleet_proto::display_key;
use kvfleet_proto::v1::controller_server::Controller as ControllerApi;
use kvfleet_proto::v1::{
    ControllerStatus, ControllerStatusRequest, HotKeyStatus, MoveStatus, NodeStatus, OwnershipConflict, RangeStatus,
    ReserveRangeIdsRequest, ReserveRangeIdsResponse, SkipCount,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};

use crate::fleet::{Conflict, FleetMove, FleetNode, FleetView, HotKey, MoveCause, MovePhase, NodeState};
use crate::observe::Observation;
use crate::state::ReshardingState;
use crate::state::unix_now;

const RECENT_EVENTS: usize = 20;

/// The labels of one series: the fleet's (`cluster`: `namespace/name` on Kubernetes, `local` in
/// the playground), then the metric's (`kind`, `outcome`, `reason`).
type Labels = Vec<(&'static str, String)>;

/// 0.1 s to about 7 hours: a move's duration is mostly its snapshot's transfer.
fn move_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 18))
}

/// The controller's metrics, one family each, shared by every fleet of the process; a fleet's
/// series go away with it (`StatusBoard::retire`).
pub struct LoopMetrics {
    rounds: Family<Labels, Counter>,
    degraded_rounds: Family<Labels, Counter>,
    actions: Family<Labels, Counter>,
    skips: Family<Labels, Counter>,
    moves_in_flight: Family<Labels, Gauge>,
    move_duration: Family<Labels, Histogram, fn() -> Histogram>,
    ranges: Family<Labels, Gauge>,
    conflicts: Family<Labels, Gauge>,
}

impl LoopMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = LoopMetrics {
            rounds: Family::default(),
            degraded_rounds: Family::default(),
            actions: Family::default(),
            skips: Family::default(),
            moves_in_flight: Family::default(),
            move_duration: Family::new_with_constructor(move_histogram),
            ranges: Family::default(),
            conflicts: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("kvfleet_controller");
        r.register("rounds", "Control rounds run", metrics.rounds.clone());
        r.register("degraded_rounds", "Rounds that could not reach every node", metrics.degraded_rounds.clone());
        r.register("actions", "Splits, merges and moves, by outcome", metrics.actions.clone());
        r.register("skips", "Planner decisions not taken, by reason", metrics.skips.clone());
        r.register("moves_in_flight", "Moves started and not finished", metrics.moves_in_flight.clone());
        r.register(
            "move_duration_seconds",
            "Time from a move's start to its target voting and its source removed (resumed moves included)",
            metrics.move_duration.clone(),
        );
        r.register("ranges", "Ranges in the cluster", metrics.ranges.clone());
        r.register(
            "ownership_conflicts",
            "Pairs of overlapping owned ranges (keys more than one node would serve); must be 0",
            metrics.conflicts.clone(),
        );
        Arc::new(metrics)
    }

    fn remove(&self, labels: &Labels) {
        self.rounds.remove(labels);
        self.degraded_rounds.remove(labels);
        self.actions.remove(labels);
        self.skips.remove(labels);
        self.moves_in_flight.remove(labels);
        self.move_duration.remove(labels);
        self.ranges.remove(labels);
        self.conflicts.remove(labels);
    }
}

/// An event of the control loop, for platforms that publish them (Kubernetes Events).
#[derive(Debug, Clone, PartialEq)]
pub struct BoardEvent {
    /// Split, Merge, Move, MoveFinished, ActionFailed, HotKey, OwnershipConflict, Resharding.
    pub reason: &'static str,
    pub warning: bool,
    pub text: String,
}

struct Board {
    fleet: FleetView,
    /// The status API's answer, but for what `snapshot` adds.
    status: ControllerStatus,
    sink: Option<tokio::sync::mpsc::UnboundedSender<BoardEvent>>,
    skips: BTreeMap<&'static str, (u64, String)>,
    events: VecDeque<String>,
    /// (kind, range) of the decisions not taken last round: each is logged when it first appears.
    last_skips: HashSet<(&'static str, Option<u64>)>,
    /// Hot keys of the last round: each new one becomes an event.
    last_hot_keys: HashSet<Vec<u8>>,
    /// Ownership conflicts of the last round, as (node, range id) pairs: each new one becomes a
    /// warning event.
    last_conflicts: HashSet<(usize, u64, usize, u64)>,
    /// Where reservations of range ids go, and their receiver until a loop takes it (requests
    /// made before the loop runs wait for it).
    reservations: mpsc::Sender<IdReservation>,
    unclaimed_reservations: Option<mpsc::Receiver<IdReservation>>,
}

/// The most range ids one reservation may ask for.
pub const MAX_RESERVED_IDS: u32 = 16;
/// Reservations waiting for the loop (it answers them between rounds).
const RESERVATION_QUEUE: usize = 16;

/// A request for fresh range ids, answered by the loop with the first one.
pub struct IdReservation {
    pub count: u32,
    /// The node that will use them (data address); the loop refuses one not in its fleet.
    pub node_address: String,
    pub reply: oneshot::Sender<Result<u64, tonic::Status>>,
}

/// Shared between the control loop (writes) and the status service and live view (read).
#[derive(Clone)]
pub struct StatusBoard {
    board: Arc<parking_lot::Mutex<Board>>,
    metrics: Arc<LoopMetrics>,
    /// This fleet's labels on every series, and every label set it wrote (to retire them).
    base: Labels,
    written: Arc<parking_lot::Mutex<HashSet<Labels>>>,
}

impl StatusBoard {
    /// The board of the only fleet of a process (the playground), its metrics registered in
    /// `registry` with `cluster="local"`.
    pub fn new(registry: &mut Registry) -> Self {
        StatusBoard::for_fleet(LoopMetrics::register(registry), vec![("cluster", "local".into())])
    }

    /// A board writing `metrics` with `base` labels (`cluster`: one of many fleets).
    pub fn for_fleet(metrics: Arc<LoopMetrics>, base: Labels) -> Self {
        let (reservations, unclaimed_reservations) = mpsc::channel(RESERVATION_QUEUE);
        StatusBoard {
            board: Arc::new(parking_lot::Mutex::new(Board {
                fleet: FleetView::default(),
                status: ControllerStatus::default(),
                sink: None,
                skips: BTreeMap::new(),
                events: VecDeque::new(),
                last_skips: HashSet::new(),
                last_hot_keys: HashSet::new(),
                last_conflicts: HashSet::new(),
                reservations,
                unclaimed_reservations: Some(unclaimed_reservations),
            })),
            metrics,
            base,
            written: Default::default(),
        }
    }

    /// The labels of a series of this fleet: its own, then `extra`.
    fn labels(&self, extra: &[(&'static str, &str)]) -> Labels {
        let mut labels = self.base.clone();
        labels.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        self.written.lock().insert(labels.clone());
        labels
    }

    /// Removes every series this fleet wrote (its cluster was deleted).
    pub fn retire(&self) {
        for labels in self.written.lock().drain() {
            self.metrics.remove(&labels);
        }
    }

    /// The fleet after the last round.
    pub fn fleet(&self) -> FleetView {
        self.board.lock().fleet.clone()
    }

    /// The status API's answer.
    pub fn snapshot(&self) -> ControllerStatus {
        let board = self.board.lock();
        let mut status = board.status.clone();
        status.recent_events = board.events.iter().cloned().collect();
        status.skips = board
            .skips
            .iter()
            .map(|(kind, (count, last))| SkipCount { kind: kind.to_string(), count: *count, last: last.clone() })
            .collect();
        status
    }

    /// The receiver of range id reservations, for the loop running on this board (a loop
    /// started again on the same board gets a new one).
    pub fn take_reservations(&self) -> mpsc::Receiver<IdReservation> {
        let mut board = self.board.lock();
        board.unclaimed_reservations.take().unwrap_or_else(|| {
            let (sender, receiver) = mpsc::channel(RESERVATION_QUEUE);
            board.reservations = sender;
            receiver
        })
    }

    /// Asks the loop for `count` fresh range ids for `node_address`; the first of them.
    pub async fn reserve_range_ids(&self, count: u32, node_address: String) -> Result<u64, tonic::Status> {
        if !(1..=MAX_RESERVED_IDS).contains(&count) {
            return Err(tonic::Status::invalid_argument(format!(
                "count must be between 1 and {MAX_RESERVED_IDS} (got {count})"
            )));
        }
        let not_running = || tonic::Status::unavailable("no resharding loop runs here to reserve range ids");
        let sender = self.board.lock().reservations.clone();
        let (reply, answer) = oneshot::channel();
        sender.send(IdReservation { count, node_address, reply }).await.map_err(|_| not_running())?;
        answer.await.map_err(|_| not_running())?
    }

    /// Every event from now on is also sent to `sink`.
    pub fn set_event_sink(&self, sink: tokio::sync::mpsc::UnboundedSender<BoardEvent>) {
        self.board.lock().sink = Some(sink);
    }

    pub fn event(&self, text: String) {
        self.publish("Resharding", false, text);
    }

    /// A node that is not a member of the fleet still votes in ranges.
    pub fn node_left_fleet(&self, text: String) {
        self.publish("NodeLeftFleet", true, text);
    }

    pub fn merge_aborted(&self, text: String) {
        self.publish("MergeAborted", true, text);
    }

    fn publish(&self, reason: &'static str, warning: bool, text: String) {
        let mut board = self.board.lock();
        if let Some(sink) = &board.sink {
            // A closed sink (its forwarder ended) only loses the copy; the board keeps the event.
            let _ = sink.send(BoardEvent { reason, warning, text: text.clone() });
        }
        if board.events.len() == RECENT_EVENTS {
            board.events.pop_front();
        }
        let clock = unix_now().as_secs() % 86_400;
        board.events.push_back(format!("{:02}:{:02}:{:02} {text}", clock / 3600, clock / 60 % 60, clock % 60));
    }

    pub fn action_done(&self, kind: ActionKind, text: String) {
        self.metrics.actions.get_or_create(&self.labels(&[("kind", kind.label()), ("outcome", "started")])).inc();
        self.publish(kind.event_reason(), false, text);
    }

    pub fn action_failed(&self, kind: ActionKind, text: String) {
        self.metrics.actions.get_or_create(&self.labels(&[("kind", kind.label()), ("outcome", "failed")])).inc();
        self.publish("ActionFailed", true, text);
    }

    /// A move finished (its target votes, its source is removed) after `took`.
    pub fn move_finished(&self, took: std::time::Duration, text: String) {
        let kind = ActionKind::Move.label();
        self.metrics.actions.get_or_create(&self.labels(&[("kind", kind), ("outcome", "finished")])).inc();
        self.metrics.move_duration.get_or_create(&self.labels(&[])).observe(took.as_secs_f64());
        self.publish("MoveFinished", false, text);
    }

    /// Records what a round saw and decided; logs a decision not taken when it first appears for
    /// its range (most repeat every round, with only a number changing).
    pub fn record_round(
        &self,
        observation: &Observation,
        plan: &Plan,
        state: &ReshardingState,
        live_moves: &HashMap<u64, MoveReason>,
        degraded: bool,
        replication_factor: usize,
    ) {
        let labels = self.labels(&[]);
        self.metrics.rounds.get_or_create(&labels).inc();
        if degraded {
            self.metrics.degraded_rounds.get_or_create(&labels).inc();
        }
        self.metrics.moves_in_flight.get_or_create(&labels).set(state.moves.len() as i64);
        self.metrics.ranges.get_or_create(&labels).set(observation.ranges.len() as i64);
        self.metrics.conflicts.get_or_create(&labels).set(observation.conflicts.len() as i64);
        for skip in &plan.skipped {
            self.metrics.skips.get_or_create(&self.labels(&[("reason", skip.kind())])).inc();
        }

        let mut board = self.board.lock();
        let skips: HashSet<(&'static str, Option<u64>)> = plan.skipped.iter().map(|s| (s.kind(), s.range())).collect();
        for skip in plan.skipped.iter().filter(|s| !board.last_skips.contains(&(s.kind(), s.range()))) {
            tracing::info!(reason = %skip, kind = skip.kind(), "planner: not acting");
        }
        board.last_skips = skips;
        for skip in &plan.skipped {
            let entry = board.skips.entry(skip.kind()).or_insert((0, String::new()));
            entry.0 += 1;
            entry.1 = skip.to_string();
        }

        let fleet = fleet_view(board.fleet.round + 1, observation, plan, state, live_moves, replication_factor);
        let now_ms = unix_now().as_millis() as u64;
        let status = &mut board.status;
        status.round = fleet.round;
        status.last_round_unix_ms = now_ms;
        if degraded {
            status.degraded_rounds += 1;
        }
        status.nodes = fleet.nodes.iter().map(node_status).collect();
        status.conflicts = fleet
            .conflicts
            .iter()
            .map(|c| OwnershipConflict {
                newer: Some(c.newer.1.clone()),
                newer_node: c.newer.0.clone(),
                older: Some(c.older.1.clone()),
                older_node: c.older.0.clone(),
            })
            .collect();
        status.ranges = observation
            .ranges
            .values()
            .map(|r| {
                let hot = r.load.hot_keys.first();
                RangeStatus {
                    range_id: r.desc.range_id,
                    start_key: r.desc.start_key.clone(),
                    end_key: r.desc.end_key.clone(),
                    generation: r.desc.generation,
                    owner: observation.nodes[r.owner].member.node_id.clone(),
                    state: r.desc.state,
                    ops_per_sec: r.load.reads_per_sec + r.load.writes_per_sec,
                    bytes_per_sec: r.load.read_bytes_per_sec + r.load.write_bytes_per_sec,
                    size_bytes: r.load.approx_size_bytes,
                    hot_key: hot.map(|h| h.key.clone()).unwrap_or_default(),
                    hot_key_ops_per_sec: hot.map_or(0.0, |h| h.ops_per_sec),
                    replicas: if r.is_raft_group() {
                        r.desc.replicas.iter().map(|v| v.node_id.clone()).collect()
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        status.replication_factor = replication_factor as u32;
        status.under_replicated = fleet.under_replicated.clone();
        status.leaderless = fleet.leaderless.clone();
        status.moves = fleet.moves.iter().map(|m| move_status(m, now_ms)).collect();
        status.hot_keys = fleet
            .hot_keys
            .iter()
            .map(|h| HotKeyStatus { range_id: h.range_id, key: h.key.clone().into(), ops_per_sec: h.ops_per_sec })
            .collect();
        let node_id = |index: usize| observation.nodes[index].member.node_id.clone();
        let hot_now: HashSet<Vec<u8>> = plan.hot_keys.iter().map(|h| h.1.to_vec()).collect();
        let new_hot: Vec<String> = plan
            .hot_keys
            .iter()
            .filter(|h| !board.last_hot_keys.contains(h.1.as_ref() as &[u8]))
            .map(|h| format!("hot key {} in range {}: {:.0} ops/s", display_key(&h.1), h.0, h.2))
            .collect();
        board.last_hot_keys = hot_now;
        let conflicts_now: HashSet<(usize, u64, usize, u64)> = observation
            .conflicts
            .iter()
            .map(|c| (c.newer.0, c.newer.1.range_id, c.older.0, c.older.1.range_id))
            .collect();
        let new_conflicts: Vec<String> = observation
            .conflicts
            .iter()
            .filter(|c| !board.last_conflicts.contains(&(c.newer.0, c.newer.1.range_id, c.older.0, c.older.1.range_id)))
            .map(|c| {
                format!(
                    "ownership conflict: range {} {} at generation {} on {} overlaps range {} {} at generation {} on \
                     {}, both active: acknowledged writes may diverge; nothing is planned on these keys until an \
                     operator resolves it",
                    c.older.1.range_id,
                    c.older.1.span(),
                    c.older.1.generation,
                    node_id(c.older.0),
                    c.newer.1.range_id,
                    c.newer.1.span(),
                    c.newer.1.generation,
                    node_id(c.newer.0)
                )
            })
            .collect();
        board.last_conflicts = conflicts_now;
        board.fleet = fleet;
        drop(board);
        for text in new_hot {
            tracing::info!("{text}");
            self.publish("HotKey", false, text);
        }
        for text in new_conflicts {
            tracing::error!("{text}");
            self.publish("OwnershipConflict", true, text);
        }
    }
}

/// The typed fleet view of one round.
fn fleet_view(
    round: u64,
    observation: &Observation,
    plan: &Plan,
    state: &ReshardingState,
    live_moves: &HashMap<u64, MoveReason>,
    replication_factor: usize,
) -> FleetView {
    let nodes = observation
        .nodes
        .iter()
        .map(|node| {
            let owned: Vec<_> =
                node.report.iter().flat_map(|r| r.load.ranges.iter().filter(|l| l.range.is_some())).collect();
            let state = match (&node.report, node.member.draining) {
                (Err(error), _) => NodeState::Down { error: error.clone() },
                (Ok(_), true) => NodeState::Draining,
                (Ok(_), false) => NodeState::Up,
            };
            let following =
                node.owned().filter(|d| d.is_raft_group() && !crate::observe::leads(d, &node.member.node_id)).count();
            FleetNode {
                name: node.member.node_id.clone(),
                address: node.member.address.clone(),
                state,
                ranges: owned.len() as u32,
                following: following as u32,
                // `+ 0.0`: an empty sum is -0.0, shown as "-0".
                ops_per_sec: owned.iter().map(|l| l.reads_per_sec + l.writes_per_sec).sum::<f64>() + 0.0,
                size_bytes: owned.iter().map(|l| l.approx_size_bytes).sum(),
                restarts: node.member.restarts,
            }
        })
        .collect();
    let name = |index: usize| observation.nodes[index].member.node_id.clone();
    let moves = state
        .moves
        .iter()
        .map(|m| {
            let (phase, cause) = match live_moves.get(&m.move_id) {
                Some(reason) => (MovePhase::Moving, MoveCause::Planned(reason.clone())),
                None => (MovePhase::Recovering, MoveCause::Recorded(m.reason.clone())),
            };
            FleetMove {
                move_id: m.move_id,
                range_id: m.range_id,
                from: m.from.clone(),
                to: m.to.clone(),
                phase,
                cause,
                started_unix_ms: m.started_unix_ms,
            }
        })
        .collect();
    FleetView {
        round,
        nodes,
        ranges: observation.ranges.len(),
        moves,
        conflicts: observation
            .conflicts
            .iter()
            .map(|c| Conflict {
                older: (name(c.older.0), c.older.1.clone()),
                newer: (name(c.newer.0), c.newer.1.clone()),
            })
            .collect(),
        hot_keys: plan
            .hot_keys
            .iter()
            .map(|(range_id, key, ops)| HotKey { range_id: *range_id, key: key.clone(), ops_per_sec: *ops })
            .collect(),
        replication_factor,
        under_replicated: observation.under_replicated(replication_factor),
        leaderless: observation.leaderless.clone(),
    }
}

fn node_status(node: &FleetNode) -> NodeStatus {
    NodeStatus {
        node_id: node.name.clone(),
        address: node.address.clone(),
        node_state: node.state.to_wire() as i32,
        state: node.state.to_string(),
        ranges: node.ranges,
        ops_per_sec: node.ops_per_sec,
        size_bytes: node.size_bytes,
        restarts: node.restarts,
    }
}

fn move_status(m: &FleetMove, now_ms: u64) -> MoveStatus {
    MoveStatus {
        move_id: m.move_id,
        range_id: m.range_id,
        from: m.from.clone(),
        to: m.to.clone(),
        phase: match m.phase {
            MovePhase::Moving => format!("moving ({})", m.cause),
            MovePhase::Recovering => "recovering".into(),
        },
        running_ms: now_ms.saturating_sub(m.started_unix_ms),
        reason: m.cause.to_string(),
    }
}

/// The `kvfleet.v1.Controller` gRPC service.
pub struct StatusService {
    pub board: StatusBoard,
}

#[tonic::async_trait]
impl ControllerApi for StatusService {
    async fn status(
        &self,
        _: tonic::Request<ControllerStatusRequest>,
    ) -> Result<tonic::Response<ControllerStatus>, tonic::Status> {
        Ok(tonic::Response::new(self.board.snapshot()))
    }

    async fn reserve_range_ids(
        &self,
        request: tonic::Request<ReserveRangeIdsRequest>,
    ) -> Result<tonic::Response<ReserveRangeIdsResponse>, tonic::Status> {
        let ReserveRangeIdsRequest { count, node_address } = request.into_inner();
        let first = self.board.reserve_range_ids(count, node_address).await?;
        Ok(tonic::Response::new(ReserveRangeIdsResponse { first, count }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn a_deleted_fleets_series_go_away_and_the_others_stay() {
        let mut registry = Registry::default();
        let metrics = LoopMetrics::register(&mut registry);
        let a = StatusBoard::for_fleet(metrics.clone(), vec![("cluster", "ns/a".into())]);
        let b = StatusBoard::for_fleet(metrics, vec![("cluster", "ns/b".into())]);
        a.action_done(ActionKind::Split, "split range 1".into());
        b.action_done(ActionKind::Split, "split range 7".into());
        let text = scrape(&registry);
        assert!(
            text.contains(r#"kvfleet_controller_actions_total{cluster="ns/a",kind="split",outcome="started"} 1"#),
            "{text}"
        );
        a.retire();
        let text = scrape(&registry);
        assert!(!text.contains("ns/a"), "{text}");
        assert!(
            text.contains(r#"kvfleet_controller_actions_total{cluster="ns/b",kind="split",outcome="started"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn reservations_wait_for_the_loop_and_bad_counts_are_refused() {
        let board = StatusBoard::new(&mut Registry::default());
        let refused = board.reserve_range_ids(0, "127.0.0.1:7700".into()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert_eq!(refused.message(), "count must be between 1 and 16 (got 0)");
        // Asked before any loop runs: the request waits for it.
        let asking = tokio::spawn({
            let board = board.clone();
            async move { board.reserve_range_ids(2, "127.0.0.1:7700".into()).await }
        });
        let mut loop_side = board.take_reservations();
        let request = loop_side.recv().await.unwrap();
        assert_eq!((request.count, request.node_address.as_str()), (2, "127.0.0.1:7700"));
        assert!(request.reply.send(Ok(7)).is_ok());
        assert_eq!(asking.await.unwrap().unwrap(), 7);
        // The loop is gone: nobody answers, and the caller hears so.
        drop(loop_side);
        let gone = board.reserve_range_ids(1, "127.0.0.1:7700".into()).await.unwrap_err();
        assert_eq!(gone.code(), tonic::Code::Unavailable);
        // A loop started again on the same board takes reservations again.
        let mut again = board.take_reservations();
        let asking = tokio::spawn({
            let board = board.clone();
            async move { board.reserve_range_ids(1, "127.0.0.1:7700".into()).await }
        });
        let request = again.recv().await.unwrap();
        assert!(request.reply.send(Ok(9)).is_ok());
        assert_eq!(asking.await.unwrap().unwrap(), 9);
    }

    #[test]
    fn the_only_fleet_of_a_process_is_the_local_one() {
        let mut registry = Registry::default();
        let board = StatusBoard::new(&mut registry);
        board.action_done(ActionKind::Merge, "merged".into());
        let text = scrape(&registry);
        assert!(
            text.contains(r#"kvfleet_controller_actions_total{cluster="local",kind="merge",outcome="started"} 1"#),
            "{text}"
        );
    }
}
