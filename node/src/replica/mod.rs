//! Replicated ranges on this node: a range with several replicas is a Raft group (raft-rs,
//! driven by `kvfleet-replication`). A write is proposed to the group's log and acknowledged once
//! a majority of replicas has it durably and this node applied it; a linearizable read waits
//! until this node has applied a read index the leader confirmed with a quorum (ReadIndex).
//!
//! Where things live: `driver` (the thread that owns every group of this node: ticks, proposals,
//! reads, incoming messages, one fsynced log write per pass, applying what committed, compacting
//! logs), `transport` (Raft messages between nodes, batched per peer, which peers answer, and
//! snapshot files fetched from the leader), `apply` (the commands a log carries and how they
//! change the data), `snapshot` (a range's data as one file, for a follower the log cannot
//! catch up any more).

pub mod apply;
pub mod driver;
pub mod fast_ack;
pub mod peer_features;
pub mod snapshot;
pub mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfleet_proto::v1::{Mutation, RangeDescriptor, ReplicaRole};
use kvfleet_replication::{Envelope, GroupStorage};
use parking_lot::RwLock;
use tokio::sync::oneshot;

/// One Raft tick. Elections time out after 10 to 20 ticks without a leader (1 to 2 s), leaders
/// heartbeat every 2 ticks.
pub const TICK: Duration = Duration::from_millis(100);
/// The shortest election timeout (10 ticks; raft-rs randomizes it up to twice that). A follower
/// that heard from its leader rejects votes for this long (check-quorum), measured in its own
/// ticks, which are never shorter than `TICK`.
pub const ELECTION_TIMEOUT: Duration = Duration::from_millis(1000);
/// A leader's lease: from the instant it asked a read index that a quorum then confirmed, it
/// serves linearizable reads without asking again for this long. Every voter of that quorum
/// heard from it after that instant and rejects votes for `ELECTION_TIMEOUT` (a restarted one
/// refuses votes for as long after its start), so no other leader can be elected before it
/// ends; the leader itself refuses votes while its lease runs. Ten ticks after a heartbeat can
/// take only nine full intervals (900 ms): the margin to that covers clocks that run up to 20%
/// apart. A paused leader (SIGSTOP) finds its lease expired when it wakes, because the monotonic
/// clock ran on.
pub const LEASE: Duration = Duration::from_millis(750);
/// A proposal not committed and applied within this long is answered "outcome unknown".
pub const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(10);
/// A read whose read index is not granted within this long is answered "retry".
pub const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(2);
/// A follower that has not caught up within this long (or twice the time its file takes at the
/// send rate, if longer) after the leader sent it a snapshot is sent another (the fetch failed,
/// or the follower restarted).
pub const SNAPSHOT_TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest staleness a STALE read may ask for.
pub const MAX_STALENESS: Duration = Duration::from_secs(60);

/// What a read promises, as a request asked it (see `ReadConsistency` in kv.proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    Linearizable,
    Follower,
    /// Any replica whose data holds every write acknowledged more than this long ago.
    Stale(Duration),
}

impl ReadMode {
    /// The mode a request asks for, checked: a STALE read names its bound, within
    /// `MAX_STALENESS`.
    pub fn of(consistency: kvfleet_proto::v1::ReadConsistency, max_staleness_ms: u32) -> Result<Self, String> {
        use kvfleet_proto::v1::ReadConsistency::*;
        match consistency {
            Unspecified | Linearizable => Ok(ReadMode::Linearizable),
            Follower => Ok(ReadMode::Follower),
            Stale => {
                let bound = Duration::from_millis(u64::from(max_staleness_ms));
                if bound.is_zero() || bound > MAX_STALENESS {
                    return Err(format!(
                        "a STALE read needs max_staleness_ms from 1 to {}, got {max_staleness_ms}",
                        MAX_STALENESS.as_millis()
                    ));
                }
                Ok(ReadMode::Stale(bound))
            }
        }
    }
}

