//! The Raft groups of one node, driven together: one `tick` for all of them, messages stepped
//! into their group, and every group's Ready gathered into one batch, so that the node persists
//! (and fsyncs) the log entries of all its groups at once, as TiKV's raftstore does.
//!
//! Idle groups quiesce, as CockroachDB's do: once a leader has nothing in flight (every follower
//! has every entry and knows it is committed) it tells its followers, and none of them ticks or
//! sends heartbeats until something happens to the group (a proposal, a read, any Raft message).
//! A quiet follower whose leader's node stops answering is woken by `wake_groups_led_by` (the
//! node-level liveness check) and elects a new leader after the election timeout.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use raft::eraftpb::{ConfChangeV2, ConfState, Entry, HardState, Message, MessageType, Snapshot};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole, Storage};

use crate::logger::raft_logger;

pub type GroupId = u64;
/// A node as Raft knows it (a replica's id is its node's id).
pub type NodeId = u64;

#[derive(Debug, Clone)]
pub struct GroupsConfig {
    /// Ticks without hearing from a leader before a follower campaigns (randomized up to twice).
    pub election_tick: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_tick: usize,
    /// Quiesce idle groups (no ticks, no heartbeats while nothing happens).
    pub quiesce: bool,
    /// Ticks a leader waits with nothing in flight before it quiesces its group.
    pub quiesce_after_ticks: usize,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        GroupsConfig { election_tick: 10, heartbeat_tick: 2, quiesce: true, quiesce_after_ticks: 10 }
    }
}

/// What one node sends another about a group.
#[derive(Debug, Clone, PartialEq)]
pub enum Envelope {
    Raft {
        group: GroupId,
        message: Message,
    },
    /// The leader quiesced the group at `term` with everything up to `commit` committed: the
    /// follower stops ticking if it has exactly that.
    Quiesce {
        group: GroupId,
        from: NodeId,
        to: NodeId,
        term: u64,
        commit: u64,
    },
    /// The leader's membership (at `conf_version`, the node's own numbering) does not have
    /// `to`: its replica was removed, and missed the change.
    Removed {
        group: GroupId,
        from: NodeId,
        to: NodeId,
        conf_version: u64,
    },
}

impl Envelope {
    pub fn group(&self) -> GroupId {
        match self {
            Envelope::Raft { group, .. } | Envelope::Quiesce { group, .. } | Envelope::Removed { group, .. } => *group,
        }
    }

    pub fn to(&self) -> NodeId {
        match self {
            Envelope::Raft { message, .. } => message.to,
            Envelope::Quiesce { to, .. } | Envelope::Removed { to, .. } => *to,
        }
    }
}

/// A Raft message as bytes, for a transport between nodes.
pub fn encode_message(message: &Message) -> Vec<u8> {
    use protobuf::Message as _;
    message.write_to_bytes().unwrap_or_default()
}

/// A Raft message from the bytes `encode_message` made.
pub fn decode_message(bytes: &[u8]) -> Result<Message, String> {
    use protobuf::Message as _;
    Message::parse_from_bytes(bytes).map_err(|e| format!("a Raft message does not decode: {e}"))
}

/// A membership change from the bytes of its log entry.
pub fn decode_conf_change(bytes: &[u8]) -> Result<ConfChangeV2, String> {
    use protobuf::Message as _;
    ConfChangeV2::parse_from_bytes(bytes).map_err(|e| format!("a membership change does not decode: {e}"))
}

/// A group's log as raft-rs reads it, told what the node has just made durable.
pub trait GroupLog: Storage {
    /// `entries` and `hard_state` are durable now (the batch they were in was written).
    fn append_durable(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> raft::Result<()>;
    /// The commit index raft-rs advanced without a new hard state to persist.
    fn set_commit(&mut self, commit: u64);
    /// The group's membership, saved with its hard state.
    fn conf_state(&self) -> ConfState;
    /// `snapshot` replaced the log and is durable: the log now starts after its index.
    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> raft::Result<()>;
}

impl GroupLog for MemStorage {
    fn append_durable(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> raft::Result<()> {
        let mut log = self.wl();
        log.append(entries)?;
        if let Some(hard_state) = hard_state {
            log.set_hardstate(hard_state.clone());
        }
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) {
        self.wl().mut_hard_state().commit = commit;
    }

    fn conf_state(&self) -> ConfState {
        self.initial_state().map(|state| state.conf_state).unwrap_or_default()
    }

    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> raft::Result<()> {
        self.wl().apply_snapshot(snapshot.clone())
    }
}

/// One group's part of a batch to persist.
pub struct Persist<'a> {
    pub group: GroupId,
    /// New entries; any with the same index as a stored one replace it.
    pub entries: &'a [Entry],
    /// Indexes of stored entries past the new ones, which they make obsolete (a follower's
    /// tail overwritten by a new leader): to delete.
    pub stale: Range<u64>,
    pub hard_state: Option<&'a HardState>,
    /// Whether `hard_state` changes the term or the vote, which must be durable before any
    /// message of this pass leaves; a change of the commit index alone need not be (a node
    /// that restarts with an older one learns it again, and one behind its applied index is
    /// raised to it: `create_applied`).
    pub term_or_vote_changed: bool,
    /// The group's membership, saved with the hard state.
    pub conf_state: ConfState,
    /// A snapshot from the leader that replaces the log up to its index (the entries, if any,
    /// come after it). The state machine must be installed from it before anything after it
    /// is applied.
    pub snapshot: Option<&'a Snapshot>,
}

/// A snapshot a group took from its leader, now durable in its log: the node installs its data
/// (`data` says where it is) before it applies the group's later entries.
#[derive(Debug, Clone)]
pub struct SnapshotToInstall {
    pub group: GroupId,
    pub index: u64,
    pub term: u64,
    pub data: Vec<u8>,
}

/// What one `ready` pass produced across all groups.
#[derive(Debug, Default)]
pub struct ReadyBatch {
    /// To send to other nodes.
    pub messages: Vec<Envelope>,
    /// Committed entries to apply, per group, in order.
    pub committed: Vec<(GroupId, Vec<Entry>)>,
    /// Log entries persisted (0 or 1 write for all groups).
    pub persisted_entries: usize,
    /// Read indexes granted, per group: (the request's context, the index to wait for).
    pub reads: Vec<(GroupId, Vec<u8>, u64)>,
    /// Snapshots to install, before `committed` of the same group is applied.
    pub snapshots: Vec<SnapshotToInstall>,
    /// Snapshots sent to followers: (group, follower).
    pub snapshots_sent: Vec<(GroupId, NodeId)>,
}

impl ReadyBatch {
    /// Whether a message carries log entries or a snapshot to another node: what it tells must
    /// be durable here first (see `LogStore::sync_unsynced`).
    pub fn tells_entries(&self) -> bool {
        self.messages.iter().any(|envelope| match envelope {
            Envelope::Raft { message, .. } => {
                !message.entries.is_empty() || message.get_msg_type() == MessageType::MsgSnapshot
            }
            _ => false,
        })
    }