/// A node's id in Raft groups: FNV-1a of its node id (never 0, raft-rs's "nobody"). Stable
/// across restarts and computed the same by every node.
pub fn raft_id_of(node_id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash.max(1)
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicaError {
    #[error("this node does not lead range {range_id}")]
    NotLeader { range_id: u64, leader: Option<u64> },
    #[error("range {range_id} is not replicated on this node")]
    NoGroup { range_id: u64 },
    #[error(
        "the write to range {range_id} was replaced by a new leader's log before it committed: it was not applied; retry"
    )]
    Superseded { range_id: u64 },
    #[error("the write to range {range_id} may or may not have been applied: {reason}")]
    OutcomeUnknown { range_id: u64, reason: String },
    #[error(
        "range {range_id}: leadership not confirmed by a quorum within {} ms (the leader may be cut off, or an election is under way); retry",
        READ_INDEX_TIMEOUT.as_millis()
    )]
    ReadNotConfirmed { range_id: u64 },
    #[error(
        "the write to range {range_id} was ordered after a split that moved some of its keys to another range: it was not applied; retry"
    )]
    OutsideRange { range_id: u64 },
    #[error(
        "range {range_id} is frozen to be merged into its left neighbour: the write was not applied; retry (the merged range will take it)"
    )]
    Merging { range_id: u64 },
    #[error("range {range_id} was not merged: {reason}")]
    MergeRefused { range_id: u64, reason: String },
    #[error("range {range_id} was not split: {reason}")]
    SplitRefused { range_id: u64, reason: String },
    #[error("range {range_id}'s membership was not changed: {reason}")]
    MembershipRefused { range_id: u64, reason: String },
    /// Not now: a learner still catching up, another change not applied yet, a leadership
    /// transfer under way.
    #[error("range {range_id} cannot take it now: {reason}")]
    MembershipBusy { range_id: u64, reason: String },
    #[error("a log command of range {range_id} does not encode: {reason}")]
    BadCommand { range_id: u64, reason: String },
    #[error("replication stopped: {0}")]
    Stopped(String),
}

/// What the driver publishes for the request handlers: each group's leader (Raft id) as it last
/// saw it, for routing hints (after the passes that touch a group and on every tick), and the
/// leases under which this node serves linearizable reads without a hop through the driver.
#[derive(Default)]
pub struct Published {
    pub leaders: RwLock<HashMap<u64, Option<u64>>>,
    /// Per group, when this node's read lease ends. Published only once this node has applied
    /// the read index that granted the lease: its data then holds every write acknowledged
    /// before the lease began, and it acknowledges every later write only after applying it.
    pub read_leases: RwLock<HashMap<u64, std::time::Instant>>,
    /// Per group, the latest instant as of which this replica's data is known current: it
    /// applied a read index asked at that instant (which covers every write acknowledged
    /// before it). STALE reads within their bound of it are served without a round trip.
    pub current_as_of: RwLock<HashMap<u64, std::time::Instant>>,
    /// Groups with writes this node acknowledged early (`fast` durability) and has not applied
    /// yet: no read is served from the lease until it has.
    pub unapplied_acks: RwLock<std::collections::HashSet<u64>>,
}

/// A group to start on this node.
pub struct OpenGroup {
    pub range_id: u64,
    pub storage: GroupStorage,
    /// The index the data already reflects (persisted with the data).
    pub applied: u64,
    /// Every replica's Raft id and address (this node's included).
    pub members: Vec<(u64, String)>,
    /// The range's keys.
    pub span: snapshot::Span,
    pub campaign: Campaign,
}

/// Whether a group opened on this node campaigns without waiting for raft-rs's election timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Campaign {
    /// When raft-rs's election timeout says so.
    OnTimeout,
    /// At once, but not before the node has been up one election timeout (a lone voter opened
    /// from its log: its vote may have counted for a lease before a restart; see the driver's
    /// `open`).
    OnceVotesOpen,
    /// At once: a group this node creates now (bootstrap), which nobody has ever led.
    Now,
}

pub type Reply = oneshot::Sender<Result<(), ReplicaError>>;

/// A change of a replicated range made on the Raft thread.
pub enum RangeChange<'a> {
    /// A split applied from the log.
    Split(&'a apply::SplitApplied),
    /// The range's descriptor changed without a split here: a membership change applied from
    /// the log, or a snapshot taken after splits or changes this replica missed (the range may
    /// be narrower now).
    Replaced(&'a RangeDescriptor),
    /// A replica added to the range installed its first snapshot: this node holds it now.
    Added(&'a RangeDescriptor),
    /// This node's replica was removed from the range (the descriptor: the retired range, with
    /// the replicas that remain). Its data is to be deleted once no request uses it.
    Removed(&'a RangeDescriptor),
    /// The range took its frozen right neighbour's keys (a merge applied from the log, or a
    /// snapshot taken after one): `left` is its new descriptor, `right` the neighbour's tombstone
    /// here. The data stays.
    Merged { left: &'a RangeDescriptor, right: &'a RangeDescriptor },
}

/// Called on the Raft thread with every `RangeChange`, once it is durable and before any request
/// is answered from the changed ranges: the node's range table learns them.
pub type OnRangeChange = Box<dyn Fn(RangeChange<'_>) + Send>;

/// What a proposal is, for what the leader does meanwhile (see `Driver::propose`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposalKind {
    /// Mutations: may be acknowledged before a majority has them, in `fast` durability.
    Write,
    /// A split or a freeze: it changes which keys the range serves once applied, so the leader
    /// holds no lease and acknowledges nothing early until it is.
    Narrowing,
    /// Anything else (a merge).
    Other,
}

pub enum Input {
    Open(Box<OpenGroup>),
    Propose {
        range_id: u64,
        command: Vec<u8>,
        reply: Reply,
        kind: ProposalKind,
    },
    Read {
        range_id: u64,
        reply: Reply,
        on_follower: bool,
    },
    Deliver(Vec<Envelope>),
    /// A membership change for `range_id` (see `Replication::change_membership`).
    ChangeMembership {
        range_id: u64,
        change: kvfleet_replication::ConfChangeV2,
        context: Vec<u8>,
        /// Learners the change makes voters: each must have caught up first.
        promotes: Vec<u64>,
        reply: Reply,
    },
    /// Hands leadership of `range_id` to the voter `to` (see `Replication::transfer_leader`).
    TransferLeader {
        range_id: u64,
        to: u64,
        reply: Reply,
    },
    /// This node's replica of `range_id` is not in the range's membership at `conf_version`
    /// (see `Replication::drop_stale`).
    DropStale {
        range_id: u64,
        conf_version: u64,
    },
    /// On the leader of `range_id`: the lowest log index every replica holds, and whether
    /// every replica was heard from lately (see `Replication::lowest_match`).
    LowestMatch {
        range_id: u64,
        reply: oneshot::Sender<Option<(u64, bool)>>,
    },
    /// How far behind each replica of the groups this node leads is (see `Replication::lag`).
    Lag {
        reply: oneshot::Sender<HashMap<u64, Vec<(u64, u64)>>>,
    },
    /// A follower fetched (`delivered`) or failed to fetch the snapshot the leader sent it.
    SnapshotReport {
        range_id: u64,
        to: u64,
        delivered: bool,
    },
    Stop,
}

/// How this node keeps its Raft logs and snapshots.
#[derive(Debug, Clone)]
pub struct ReplicationSettings {
    /// Snapshot files go in `<data_dir>/raft-snapshots`.
    pub data_dir: std::path::PathBuf,
    /// Applied entries kept in a group's log for followers that fall behind; a follower further
    /// behind gets a snapshot. The log is compacted once it holds twice this many.
    pub log_keep_entries: u64,
    /// A key past every key (the end of a range without an end, for deleting it).
    pub key_space_end: Vec<u8>,
    /// Snapshot files leave this node at most this fast, all together (0: unlimited).
    pub snapshot_send_bytes_per_sec: u64,
    /// `fast` durability (see `fast_ack`), with its metrics; `None`: `majority`.
    pub fast_ack: Option<fast_ack::FastAckMetrics>,
    /// `async` durability for single copies: the log writes of ranges of one voter are not
    /// fsynced before their writes are acknowledged (`LogStore::with_lone_voters_unsynced`).
    pub unsynced_single_copies: bool,
}

/// This node's replication: a handle on the driver thread.
pub struct Replication {
    raft_id: u64,
    inbox: std::sync::mpsc::Sender<Input>,
    published: Arc<Published>,
    pub(crate) liveness: transport::Liveness,
    driver: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Every peer's address by Raft id (to fetch snapshots from), kept by the Raft thread too
    /// as membership changes add replicas.
    addresses: Arc<RwLock<HashMap<u64, String>>>,
    pub(crate) fetcher: transport::SnapshotFetcher,
    pub(crate) send_pacer: transport::SendPacer,
    /// What each peer node was last heard to support.
    pub(crate) peer_features: peer_features::PeerFeatures,
    /// `fast` durability: reads check `Published::unapplied_acks`.
    fast_ack: bool,
}

impl Replication {
    /// Starts the driver thread over the node's RocksDB (data and Raft logs share it); it
    /// reaches peers through `channels`, sending `token` on every call.
    pub fn start(
        node_id: &str,
        db: Arc<rocksdb::DB>,
        channels: kvfleet_client::ChannelPool,
        token: kvfleet_proto::admin_auth::AdminToken,
        settings: ReplicationSettings,
        on_range_change: OnRangeChange,
    ) -> Result<Self, crate::error::NodeError> {
        let raft_id = raft_id_of(node_id);
        let send_pacer = transport::SendPacer::new(settings.snapshot_send_bytes_per_sec);
        let peer_features = peer_features::PeerFeatures::load(db.clone()).map_err(crate::error::NodeError::Corrupt)?;
        let mut log = kvfleet_replication::LogStore::with_db(db.clone())
            .map_err(|e| crate::error::NodeError::Corrupt(format!("opening the Raft logs: {e}")))?;
        if settings.unsynced_single_copies {
            log = log.with_lone_voters_unsynced();
        }
        let (inbox, receiver) = std::sync::mpsc::channel();
        let published = Arc::new(Published::default());
        let files = snapshot::SnapshotFiles::new(&settings.data_dir);
        let fetcher = transport::SnapshotFetcher::new(files, channels.clone(), token.clone());
        let peers = transport::PeerLinks::new(node_id, raft_id, channels, token);
        let liveness = peers.liveness();
        let addresses: Arc<RwLock<HashMap<u64, String>>> = Arc::default();
        let fast_ack = settings.fast_ack.is_some();
        let driver = driver::Driver::new(
            raft_id,
            db,
            log,
            peers,
            published.clone(),
            settings,
            on_range_change,
            addresses.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("kv-raft".into())
            .spawn(move || {
                // A panic in raft-rs (a bug, or a message it cannot take) must not leave a node
                // that answers Deliver while no group runs: stop the process instead.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| driver.run(receiver))).is_err() {
                    tracing::error!("the Raft thread panicked; stopping the node");
                    eprintln!("kvfleet-node: the Raft thread panicked");
                    std::process::abort();
                }
            })
            .map_err(|source| crate::error::NodeError::Io { context: "spawning the Raft thread".into(), source })?;
        Ok(Replication {
            raft_id,
            inbox,
            published,
            liveness,
            driver: parking_lot::Mutex::new(Some(handle)),
            addresses,
            fetcher,
            send_pacer,
            peer_features,
            fast_ack,
        })
    }

    pub fn raft_id(&self) -> u64 {
        self.raft_id
    }

    fn send(&self, input: Input) -> Result<(), ReplicaError> {
        self.inbox.send(input).map_err(|_| ReplicaError::Stopped("the Raft thread is gone".into()))
    }

    pub fn open(&self, group: OpenGroup) -> Result<(), ReplicaError> {
        self.addresses.write().extend(group.members.iter().cloned());
        self.send(Input::Open(Box::new(group)))
    }

    /// Tells the group whether follower `to` fetched the snapshot it was sent.
    pub fn report_snapshot(&self, range_id: u64, to: u64, delivered: bool) {
        let _ = self.send(Input::SnapshotReport { range_id, to, delivered });
    }

    /// Where this node's snapshot files are.
    pub fn snapshot_files(&self) -> &snapshot::SnapshotFiles {
        self.fetcher.files()
    }

    /// The address of the node with Raft id `raft_id`, if a group here has it as a member.
    pub fn address_of(&self, raft_id: u64) -> Option<String> {
        self.addresses.read().get(&raft_id).cloned()
    }

    /// Appends `mutations` to the log of `range_id` and waits until they are committed by a
    /// majority and applied here.
    pub async fn propose(&self, range_id: u64, mutations: Vec<Mutation>) -> Result<(), ReplicaError> {
        let command = apply::encode_command(mutations);
        let (reply, answer) = oneshot::channel();
        self.send(Input::Propose { range_id, command, reply, kind: ProposalKind::Write })?;
        await_reply(answer).await
    }

    /// Freezes `range_id` through its log to be merged into its left neighbour (see
    /// `apply::freeze_range`); waits until it is committed and applied here.
    pub async fn propose_freeze(
        &self,
        range_id: u64,
        freeze: kvfleet_proto::v1::RaftFreeze,
    ) -> Result<(), ReplicaError> {
        let command = apply::encode_freeze(freeze);
        let (reply, answer) = oneshot::channel();
        self.send(Input::Propose { range_id, command, reply, kind: ProposalKind::Narrowing })?;
        await_reply(answer).await
    }

    /// Makes `range_id` refuse, for good, the merge of its frozen right neighbour (see
    /// `apply::fence_merge`); waits until it is committed and applied here.
    pub async fn propose_merge_fence(
        &self,
        range_id: u64,
        fence: kvfleet_proto::v1::RaftMergeFence,
    ) -> Result<(), ReplicaError> {
        let command = apply::encode_merge_fence(fence);
        let (reply, answer) = oneshot::channel();
        self.send(Input::Propose { range_id, command, reply, kind: ProposalKind::Other })?;
        await_reply(answer).await
    }

    /// Thaws the frozen `range_id` (see `apply::thaw_range`), once its left neighbour has
    /// refused its merge for good; waits until it is committed and applied here.
    pub async fn propose_thaw(&self, range_id: u64, thaw: kvfleet_proto::v1::RaftThaw) -> Result<(), ReplicaError> {
        let command = apply::encode_thaw(thaw);
        let (reply, answer) = oneshot::channel();
        self.send(Input::Propose { range_id, command, reply, kind: ProposalKind::Other })?;
        await_reply(answer).await
    }

    /// Merges the frozen right neighbour into `range_id` through its log (see
    /// `apply::merge_range`); waits until it is committed and applied here.
    pub async fn propose_merge(&self, range_id: u64, merge: kvfleet_proto::v1::RaftMerge) -> Result<(), ReplicaError> {
        let command = apply::encode_merge(merge);
        let (reply, answer) = oneshot::channel();
        self.send(Input::Propose { range_id, command, reply, kind: ProposalKind::Other })?;
        await_reply(answer).await
    }

    /// If this node leads `range_id`: the lowest log index every replica of it holds, and
    /// whether every replica was heard from within an election timeout; `None` on a follower,
    /// which does not know.
    pub async fn lowest_match(&self, range_id: u64) -> Result<Option<(u64, bool)>, ReplicaError> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::LowestMatch { range_id, reply })?;
        answer.await.map_err(|_| ReplicaError::Stopped("the Raft thread dropped a request".into()))
    }

    /// Splits `range_id` through its log: every replica applies the split at the same index
    /// (see `apply`). Waits until it is committed and applied here.
    pub async fn propose_split(&self, range_id: u64, split: kvfleet_proto::v1::RaftSplit) -> Result<(), ReplicaError> {
        let command = apply::encode_split(split);
        let (reply, answer) = oneshot::channel();
        self.send(Input::Propose { range_id, command, reply, kind: ProposalKind::Narrowing })?;
        await_reply(answer).await
    }

    /// Proposes a membership change of `range_id` (this node must lead it) and waits until it
    /// is committed and applied here. `context`: the membership version it expects and the
    /// replicas it adds (`None` only to leave a joint membership). `promotes`: the learners it
    /// makes voters, refused unless each has caught up with the log.
    pub async fn change_membership(
        &self,
        range_id: u64,
        change: kvfleet_replication::ConfChangeV2,
        context: Option<kvfleet_proto::v1::RaftMembershipChange>,
        promotes: Vec<u64>,
    ) -> Result<(), ReplicaError> {
        use prost::Message as _;
        // Only leaving a joint membership goes without a context (as raft-rs's own does).
        let context = context.map(|c| c.encode_to_vec()).unwrap_or_default();
        let (reply, answer) = oneshot::channel();
        self.send(Input::ChangeMembership { range_id, change, context, promotes, reply })?;
        await_reply(answer).await
    }

    /// Starts handing leadership of `range_id` (this node must lead it) to the voter with Raft id
    /// `to`, after ending this node's read lease on it. Returns once the transfer started; the
    /// caller watches `leader_of` for its end.
    pub async fn transfer_leader(&self, range_id: u64, to: u64) -> Result<(), ReplicaError> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::TransferLeader { range_id, to, reply })?;
        await_reply(answer).await
    }

    /// Drops this node's replica of `range_id`, which the range's membership at `conf_version`
    /// does not have (it missed its removal), if its own membership is older: as if it had
    /// applied its removal.
    pub fn drop_stale(&self, range_id: u64, conf_version: u64) -> Result<(), ReplicaError> {
        self.send(Input::DropStale { range_id, conf_version })
    }

    /// The leader of `range_id` as this node last saw it (its Raft id).
    pub fn leader_of(&self, range_id: u64) -> Option<u64> {
        self.published.leaders.read().get(&range_id).copied().flatten()
    }

    /// Waits until this node may serve a linearizable read of `range_id`: a read index confirmed
    /// by a quorum is applied here. Only the leader asks, unless `on_follower` (a follower gets
    /// the index from its leader).
    pub async fn read_barrier(&self, range_id: u64, on_follower: bool) -> Result<(), ReplicaError> {
        // Under the lease (see `LEASE`), no other leader exists and the data here is current.
        if !on_follower
            && self.published.read_leases.read().get(&range_id).is_some_and(|until| Instant::now() < *until)
            && !(self.fast_ack && self.published.unapplied_acks.read().contains(&range_id))
        {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.send(Input::Read { range_id, reply, on_follower })?;
        await_reply(answer).await
    }

    /// Waits until this replica of `range_id` holds every write acknowledged more than `bound`
    /// ago: at once if it learned within `bound` that it was current, else after a read index
    /// from the leader (which also makes the next STALE reads local). In `fast` durability,
    /// every write committed more than `bound` ago (one acknowledged early may commit later).
    pub async fn stale_barrier(&self, range_id: u64, bound: Duration) -> Result<(), ReplicaError> {
        let current = self.published.current_as_of.read().get(&range_id).copied();
        if current.is_some_and(|at| at.elapsed() <= bound) {
            return Ok(());
        }
        self.read_barrier(range_id, true).await
    }

    /// Hands messages from another node to their groups.
    pub fn deliver(&self, envelopes: Vec<Envelope>) -> Result<(), ReplicaError> {
        self.send(Input::Deliver(envelopes))
    }

    /// For every group this node leads: each replica's Raft id and how many log entries it
    /// lacks. Asked of the Raft thread (only when someone looks: not computed every tick).
    pub async fn lag(&self) -> Result<HashMap<u64, Vec<(u64, u64)>>, ReplicaError> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::Lag { reply })?;
        answer.await.map_err(|_| ReplicaError::Stopped("the Raft thread dropped a request".into()))
    }

    /// `desc` with the replica roles this node knows: LEADER on the group's leader.
    pub fn with_roles(&self, desc: RangeDescriptor) -> RangeDescriptor {
        if !desc.is_raft_group() {
            return desc;
        }
        let leader = self.published.leaders.read().get(&desc.range_id).copied().flatten();
        with_leader(desc, leader)
    }

    /// Stops the driver after its current pass (the log is durable after every pass).
    pub fn stop(&self) {
        let _ = self.inbox.send(Input::Stop);
        if let Some(handle) = self.driver.lock().take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Replication {
    /// Joins the driver thread, so that its handle on the DB is gone before the node's is: the
    /// last handle closes RocksDB, and that must not race the process's exit on another thread.
    fn drop(&mut self) {
        self.stop();
    }
}

/// `desc` with LEADER on the replica whose Raft id is `leader`, FOLLOWER on the others.
pub fn with_leader(mut desc: RangeDescriptor, leader: Option<u64>) -> RangeDescriptor {
    for replica in &mut desc.replicas {
        let role = if Some(replica.raft_id) == leader { ReplicaRole::Leader } else { ReplicaRole::Follower };
        replica.role = role as i32;
    }
    desc
}

async fn await_reply(answer: oneshot::Receiver<Result<(), ReplicaError>>) -> Result<(), ReplicaError> {
    answer.await.map_err(|_| ReplicaError::Stopped("the Raft thread dropped a request".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_ends_before_a_new_leader_can_be_elected() {
        let election_ticks = kvfleet_replication::GroupsConfig::default().election_tick as u32;
        assert_eq!(TICK * election_ticks, ELECTION_TIMEOUT, "the driver's election timeout is raft-rs's");
        let nine_intervals = TICK * (election_ticks - 1);
        assert!(LEASE * 6 <= nine_intervals * 5, "a 20% clock-rate margin to nine tick intervals");
    }

    #[test]
    fn raft_ids_are_stable_distinct_and_never_zero() {
        assert_eq!(raft_id_of("node-a"), raft_id_of("node-a"));
        assert_ne!(raft_id_of("node-a"), raft_id_of("node-b"));
        assert_ne!(raft_id_of(""), 0);
        let ids: std::collections::HashSet<u64> = (0..10_000).map(|n| raft_id_of(&format!("kvfleet-{n}"))).collect();
        assert_eq!(ids.len(), 10_000);
    }
}