    fn send(&mut self, group: GroupId, messages: Vec<Message>) {
        self.snapshots_sent
            .extend(messages.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot).map(|m| (group, m.to)));
        self.messages.extend(messages.into_iter().map(|message| Envelope::Raft { group, message }));
    }

    fn apply(&mut self, group: GroupId, entries: Vec<Entry>) {
        if !entries.is_empty() {
            self.committed.push((group, entries));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GroupsError {
    #[error("no group {0} on this node")]
    NoGroup(GroupId),
    #[error("group {group}: {source}")]
    Raft { group: GroupId, source: raft::Error },
    #[error("persisting the log of {groups} groups: {reason}")]
    Persist { groups: usize, reason: String },
    #[error("group {group}: a message from another node refused: {reason}")]
    BadMessage { group: GroupId, reason: String },
}

/// Refuses what raft-rs would panic on or must never take from another node: messages for
/// another node, local-only message types, proposals (only the leader's own), read index
/// messages without exactly one context entry.
fn check_remote(node: NodeId, message: &Message) -> Result<(), String> {
    use MessageType::*;
    if message.to != node {
        return Err(format!("addressed to node {}, this is node {node}", message.to));
    }
    match message.get_msg_type() {
        MsgHup | MsgBeat | MsgUnreachable | MsgSnapStatus | MsgCheckQuorum | MsgPropose => {
            Err(format!("{:?} is not taken from another node", message.get_msg_type()))
        }
        // A leadership transfer makes its target campaign past every voter's check-quorum, which
        // a leader's read lease relies on: only the leader starts one (`transfer_leader`), after
        // ending its lease. A follower's request to transfer is not taken.
        MsgTransferLeader => Err("MsgTransferLeader: only the leader's node starts a transfer".to_string()),
        MsgReadIndex | MsgReadIndexResp if message.entries.len() != 1 => {
            Err(format!("{:?} with {} entries, not 1", message.get_msg_type(), message.entries.len()))
        }
        _ => Ok(()),
    }
}

struct Group<S: Storage> {
    raw: RawNode<S>,
    /// Not ticking: nothing happened since the leader quiesced it.
    quiet: bool,
    /// Ticks since the last proposal or append, on a leader.
    idle_ticks: usize,
}

/// The Raft groups of one node.
pub struct Groups<S: Storage = MemStorage> {
    node: NodeId,
    config: GroupsConfig,
    groups: HashMap<GroupId, Group<S>>,
    /// Groups that may have a Ready: only these are looked at by `ready`.
    dirty: HashSet<GroupId>,
    /// Quiesce notices produced by `tick`, sent with the next batch.
    outbox: Vec<Envelope>,
    /// Readies taken by `take_ready`, not persisted yet, each with whether it changes its
    /// group's term or vote.
    taken: Vec<(GroupId, raft::Ready, bool)>,
    logger: slog::Logger,
}

impl<S: GroupLog> Groups<S> {
    pub fn new(node: NodeId, config: GroupsConfig) -> Self {
        Groups {
            node,
            config,
            groups: HashMap::new(),
            dirty: HashSet::new(),
            outbox: Vec::new(),
            taken: Vec::new(),
            logger: raft_logger(),
        }
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Starts this node's replica of `group` over `storage` (which holds its membership), with
    /// everything committed so far taken as applied.
    pub fn create(&mut self, group: GroupId, storage: S) -> Result<(), GroupsError> {
        self.create_applied(group, storage, u64::MAX).map(|_| ())
    }

    /// Starts this node's replica of `group` over `storage`, whose state machine has applied the
    /// log up to `applied`: later committed entries are handed out again by `ready`. Returns
    /// the applied index the group starts from.
    ///
    /// An `applied` past the persisted commit index (the commit index advanced in memory only
    /// before a restart) raises the commit index to it, as TiKV does: only committed entries
    /// are applied, and replaying them over newer data would take values back in time. One
    /// past the stored log (which cannot happen unless the log was lost) is taken back to the
    /// commit index.
    pub fn create_applied(&mut self, group: GroupId, mut storage: S, applied: u64) -> Result<u64, GroupsError> {
        let raft_error = |source| GroupsError::Raft { group, source };
        let mut committed = storage.initial_state().map_err(raft_error)?.hard_state.commit;
        let last = storage.last_index().map_err(raft_error)?;
        if applied > committed && applied <= last {
            storage.set_commit(applied);
            committed = applied;
        }
        let applied = applied.min(committed);
        let config = raft::Config {
            id: self.node,
            election_tick: self.config.election_tick,
            heartbeat_tick: self.config.heartbeat_tick,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            // A new commit index reaches followers with the next append or heartbeat, not in an
            // empty append of its own (TiKV's setting): under load that halves the messages and
            // the follower passes per write; only applying on followers waits for it.
            skip_bcast_commit: true,
            ..Default::default()
        };
        let logger = self.logger.new(slog::o!("range_id" => group));
        let raw = RawNode::new(&config, storage, &logger).map_err(|source| GroupsError::Raft { group, source })?;
        self.debug_assert_not_taken(group);
        self.groups.insert(group, Group { raw, quiet: false, idle_ticks: 0 });
        self.dirty.insert(group);
        Ok(applied)
    }

    fn group(&mut self, group: GroupId) -> Result<&mut Group<S>, GroupsError> {
        self.groups.get_mut(&group).ok_or(GroupsError::NoGroup(group))
    }

    /// raft-rs takes nothing into a group between its `ready` and its `advance`: nothing may
    /// touch or replace a group between `take_ready` and `finish_ready`.
    fn debug_assert_not_taken(&self, group: GroupId) {
        debug_assert!(
            self.taken.iter().all(|(taken, ..)| *taken != group),
            "group {group} touched between take_ready and finish_ready"
        );
    }

    /// The group ticks again; `activity` (a proposal, a read, new entries: not a heartbeat)
    /// also restarts its wait before it may quiesce.
    fn wake(&mut self, group: GroupId, activity: bool) -> Result<&mut RawNode<S>, GroupsError> {
        self.debug_assert_not_taken(group);
        self.dirty.insert(group);
        let entry = self.groups.get_mut(&group).ok_or(GroupsError::NoGroup(group))?;
        entry.quiet = false;
        if activity {
            entry.idle_ticks = 0;
        }
        Ok(&mut entry.raw)
    }

    pub fn campaign(&mut self, group: GroupId) -> Result<(), GroupsError> {
        self.wake(group, true)?.campaign().map_err(|source| GroupsError::Raft { group, source })
    }

    /// Appends `data` to the log of `group`, which this node must lead: returns the entry's
    /// index and term. The proposal succeeded only if the entry committed at that index has
    /// that term (a new leader may replace it).
    pub fn propose(&mut self, group: GroupId, data: Vec<u8>) -> Result<(u64, u64), GroupsError> {
        let raw = self.wake(group, true)?;
        raw.propose(Vec::new(), data).map_err(|source| GroupsError::Raft { group, source })?;
        Ok((raw.raft.raft_log.last_index(), raw.raft.term))
    }

    /// Proposes a membership change to `group`, which this node must lead: returns the entry's
    /// index and term, as `propose` does.
    pub fn propose_conf_change(
        &mut self,
        group: GroupId,
        context: Vec<u8>,
        change: ConfChangeV2,
    ) -> Result<(u64, u64), GroupsError> {
        let raw = self.wake(group, true)?;
        raw.propose_conf_change(context, change).map_err(|source| GroupsError::Raft { group, source })?;
        Ok((raw.raft.raft_log.last_index(), raw.raft.term))
    }

    /// Applies a committed membership change (the state machine calls it when it applies the
    /// entry, unless it refuses the change on every replica alike): returns the new membership.
    pub fn apply_conf_change(&mut self, group: GroupId, change: &ConfChangeV2) -> Result<ConfState, GroupsError> {
        let raw = self.wake(group, true)?;
        raw.apply_conf_change(change).map_err(|source| GroupsError::Raft { group, source })
    }

    /// The membership `group` applied last, on this node.
    pub fn conf_state(&self, group: GroupId) -> Option<ConfState> {
        self.groups.get(&group).map(|g| g.raw.raft.prs().conf().to_conf_state())
    }

    /// On the leader of `group`: whether `node` is not in its membership (a removed replica
    /// that missed its removal still sends). `false` on a follower, which may be behind.
    pub fn led_without(&self, group: GroupId, node: NodeId) -> bool {
        self.leading(group).is_some_and(|raft| raft.prs().get(node).is_none())
    }

    /// Whether this node leads `group` and a membership change it proposed is not applied yet.
    pub fn has_pending_conf(&self, group: GroupId) -> bool {
        self.leading(group).is_some_and(|raft| raft.has_pending_conf())
    }

    /// Whether this node votes in `group` (in either half of a joint membership), without
    /// building the membership (read-path code asks it per batch).
    pub fn votes(&self, group: GroupId) -> bool {
        self.groups.get(&group).is_some_and(|g| g.raw.raft.prs().conf().voters().contains(self.node))
    }

    /// Whether the membership `group` applied last on this node is joint (old and new voters
    /// both form quorums until it is left).
    pub fn is_joint(&self, group: GroupId) -> bool {
        self.conf_state(group).is_some_and(|conf| !conf.voters_outgoing.is_empty())
    }

    /// On the leader: proposes leaving the joint membership `group` is in, if it is in one and no
    /// other change is pending. Returns the entry's index and term if it proposed.
    pub fn leave_joint(&mut self, group: GroupId) -> Result<Option<(u64, u64)>, GroupsError> {
        if !self.is_leader(group) || self.has_pending_conf(group) || !self.is_joint(group) {
            return Ok(None);
        }
        self.propose_conf_change(group, Vec::new(), ConfChangeV2::default()).map(Some)
    }

    /// Starts handing leadership of `group` to `to`: raft-rs brings it up to date and tells it
    /// to campaign at once (MsgTimeoutNow); proposals are dropped meanwhile. The caller must
    /// have ended this node's read lease: the target's campaign is granted past the voters'
    /// check-quorum.
    pub fn transfer_leader(&mut self, group: GroupId, to: NodeId) -> Result<(), GroupsError> {
        self.wake(group, true)?.transfer_leader(to);
        Ok(())
    }

    /// Whether this node leads `group` and hands leadership over (a transfer in progress).
    pub fn is_transferring(&self, group: GroupId) -> bool {
        self.leading(group).is_some_and(|raft| raft.lead_transferee.is_some())
    }

    /// On the leader: how many entries replica `node` lacks (`None` on a follower, or for a
    /// node that is not a member). `u64::MAX` for a replica that has nothing the log still
    /// holds (a new one before its snapshot).
    pub fn lag_of(&self, group: GroupId, node: NodeId) -> Option<u64> {
        let raft = self.leading(group)?;
        let progress = raft.prs().get(node)?;
        if progress.matched + 1 < raft.raft_log.first_index() {
            return Some(u64::MAX);
        }
        Some(raft.raft_log.last_index().saturating_sub(progress.matched))
    }

    /// Stops and forgets this node's replica of `group` (removed from the group: its log is
    /// deleted by the caller).
    pub fn remove(&mut self, group: GroupId) -> bool {
        self.dirty.remove(&group);
        self.taken.retain(|(taken, ..)| *taken != group);
        self.groups.remove(&group).is_some()
    }

    /// Asks for a read index (ReadIndex: the leader confirms with a quorum that it still leads);
    /// it arrives in a later batch's `reads` with `context`. A follower forwards the request to
    /// its leader; with no leader known it is dropped, so the caller times out and retries.
    pub fn read_index(&mut self, group: GroupId, context: Vec<u8>) -> Result<(), GroupsError> {
        self.wake(group, true)?.read_index(context);
        Ok(())
    }

    /// The term this node's replica of `group` is at, and whether it leads it.
    pub fn term(&self, group: GroupId) -> Option<u64> {
        self.groups.get(&group).map(|g| g.raw.raft.term)
    }

    /// The groups on this node.
    pub fn ids(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.groups.keys().copied()
    }

    /// Delivers what another node sent.
    pub fn step(&mut self, envelope: Envelope) -> Result<(), GroupsError> {
        match envelope {
            Envelope::Raft { group, message } => {
                check_remote(self.node, &message).map_err(|reason| GroupsError::BadMessage { group, reason })?;
                let raw = self.wake(group, !is_heartbeat(&message))?;
                raw.step(message).map_err(|source| GroupsError::Raft { group, source })
            }
            Envelope::Quiesce { group, from, term, commit, .. } => {
                let entry = self.group(group)?;
                let raft = &entry.raw.raft;
                let caught_up = raft.term == term
                    && raft.leader_id == from
                    && raft.raft_log.committed == commit
                    && raft.raft_log.last_index() == commit;
                entry.quiet = caught_up;
                Ok(())
            }
            // The node acts on it (it holds the range's membership version), not the group.
            Envelope::Removed { .. } => Ok(()),
        }
    }

    /// One tick of every group that is not quiet; leaders with nothing in flight quiesce.
    /// Returns how many groups ticked.
    pub fn tick(&mut self) -> usize {
        let mut ticked = 0;
        for (&id, group) in self.groups.iter_mut().filter(|(_, g)| !g.quiet) {
            ticked += 1;
            if group.raw.tick() {
                self.dirty.insert(id);
            }
            group.idle_ticks += 1;
            if self.config.quiesce
                && group.idle_ticks >= self.config.quiesce_after_ticks
                && let Some(followers) = quiescable(&group.raw)
            {
                let raft = &group.raw.raft;
                let (term, commit) = (raft.term, raft.raft_log.committed);
                self.outbox.extend(followers.into_iter().map(|to| Envelope::Quiesce {
                    group: id,
                    from: self.node,
                    to,
                    term,
                    commit,
                }));
                group.quiet = true;
            }
        }
        ticked
    }

    /// The node `node` stopped answering: the quiet groups it leads wake up, so that their
    /// followers elect a new leader after the election timeout.
    pub fn wake_groups_led_by(&mut self, node: NodeId) -> usize {
        let led: Vec<GroupId> =
            self.groups.iter().filter(|(_, g)| g.quiet && g.raw.raft.leader_id == node).map(|(id, _)| *id).collect();
        for group in &led {
            let _ = self.wake(*group, true);
        }
        led.len()
    }

    /// Whether a `ready` pass has something to do (a group that may have a Ready, or quiesce
    /// notices to send).
    pub fn has_ready(&self) -> bool {
        !self.dirty.is_empty() || !self.outbox.is_empty()
    }

    pub fn is_quiet(&self, group: GroupId) -> Option<bool> {
        self.groups.get(&group).map(|g| g.quiet)
    }

    pub fn quiet_groups(&self) -> usize {
        self.groups.values().filter(|g| g.quiet).count()
    }

    pub fn leader_of(&self, group: GroupId) -> Option<NodeId> {
        self.groups.get(&group).map(|g| g.raw.raft.leader_id).filter(|&id| id != raft::INVALID_ID)
    }

    pub fn is_leader(&self, group: GroupId) -> bool {
        self.groups.get(&group).is_some_and(|g| g.raw.raft.state == StateRole::Leader)
    }

    /// Whether this node leads `group` and has committed an entry in its term. raft-rs drops
    /// a read index asked of a leader before that (its commit index may still lag what its
    /// predecessor committed).
    pub fn leads_with_commit_in_term(&self, group: GroupId) -> bool {
        self.groups
            .get(&group)
            .is_some_and(|g| g.raw.raft.state == StateRole::Leader && g.raw.raft.commit_to_current_term())
    }

    /// The log of `group` (to compact it).
    pub fn log_mut(&mut self, group: GroupId) -> Option<&mut S> {
        self.groups.get_mut(&group).map(|g| g.raw.mut_store())
    }

    /// Whether the snapshot sent to `to` reached it (`delivered`: the leader goes on from the
    /// snapshot's index) or not (it may send another). A no-op unless the leader waits on one.
    pub fn report_snapshot(&mut self, group: GroupId, to: NodeId, delivered: bool) {
        if let Some(g) = self.groups.get_mut(&group) {
            let status = if delivered { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
            g.raw.report_snapshot(to, status);
            self.dirty.insert(group);
        }
    }

    /// On the leader of `group`, how many log entries each replica lacks (0 for the leader and
    /// for a replica that has them all); `None` on a follower, which does not know.
    pub fn replica_lag(&self, group: GroupId) -> Option<Vec<(NodeId, u64)>> {
        let raft = self.leading(group)?;
        let last = raft.raft_log.last_index();
        Some(raft.prs().iter().map(|(&id, progress)| (id, last.saturating_sub(progress.matched))).collect())
    }

    /// On the leader of `group`, the lowest index every replica is known to hold (`None` on a
    /// follower, which does not know).
    pub fn lowest_match(&self, group: GroupId) -> Option<u64> {
        self.leading(group)?.prs().iter().map(|(_, progress)| progress.matched).min()
    }

    /// The Raft state of `group`, if this node leads it (only a leader tracks its replicas).
    fn leading(&self, group: GroupId) -> Option<&raft::Raft<S>> {
        let raft = &self.groups.get(&group)?.raw.raft;
        (raft.state == StateRole::Leader).then_some(raft)
    }

    /// On the leader of `group`, whether every replica was heard from within the last election
    /// timeout (raft-rs's `recent_active`, kept by check-quorum); `None` on a follower.
    pub fn all_recently_active(&self, group: GroupId) -> Option<bool> {
        let raft = self.leading(group)?;
        let me = raft.id;
        Some(raft.prs().iter().all(|(&id, progress)| id == me || progress.recent_active))
    }

    pub fn committed(&self, group: GroupId) -> Option<u64> {
        self.groups.get(&group).map(|g| g.raw.raft.raft_log.committed)
    }

    /// One pass over every group that may have a Ready: `take_ready`, then `finish_ready`.
    pub fn ready(
        &mut self,
        persist: impl FnOnce(&[Persist<'_>]) -> Result<(), String>,
    ) -> Result<ReadyBatch, GroupsError> {
        let mut batch = self.take_ready();
        let rest = self.finish_ready(persist)?;
        batch.messages.extend(rest.messages);
        batch.committed.extend(rest.committed);
        batch.persisted_entries = rest.persisted_entries;
        batch.reads.extend(rest.reads);
        batch.snapshots = rest.snapshots;
        batch.snapshots_sent.extend(rest.snapshots_sent);
        Ok(batch)
    }

    /// Takes the Ready of every group that may have one, and hands out what may leave before
    /// this pass's log write: a leader's messages (raft-rs's `messages`, as opposed to a
    /// follower's `persisted_messages`; Raft thesis 10.2.1: the leader counts itself toward a
    /// commit only once its write is durable). The caller sends them (after
    /// `LogStore::sync_unsynced` if they tell entries) and then calls `finish_ready`, touching
    /// no group in between: raft-rs takes no new entry between a `ready` and its `advance`.
    pub fn take_ready(&mut self) -> ReadyBatch {
        let mut batch = ReadyBatch::default();
        for id in self.dirty.drain() {
            let Some(group) = self.groups.get_mut(&id) else { continue };
            if !group.raw.has_ready() {
                continue;
            }
            let mut ready = group.raw.ready();
            if !ready.entries().is_empty() {
                group.idle_ticks = 0;
            }
            let term_or_vote_changed = ready.hs().is_some_and(|hs| {
                let stored = group.raw.store().initial_state().map(|state| state.hard_state).unwrap_or_default();
                hs.term != stored.term || hs.vote != stored.vote
            });
            // Not from a Ready that also changes the term or the vote, which must be durable
            // before anything said in that term (a lone voter that lost it could win the same
            // term again and send other entries at the same index and term).
            if !term_or_vote_changed {
                batch.send(id, ready.take_messages());
            }
            self.taken.push((id, ready, term_or_vote_changed));
        }
        batch
    }

    /// Persists the Ready taken by `take_ready`: `persist` is called once with every group's
    /// new entries and hard state (one write, one fsync for all of them); then each group
    /// advances. Messages that may only leave once the log is durable are in the batch after
    /// `persist` returned.
    pub fn finish_ready(
        &mut self,
        persist: impl FnOnce(&[Persist<'_>]) -> Result<(), String>,
    ) -> Result<ReadyBatch, GroupsError> {
        let mut batch = ReadyBatch { messages: std::mem::take(&mut self.outbox), ..Default::default() };
        let mut readies = std::mem::take(&mut self.taken);
        for (id, ready, _) in &mut readies {
            batch.send(*id, ready.take_messages());
            batch.apply(*id, ready.take_committed_entries());
            batch.reads.extend(ready.take_read_states().into_iter().map(|r| (*id, r.request_ctx, r.index)));
        }
        let mut to_persist: Vec<Persist<'_>> = Vec::new();
        for (id, ready, term_or_vote_changed) in
            readies.iter().filter(|(_, r, _)| !r.entries().is_empty() || r.hs().is_some() || !r.snapshot().is_empty())
        {
            let Some(group) = self.groups.get(id) else { continue };
            let store = group.raw.store();
            let stored_last = store.last_index().unwrap_or(0);
            let stale = match ready.entries().last() {
                Some(last) if last.index < stored_last => last.index + 1..stored_last + 1,
                _ => 0..0,
            };
            to_persist.push(Persist {
                group: *id,
                entries: ready.entries(),
                stale,
                hard_state: ready.hs(),
                term_or_vote_changed: *term_or_vote_changed,
                conf_state: if ready.snapshot().is_empty() {
                    store.conf_state()
                } else {
                    ready.snapshot().get_metadata().get_conf_state().clone()
                },
                snapshot: Some(ready.snapshot()).filter(|s| !s.is_empty()),
            });
        }
        batch.persisted_entries = to_persist.iter().map(|p| p.entries.len()).sum();
        if !to_persist.is_empty() {
            let groups = to_persist.len();
            persist(&to_persist).map_err(|reason| GroupsError::Persist { groups, reason })?;
        }
        drop(to_persist);
        for (id, mut ready, _) in readies {
            let Some(group) = self.groups.get_mut(&id) else { continue };
            if !ready.snapshot().is_empty() {
                let snapshot = ready.snapshot();
                group
                    .raw
                    .mut_store()
                    .apply_snapshot(snapshot)
                    .map_err(|source| GroupsError::Raft { group: id, source })?;
                let metadata = snapshot.get_metadata();
                batch.snapshots.push(SnapshotToInstall {
                    group: id,
                    index: metadata.index,
                    term: metadata.term,
                    data: snapshot.data.to_vec(),
                });
            }
            group
                .raw
                .mut_store()
                .append_durable(ready.entries(), ready.hs())
                .map_err(|source| GroupsError::Raft { group: id, source })?;
            batch.send(id, ready.take_persisted_messages());
            let mut light = group.raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                group.raw.mut_store().set_commit(commit);
            }
            batch.send(id, light.take_messages());
            batch.apply(id, light.take_committed_entries());
            group.raw.advance_apply();
            if group.raw.has_ready() {
                self.dirty.insert(id);
            }
        }
        Ok(batch)
    }
}

/// A leader's followers, if it may quiesce: nothing in flight, every follower has every entry
/// and knows it is committed, no read or membership change pending.
fn quiescable<S: Storage>(raw: &RawNode<S>) -> Option<Vec<NodeId>> {
    let raft = &raw.raft;
    let last = raft.raft_log.last_index();
    if raft.state != StateRole::Leader
        || raft.raft_log.committed != last
        || raft.pending_read_count() > 0
        || raft.has_pending_conf()
        || !raft.msgs.is_empty()
    {
        return None;
    }
    let mut followers = Vec::new();
    for (&id, progress) in raft.prs().iter() {
        if id == raft.id {
            continue;
        }
        if progress.matched != last || progress.committed_index != last {
            return None;
        }
        followers.push(id);
    }
    Some(followers)
}

/// A group's storage for a new group whose voters are `voters` (ids of nodes).
pub fn new_group_storage(voters: &[NodeId]) -> MemStorage {
    MemStorage::new_with_conf_state(ConfState::from((voters.to_vec(), vec![])))
}

/// True for a Raft message that carries no new log entries (heartbeats and their answers).
pub fn is_heartbeat(message: &Message) -> bool {
    matches!(message.get_msg_type(), MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::LocalCluster;

    const GROUPS: u64 = 20;

    fn quiet_cluster() -> LocalCluster {
        let mut cluster = LocalCluster::new(3, GROUPS, GroupsConfig::default()).unwrap();
        cluster.elect_spread(GROUPS).unwrap();
        for group in 1..=GROUPS {
            let leader = cluster.agreed_leader(group).expect("every group elected a leader");
            cluster.node(leader).propose(group, format!("write {group}").into_bytes()).unwrap();
        }
        for _ in 0..30 {
            cluster.tick();
            cluster.settle(100).unwrap();
        }
        cluster
    }

    /// Three nodes, one group that never quiesces, led by node 1.
    fn one_group_led_by_node_1() -> LocalCluster {
        let config = GroupsConfig { quiesce: false, ..GroupsConfig::default() };
        let mut cluster = LocalCluster::new(3, 1, config).unwrap();
        cluster.node(1).campaign(1).unwrap();
        cluster.settle(100).unwrap();
        assert_eq!(cluster.agreed_leader(1), Some(1));
        cluster
    }

    #[test]
    fn groups_elect_replicate_and_quiesce_then_send_nothing() {
        let mut cluster = quiet_cluster();
        for node in &cluster.nodes {
            assert_eq!(node.quiet_groups(), GROUPS as usize, "node {} has groups still ticking", node.node());
            for group in 1..=GROUPS {
                let leader_commit = cluster.nodes.iter().find(|n| n.is_leader(group)).and_then(|n| n.committed(group));
                assert_eq!(node.committed(group), leader_commit, "group {group} on node {}", node.node());
            }
        }
        let delivered = cluster.delivered;
        for _ in 0..100 {
            assert_eq!(cluster.tick(), 0, "quiet groups do not tick");
            cluster.settle(10).unwrap();
        }
        assert_eq!(cluster.delivered, delivered, "quiet groups send no heartbeats");
    }

    #[test]
    fn a_proposal_wakes_a_quiet_group_and_it_quiesces_again() {
        let mut cluster = quiet_cluster();
        let leader = cluster.agreed_leader(7).unwrap();
        let before = cluster.node(leader).committed(7).unwrap();
        cluster.node(leader).propose(7, b"again".to_vec()).unwrap();
        cluster.settle(100).unwrap();
        assert_eq!(cluster.node(leader).committed(7), Some(before + 1));
        // Followers learn the new commit index with the next heartbeat (no empty append of its
        // own: `skip_bcast_commit`).
        for _ in 0..GroupsConfig::default().heartbeat_tick {
            cluster.tick();
            cluster.settle(100).unwrap();
        }
        for node in 1..=3 {
            assert_eq!(cluster.node(node).committed(7), Some(before + 1), "node {node}");
        }
        for _ in 0..30 {
            cluster.tick();
            cluster.settle(100).unwrap();
        }
        assert!((1..=3).all(|node| cluster.node(node).is_quiet(7) == Some(true)));
    }

    #[test]
    fn quiet_followers_elect_a_new_leader_when_their_leaders_node_goes_down() {
        let mut cluster = quiet_cluster();
        let led_by_1: Vec<GroupId> = (1..=GROUPS).filter(|g| cluster.agreed_leader(*g) == Some(1)).collect();
        assert!(!led_by_1.is_empty());
        cluster.down.insert(1);
        // Without the liveness signal nothing happens: quiet followers do not tick.
        for _ in 0..50 {
            cluster.tick();
            cluster.settle(100).unwrap();
        }
        assert!(led_by_1.iter().all(|g| cluster.node(2).leader_of(*g) == Some(1)));
        for node in [2, 3] {
            assert_eq!(cluster.node(node).wake_groups_led_by(1), led_by_1.len());
        }
        for _ in 0..50 {
            cluster.tick();
            cluster.settle(100).unwrap();
        }
        for group in led_by_1 {
            let leader = cluster.agreed_leader(group);
            assert!(matches!(leader, Some(2 | 3)), "group {group}: leader {leader:?}");
            let leader = leader.unwrap_or_default();
            let before = cluster.node(leader).committed(group).unwrap_or_default();
            cluster.node(leader).propose(group, b"after failover".to_vec()).unwrap();
            cluster.settle(100).unwrap();
            assert_eq!(cluster.node(leader).committed(group), Some(before + 1), "group {group}");
            for _ in 0..GroupsConfig::default().heartbeat_tick {
                cluster.tick();
                cluster.settle(100).unwrap();
            }
            assert_eq!(cluster.node(2).committed(group), cluster.node(3).committed(group));
        }
    }

    /// A leader cut off with entries nobody else has; the others elect a new leader and commit
    /// their own; when the old leader is back, its uncommitted tail is replaced, and the driver
    /// tells the log store which stored entries to delete.
    #[test]
    fn a_cut_off_leaders_uncommitted_tail_is_replaced_and_marked_stale() {
        let mut cluster = one_group_led_by_node_1();
        cluster.down.extend([2, 3]);
        for n in 0..3 {
            cluster.node(1).propose(1, format!("lost {n}").into_bytes()).unwrap();
        }
        cluster.settle(100).unwrap();
        let committed_before = cluster.node(1).committed(1).unwrap();
        cluster.down = [1].into();
        for _ in 0..60 {
            cluster.tick();
            cluster.settle(100).unwrap();
        }
        let leader = cluster.agreed_leader(1).expect("nodes 2 and 3 elect a leader");
        assert_ne!(leader, 1);
        cluster.node(leader).propose(1, b"kept".to_vec()).unwrap();
        cluster.settle(100).unwrap();
        assert_eq!(cluster.stale_entries, 0);
        cluster.down.clear();
        for _ in 0..30 {
            cluster.tick();
            cluster.settle(100).unwrap();
        }
        assert_eq!(cluster.agreed_leader(1), Some(leader), "node 1 follows the new leader");
        let commits: Vec<Option<u64>> = (1..=3).map(|node| cluster.node(node).committed(1)).collect();
        assert!(commits.iter().all(|c| *c == commits[0] && c.unwrap_or(0) > committed_before), "{commits:?}");
        assert!(cluster.stale_entries >= 1, "node 1's longer uncommitted tail was marked stale");
    }

    /// Only a Ready that changes a term or a vote says so (it must be fsynced before anything
    /// leaves); one that moves the commit index alone does not (`LogStore::write` skips the
    /// fsync for it).
    #[test]
    fn a_persist_says_whether_it_changes_the_term_or_the_vote() {
        let config = GroupsConfig { quiesce: false, ..GroupsConfig::default() };
        let mut cluster = LocalCluster::new(3, 1, config).unwrap();
        let mut last: HashMap<NodeId, (u64, u64)> = HashMap::new();
        let (mut changes, mut commit_only) = (0, 0);
        let mut check = |node: NodeId, persist: &[Persist<'_>]| {
            for part in persist {
                let Some(hs) = part.hard_state else { continue };
                let before = last.insert(node, (hs.term, hs.vote)).unwrap_or((0, 0));
                assert_eq!(part.term_or_vote_changed, before != (hs.term, hs.vote), "node {node}: {hs:?}");
                changes += usize::from(part.term_or_vote_changed);
                commit_only += usize::from(!part.term_or_vote_changed && part.entries.is_empty());
            }
            Ok(())
        };
        cluster.node(1).campaign(1).unwrap();
        cluster.settle_with(100, &mut check).unwrap();
        for n in 0..5 {
            cluster.node(1).propose(1, format!("write {n}").into_bytes()).unwrap();
            cluster.settle_with(100, &mut check).unwrap();
            cluster.tick();
            cluster.settle_with(100, &mut check).unwrap();
        }
        assert!(changes >= 3, "every node changed its term: {changes}");
        assert!(commit_only > 0, "some writes moved only a commit index");
    }

    /// A leader's appends leave before its own log write (they are handed out by `take_ready`);
    /// a follower's answers only after its write (`finish_ready`).
    #[test]
    fn a_leaders_appends_leave_before_its_log_write_and_a_followers_answers_after() {
        let mut cluster = one_group_led_by_node_1();
        cluster.node(1).propose(1, b"early".to_vec()).unwrap();
        let early = cluster.node(1).take_ready();
        let appends: Vec<&Message> = early
            .messages
            .iter()
            .filter_map(|envelope| match envelope {
                Envelope::Raft { message, .. } if message.get_msg_type() == MessageType::MsgAppend => Some(message),
                _ => None,
            })
            .collect();
        assert_eq!(appends.len(), 2, "{:?}", early.messages);
        assert!(appends.iter().all(|m| m.entries.iter().any(|e| e.data.as_ref() == b"early")));
        assert!(early.tells_entries());
        let mut persisted = 0;
        cluster
            .node(1)
            .finish_ready(|persist| {
                persisted += persist.iter().map(|p| p.entries.len()).sum::<usize>();
                Ok(())
            })
            .unwrap();
        assert_eq!(persisted, 1, "the leader writes the entry it sent");
        for envelope in early.messages {
            cluster.node(envelope.to()).step(envelope).unwrap();
        }
        let follower_early = cluster.node(2).take_ready();
        assert!(follower_early.messages.is_empty(), "{:?}", follower_early.messages);
        let follower = cluster.node(2).finish_ready(|_| Ok(())).unwrap();
        assert!(
            follower.messages.iter().any(|envelope| matches!(envelope,
                Envelope::Raft { message, .. } if message.get_msg_type() == MessageType::MsgAppendResponse)),
            "{:?}",
            follower.messages
        );
    }

    #[test]
    fn one_persist_call_carries_every_group_with_new_entries() {
        let mut cluster = quiet_cluster();
        let led_by_2: Vec<GroupId> = (1..=GROUPS).filter(|g| cluster.agreed_leader(*g) == Some(2)).collect();
        for group in &led_by_2 {
            cluster.node(2).propose(*group, vec![1; 100]).unwrap();
        }
        let mut calls = 0;
        let mut groups_seen = 0;
        let batch = cluster
            .node(2)
            .ready(|persist| {
                calls += 1;
                groups_seen = persist.len();
                assert!(persist.iter().all(|p| p.entries.len() == 1));
                Ok(())
            })
            .unwrap();
        assert_eq!((calls, groups_seen, batch.persisted_entries), (1, led_by_2.len(), led_by_2.len()));
        // A failed write is an error, and nothing was acknowledged for those groups.
        cluster.node(2).propose(led_by_2[0], vec![2; 10]).unwrap();
        let error = cluster.node(2).ready(|_| Err("disk full".into())).unwrap_err();
        assert_eq!(error.to_string(), "persisting the log of 1 groups: disk full");
    }

    #[test]
    fn read_indexes_need_a_quorum_and_cover_every_committed_write() {
        let mut cluster = quiet_cluster();
        let leader = cluster.agreed_leader(1).expect("group 1 has a leader");
        let follower = (1..=3).find(|&n| n != leader).expect("a follower");
        cluster.node(leader).propose(1, b"before the reads".to_vec()).unwrap();
        cluster.settle(100).unwrap();
        let committed = cluster.node(leader).committed(1).expect("group 1 is on the leader");

        cluster.node(leader).read_index(1, b"on the leader".to_vec()).unwrap();
        cluster.node(follower).read_index(1, b"on a follower".to_vec()).unwrap();
        cluster.settle(100).unwrap();
        let granted: Vec<_> = cluster.reads.drain(..).collect();
        assert!(granted.contains(&(leader, 1, b"on the leader".to_vec(), committed)), "{granted:?}");
        assert!(granted.contains(&(follower, 1, b"on a follower".to_vec(), committed)), "{granted:?}");

        // Cut off from both followers, the leader cannot confirm it still leads: no read index.
        cluster.down.extend((1..=3).filter(|&n| n != leader));
        cluster.node(leader).read_index(1, b"cut off".to_vec()).unwrap();
        for _ in 0..5 {
            cluster.tick();
            cluster.settle(100).unwrap();
        }
        assert!(cluster.reads.is_empty(), "a leader without a quorum granted a read: {:?}", cluster.reads);
    }

    #[test]
    fn messages_raft_rs_would_panic_on_are_refused() {
        let mut cluster = quiet_cluster();
        let leader = cluster.agreed_leader(1).expect("group 1 has a leader");
        let follower = (1..=3).find(|&n| n != leader).expect("a follower");
        let message = |to: NodeId, kind: MessageType| {
            let mut message = Message::default();
            message.set_msg_type(kind);
            message.to = to;
            message.from = follower;
            message
        };
        let refused = [
            message(leader, MessageType::MsgReadIndex),
            message(leader, MessageType::MsgPropose),
            message(leader, MessageType::MsgHup),
            message(follower, MessageType::MsgHeartbeatResponse),
            message(leader, MessageType::MsgTransferLeader),
        ];
        for message in refused {
            let kind = message.get_msg_type();
            let outcome = cluster.node(leader).step(Envelope::Raft { group: 1, message });
            assert!(matches!(outcome, Err(GroupsError::BadMessage { .. })), "{kind:?}: {outcome:?}");
        }
        // The group still works.
        cluster.node(leader).propose(1, b"after the bad messages".to_vec()).unwrap();
        cluster.settle(100).unwrap();
        assert_eq!(cluster.agreed_leader(1), Some(leader));
    }
}
