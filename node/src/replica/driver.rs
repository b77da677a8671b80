//! The Raft thread: it owns every group of this node. Each pass takes what arrived (proposals,
//! reads, messages from peers, groups to open), ticks every `TICK`, asks each group with reads
//! waiting for one read index, sends leaders' appends, gathers every group's Ready into one
//! fsynced log write, sends the messages that waited for it, installs snapshots and applies
//! what committed, and answers the requests it settled. Once a second it compacts logs that
//! grew past twice `log_keep_entries` applied entries, and makes the snapshots leaders asked
//! for (on a thread of their own).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use kvfleet_replication::{Entry, GroupStorage, Groups, GroupsConfig, GroupsError, LogStore, ReadyBatch, SnapshotSlot};
use parking_lot::Mutex;
use rocksdb::DB;

use super::snapshot::{self, Installer, SnapshotFiles, Span};
use super::transport::PeerLinks;
use super::{
    Campaign, Input, OpenGroup, PROPOSAL_TIMEOUT, Published, READ_INDEX_TIMEOUT, ReplicaError, ReplicationSettings,
    Reply, SNAPSHOT_TRANSFER_TIMEOUT, TICK, apply,
};

/// A learner lacking more log entries than this is not promoted yet.
const MAX_PROMOTION_LAG: u64 = 1000;

/// Logs are looked at for compaction, and snapshot requests for making, every this many ticks.
const HOUSEKEEPING_EVERY_TICKS: u64 = 10;
/// A leader that a joint membership removes tries again to hand the lead over after this long
/// (raft-rs gives a transfer up after an election timeout).
const HANDOVER_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a replica keeps a split range's log for replicas that lack the split entry.
const SPLIT_LOG_HOLD: std::time::Duration = std::time::Duration::from_secs(600);

/// Small messages (votes, heartbeats) for a group this node does not hold are kept this long,
/// at most this many for at most this many groups (see `deliver`).
const EARLY_MESSAGES_FOR: std::time::Duration = std::time::Duration::from_secs(3);
const EARLY_MESSAGES_KEPT: usize = 64;
const EARLY_GROUPS_KEPT: usize = 1024;

/// Most inputs taken in one pass (the rest wait for the next).
const MAX_INPUTS_PER_PASS: usize = 8192;
/// Most ready passes in a row before the driver looks at its inputs again.
const MAX_PASSES: usize = 4;

struct Proposal {
    term: u64,
    reply: Reply,
    deadline: Instant,
}

struct ReadBatch {
    range_id: u64,
    replies: Vec<Reply>,
    deadline: Instant,
    /// When the read index was asked, and the term, if this node asked as the leader: a grant
    /// then extends its lease from that instant.
    asked: Instant,
    leader_term: Option<u64>,
    /// The highest index this node had acknowledged early (`fast` durability) when the read
    /// was asked: the read also waits until that is applied here.
    early_acked: u64,
}

/// A leader's lease on a group: until `until`, no other node can have been elected (see
/// `LEASE`), so the leader may serve linearizable reads at its commit index without asking a
/// quorum.
#[derive(Clone, Copy)]
struct Lease {
    term: u64,
    until: Instant,
}

pub struct Driver {
    groups: Groups<GroupStorage>,
    db: Arc<DB>,
    log: LogStore,
    peers: PeerLinks,
    published: Arc<Published>,
    /// Proposals waiting to be applied, by (group, index).
    proposals: HashMap<(u64, u64), Proposal>,
    /// Reads that arrived this pass, per group: one read index for all of them.
    reads_arrived: HashMap<u64, Vec<Reply>>,
    /// Reads that arrived while this node led a group without having committed an entry in
    /// its term yet (see `ask_read_indexes`), since when.
    reads_held: HashMap<u64, (Instant, Vec<Reply>)>,
    /// Read indexes asked for, by request context.
    reads_asked: HashMap<u64, ReadBatch>,
    /// Read indexes granted, waiting for this node to apply up to them.
    reads_granted: Vec<(u64, ReadBatch)>,
    next_read_context: u64,
    applied: HashMap<u64, u64>,
    /// Each group's keys, and where its leader asks for snapshots.
    spans: HashMap<u64, Span>,
    snapshot_slots: HashMap<u64, SnapshotSlot>,
    /// Groups whose snapshot is being made.
    making_snapshots: Arc<Mutex<HashSet<u64>>>,
    /// Snapshots sent, by (group, follower): when.
    snapshots_sent: HashMap<(u64, u64), Instant>,
    /// Snapshot files leave this node at most this fast (0: unlimited): a transfer is given
    /// twice the time its file needs at that rate before another snapshot is sent.
    snapshot_send_bytes_per_sec: u64,
    installer: Installer,
    key_space_end: Vec<u8>,
    leases: HashMap<u64, Lease>,
    /// Groups whose leader proposed a split at this index: no lease until it is applied (see
    /// `propose`).
    splits_proposed: HashMap<u64, u64>,
    /// Groups that applied a split: the latest split's index, and when this replica applied
    /// it. The log is kept from where every replica is until each has the split entry (see
    /// `compact_logs`).
    splits_applied: HashMap<u64, (u64, Instant)>,
    /// Told of every split applied here (and every range a snapshot narrowed), after it is
    /// durable and before anyone is answered.
    on_range_change: super::OnRangeChange,
    /// Messages for groups this node does not hold (yet), by group: since when, and what.
    early_messages: HashMap<u64, (Instant, Vec<kvfleet_replication::Envelope>)>,
    /// Votes are refused until then (see `deliver`), this node's own included: a group asked to
    /// campaign at once (`OpenGroup::campaign`) before then waits in `campaigns_deferred`.
    votes_from: Instant,
    campaigns_deferred: Vec<u64>,
    /// Requests for a group in `campaigns_deferred`: taken again once it campaigned (it leads
    /// at once, being its only voter), rather than refused for want of a leader meanwhile.
    awaiting_campaign: Vec<Input>,
    /// Groups whose leader started a leadership transfer in this term: it takes no lease again
    /// in that term (see `transfer_leader`).
    transfer_terms: HashMap<u64, u64>,
    /// Groups whose applied membership is in flux (joint, or with a learner that may be a demoted
    /// voter): their leader settles it (see `leave_joints`).
    joint: HashSet<u64>,
    /// Every peer's address by Raft id, shared with the request handlers.
    addresses: Arc<parking_lot::RwLock<HashMap<u64, String>>>,
    /// Removed replicas told so, by (group, replica): when.
    removed_told: HashMap<(u64, u64), Instant>,
    /// Proposals that are membership changes, by (group, index).
    membership_proposals: HashSet<(u64, u64)>,
    log_keep_entries: u64,
    ticks: u64,
    /// Early acknowledgements (`fast` durability).
    fast: super::fast_ack::FastAcks,
    /// Per group, the term of the last entry applied here.
    applied_terms: HashMap<u64, u64>,
    /// Per group this node leads in a joint membership that removes it: when it last tried to
    /// hand the lead over.
    handovers: HashMap<u64, Instant>,
    /// Per group: the index of the end of its joint membership this node proposed, until another
    /// member acknowledges it (the `leave-joint-acknowledged` crash point, for tests).
    leaving_joint: HashMap<u64, u64>,
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        raft_id: u64,
        db: Arc<DB>,
        log: LogStore,
        peers: PeerLinks,
        published: Arc<Published>,
        settings: ReplicationSettings,
        on_range_change: super::OnRangeChange,
        addresses: Arc<parking_lot::RwLock<HashMap<u64, String>>>,
    ) -> Self {
        let files = SnapshotFiles::new(&settings.data_dir);
        let installer = Installer { db: db.clone(), log: log.clone(), files };
        Driver {
            groups: Groups::new(raft_id, GroupsConfig::default()),
            db,
            log,
            peers,
            published,
            proposals: HashMap::new(),
            reads_arrived: HashMap::new(),
            reads_held: HashMap::new(),
            reads_asked: HashMap::new(),
            reads_granted: Vec::new(),
            // Random, so that a restarted node never reuses a context its leader (or a reply
            // still in flight) knows from before: the leader keys pending reads by context.
            next_read_context: rand::random::<u64>() >> 1,
            applied: HashMap::new(),
            spans: HashMap::new(),
            snapshot_slots: HashMap::new(),
            making_snapshots: Arc::default(),
            snapshots_sent: HashMap::new(),
            snapshot_send_bytes_per_sec: settings.snapshot_send_bytes_per_sec,
            installer,
            key_space_end: settings.key_space_end,
            leases: HashMap::new(),
            splits_proposed: HashMap::new(),
            splits_applied: HashMap::new(),
            on_range_change,
            early_messages: HashMap::new(),
            votes_from: Instant::now() + super::ELECTION_TIMEOUT,
            campaigns_deferred: Vec::new(),
            awaiting_campaign: Vec::new(),
            transfer_terms: HashMap::new(),
            joint: HashSet::new(),
            addresses,
            removed_told: HashMap::new(),
            membership_proposals: HashSet::new(),
            log_keep_entries: settings.log_keep_entries,
            ticks: 0,
            fast: super::fast_ack::FastAcks::new(settings.fast_ack),
            applied_terms: HashMap::new(),
            handovers: HashMap::new(),
            leaving_joint: HashMap::new(),
        }
    }

    pub fn run(mut self, inbox: Receiver<Input>) {
        let mut next_tick = Instant::now() + super::TICK;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match inbox.recv_timeout(wait) {
                Ok(Input::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(input) => {
                    if !self.take(input) {
                        return;
                    }
                    for _ in 0..MAX_INPUTS_PER_PASS {
                        match inbox.try_recv() {
                            Ok(Input::Stop) => return,
                            Ok(input) => {
                                self.take(input);
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + TICK;
                self.tick();
            }
            self.ask_read_indexes();
            // A pass can leave work for another (a group whose advance produced a new Ready):
            // do it now rather than at the next input or tick.
            for _ in 0..MAX_PASSES {
                if let Err(error) = self.pass() {
                    // The log could not be made durable: nothing this node says can be trusted
                    // any more. Stop the process, as TiKV and etcd do on a failed fsync.
                    tracing::error!(%error, "the Raft log write failed; stopping the node");
                    eprintln!("kvfleet-node: the Raft log write failed: {error}");
                    std::process::abort();
                }
                if !self.reads_held.is_empty() {
                    // The pass may have committed a new leader's first entry.
                    self.ask_read_indexes();
                }
                if !self.groups.has_ready() {
                    break;
                }
            }
        }
    }

    /// Takes one input; false to stop.
    fn take(&mut self, input: Input) -> bool {
        if let Input::Propose { range_id, .. }
        | Input::Read { range_id, .. }
        | Input::ChangeMembership { range_id, .. }
        | Input::TransferLeader { range_id, .. } = &input
            && self.campaigns_deferred.contains(range_id)
        {
            self.awaiting_campaign.push(input);
            return true;
        }
        match input {
            Input::Stop => return false,
            Input::Open(group) => self.open(*group),
            Input::Propose { range_id, command, reply, kind } => self.propose(range_id, command, reply, kind),
            Input::Read { range_id, reply, on_follower } => {
                let leader = self.groups.leader_of(range_id);
                if self.groups.term(range_id).is_none() {
                    let _ = reply.send(Err(ReplicaError::NoGroup { range_id }));
                } else if !(self.groups.is_leader(range_id) || on_follower && leader.is_some()) {
                    let _ = reply.send(Err(ReplicaError::NotLeader { range_id, leader }));
                } else {
                    self.reads_arrived.entry(range_id).or_default().push(reply);
                }
            }
            Input::ChangeMembership { range_id, change, context, promotes, reply } => {
                self.change_membership(range_id, change, context, &promotes, reply)
            }
            Input::TransferLeader { range_id, to, reply } => self.transfer_leader(range_id, to, reply),
            Input::DropStale { range_id, conf_version } => self.drop_stale(range_id, None, conf_version),
            Input::LowestMatch { range_id, reply } => {
                let active = self.groups.all_recently_active(range_id);
                let _ = reply.send(self.groups.lowest_match(range_id).zip(active));
            }
            Input::Lag { reply } => {
                let ids: Vec<u64> = self.groups.ids().collect();
                let lag = ids.into_iter().filter_map(|id| self.groups.replica_lag(id).map(|lag| (id, lag))).collect();
                let _ = reply.send(lag);
            }
            Input::SnapshotReport { range_id, to, delivered } => {
                self.snapshots_sent.remove(&(range_id, to));
                self.groups.report_snapshot(range_id, to, delivered);
            }
            Input::Deliver(envelopes) => {
                for envelope in envelopes {
                    self.deliver(envelope);
                }
            }
        }
        true
    }

    /// Steps one message from a peer into its group. A message for a group this node does not
    /// hold is kept a little while (`EARLY_MESSAGES_FOR`): it may be for a range a split here
    /// has yet to apply, whose leader already campaigns; the split replays it.
    fn deliver(&mut self, envelope: kvfleet_replication::Envelope) {
        let now = Instant::now();
        let group = envelope.group();
        // First, whatever it is: a removed replica that missed its removal is told so even while
        // its vote requests are not taken (this node just started, or holds a lease).
        if let kvfleet_replication::Envelope::Raft { message, .. } = &envelope
            && self.groups.led_without(group, message.from)
        {
            self.tell_removed(group, message.from, now);
        }
        // A node that just started forgot which leader it heard last, so raft-rs's check-quorum
        // would let it vote at once: it could help elect a new leader while the old one still
        // holds a lease this node's acknowledgement helped to grant. It waits one election
        // timeout first. Nor does a leader vote while its lease runs (raft-rs would, once any
        // higher-term message made it a follower with no leader known).
        // A replica created to be added (no membership yet) votes for nobody either: its Raft id
        // is its node's, so a stale voter of an old membership (down while this node's earlier
        // replica was removed) could otherwise win its vote with a log missing committed entries.
        if is_vote_request(&envelope)
            && (now < self.votes_from
                || self.leases.get(&group).is_some_and(|lease| now < lease.until)
                || self.groups.conf_state(group).is_some_and(|conf| conf.voters.is_empty()))
        {
            return;
        }
        if let kvfleet_replication::Envelope::Removed { conf_version, from, .. } = envelope {
            self.drop_stale(group, Some(from), conf_version);
            return;
        }
        if let kvfleet_replication::Envelope::Raft { message, .. } = &envelope
            && message.get_msg_type() == kvfleet_replication::MessageType::MsgAppendResponse
            && !message.reject
            && self.leaving_joint.get(&group).is_some_and(|&index| message.index >= index)
        {
            // Another member holds the end of the joint membership; this node has not counted it.
            self.leaving_joint.remove(&group);
            kvfleet_proto::failpoint::hit("leave-joint-acknowledged");
        }
        if self.groups.term(group).is_none() {
            self.keep_early(envelope, now);
            return;
        }
        match self.groups.step(envelope) {
            Ok(()) => {}
            Err(error @ GroupsError::BadMessage { .. }) => tracing::warn!(%error, "Raft message refused"),
            Err(error) => tracing::debug!(%error, "a Raft message was refused"),
        }
    }

    /// `to` sent a message for `group`, which this node leads and whose membership does not have
    /// `to`: a replica removed while it was down or cut off. It is told (once a second at most),
    /// with this membership's version, so that it drops its copy (TiKV's GC of stale peers).
    fn tell_removed(&mut self, group: u64, to: u64, now: Instant) {
        if self
            .removed_told
            .get(&(group, to))
            .is_some_and(|at| now.duration_since(*at) < std::time::Duration::from_secs(1))
        {
            return;
        }
        let Ok(desc) = apply::stored_descriptor(&self.db, group) else { return };
        self.removed_told.insert((group, to), now);
        let notice = kvfleet_replication::Envelope::Removed {
            group,
            from: self.groups.node(),
            to,
            conf_version: desc.conf_version,
        };
        self.peers.send(vec![notice]);
    }

    /// The range's membership at `conf_version` does not have this node (its leader `from` says
    /// so, or a move about to add this node again). If this replica's own membership is older,
    /// it was removed and missed the change: it ends as if it had applied its removal (its copy
    /// is not counted by the range any more).
    fn drop_stale(&mut self, group: u64, from: Option<u64>, conf_version: u64) {
        if self.groups.term(group).is_none() {
            return;
        }
        // A replica created to be added again (no descriptor yet, or the tombstone of the one
        // removed before) is not the stale one: a late notice about that one leaves it alone.
        let Ok(mine) = apply::stored_descriptor(&self.db, group) else { return };
        if !mine.is_owned_state() || mine.conf_version >= conf_version {
            return;
        }
        let tombstone =
            kvfleet_proto::v1::RangeDescriptor { state: kvfleet_proto::v1::RangeState::Retired as i32, ..mine };
        let mut batch = rocksdb::WriteBatch::default();
        let written = apply::stage_removal(&self.db, &self.log, &tombstone, &mut batch)
            .and_then(|()| self.db.write(batch).map_err(|e| e.to_string()));
        if let Err(error) = written {
            tracing::error!(range_id = group, %error, "removing a stale replica failed; stopping the node");
            eprintln!("kvfleet-node: removing the stale replica of range {group} failed: {error}");
            std::process::abort();
        }
        tracing::info!(
            range_id = group,
            ?from,
            conf_version,
            "this replica was removed from the range while it was away"
        );
        self.remove_group(group, &tombstone);
    }

    /// Keeps a message for a group this node does not hold, if it is small: a vote request or a
    /// heartbeat (what a new group's leader sends first). Entries and snapshots are not kept
    /// (memory stays bounded; the leader sends them again).
    fn keep_early(&mut self, envelope: kvfleet_replication::Envelope, now: Instant) {
        let group = envelope.group();
        let small = match &envelope {
            kvfleet_replication::Envelope::Raft { message, .. } => {
                message.entries.is_empty() && !message.has_snapshot()
            }
            _ => false,
        };
        if !small {
            return;
        }
        if !self.early_messages.contains_key(&group) && self.early_messages.len() >= EARLY_GROUPS_KEPT {
            tracing::debug!(group, "a Raft message for a group this node does not hold");
            return;
        }
        let (since, kept) = self.early_messages.entry(group).or_insert_with(|| (now, Vec::new()));
        if now.duration_since(*since) < EARLY_MESSAGES_FOR && kept.len() < EARLY_MESSAGES_KEPT {
            kept.push(envelope);
        }
    }

    /// Drops messages kept for groups that never came.
    fn forget_early_messages(&mut self) {
        self.early_messages.retain(|_, (since, _)| since.elapsed() < EARLY_MESSAGES_FOR);
    }

    fn open(&mut self, group: OpenGroup) {
        let range_id = group.range_id;
        // Even when the group runs already (a replica created again by a caller that retried):
        // the caller's membership may name a leader elected since, whom an empty replica could
        // not answer otherwise (it learns addresses from memberships it applies, and has none).
        for (raft_id, address) in &group.members {
            self.peers.connect(*raft_id, address);
        }
        if self.groups.term(range_id).is_some() {
            return;
        }
        self.spans.insert(range_id, group.span.clone());
        self.snapshot_slots.insert(range_id, group.storage.snapshot_slot());
        let applied = match self.groups.create_applied(range_id, group.storage, group.applied) {
            Ok(applied) => applied,
            Err(error) => {
                tracing::error!(range_id, %error, "cannot start the range's Raft group");
                return;
            }
        };
        self.applied.insert(range_id, applied);
        self.note_joint(range_id);
        if group.campaign != Campaign::OnTimeout {
            if group.campaign == Campaign::OnceVotesOpen && Instant::now() < self.votes_from {
                // A lone voter's campaign is its own vote: like any vote of a node that just
                // started, it waits until no lease this node helped to grant can still run (a
                // leader that counted its acknowledgement, before a restart, may still serve).
                self.campaigns_deferred.push(range_id);
            } else if let Err(error) = self.groups.campaign(range_id) {
                tracing::warn!(range_id, %error, "campaign failed");
            }
        }
        tracing::info!(range_id, applied = group.applied, members = group.members.len(), "Raft group started");
    }

    /// `reply` back if this node leads `range_id`; else it is answered: no such group here, or
    /// which node leads it.
    fn as_leader(&self, range_id: u64, reply: Reply) -> Option<Reply> {
        if self.groups.term(range_id).is_none() {
            let _ = reply.send(Err(ReplicaError::NoGroup { range_id }));
            return None;
        }
        if !self.groups.is_leader(range_id) {
            let leader = self.groups.leader_of(range_id);
            let _ = reply.send(Err(ReplicaError::NotLeader { range_id, leader }));
            return None;
        }
        Some(reply)
    }

    /// Proposes `command`. A split (or freeze) also ends the leader's lease until it is applied
    /// here: the replicas that apply it first may elect the new range's leader, which then
    /// acknowledges writes to keys this node's lease would still serve from the old range. In
    /// `fast` durability a write is acknowledged as soon as this node's log holds it, if nothing
    /// can refuse it before it applies (see `fast_ack`).
    fn propose(&mut self, range_id: u64, command: Vec<u8>, reply: Reply, kind: super::ProposalKind) {
        let Some(reply) = self.as_leader(range_id, reply) else { return };
        let command_keys = if kind == super::ProposalKind::Write && self.fast.enabled() {
            apply::command_keys(&command)
        } else {
            None
        };
        match self.groups.propose(range_id, command) {
            Ok((index, term)) => {
                if kind == super::ProposalKind::Narrowing {
                    self.end_lease(range_id);
                    self.splits_proposed.insert(range_id, index);
                }
                self.track_proposal(range_id, index, term, reply);
                if kind == super::ProposalKind::Write
                    && self.fast.enabled()
                    && self.may_ack_early(range_id, term, &command_keys)
                {
                    self.fast.candidate(range_id, index);
                }
            }
            Err(error) if self.groups.is_transferring(range_id) => {
                tracing::debug!(range_id, %error, "proposal dropped during a leadership transfer");
                let reason = "its leadership is being handed to another replica; retry".to_string();
                let _ = reply.send(Err(ReplicaError::MembershipBusy { range_id, reason }));
            }
            Err(error) => {
                let leader = self.groups.leader_of(range_id).filter(|&l| l != self.groups.node());
                tracing::debug!(range_id, %error, "proposal dropped");
                let _ = reply.send(Err(ReplicaError::NotLeader { range_id, leader }));
            }
        }
    }

    /// Proposes a membership change, after checking what only the leader knows: no other change
    /// is pending, and every learner to promote has caught up (a voter far behind would leave
    /// the group one failure from a stall until it catches up).
    fn change_membership(
        &mut self,
        range_id: u64,
        change: kvfleet_replication::ConfChangeV2,
        context: Vec<u8>,
        promotes: &[u64],
        reply: Reply,
    ) {
        let Some(reply) = self.as_leader(range_id, reply) else { return };
        let refuse = |reason: String| Err(ReplicaError::MembershipRefused { range_id, reason });
        let busy = |reason: String| Err(ReplicaError::MembershipBusy { range_id, reason });
        if self.groups.has_pending_conf(range_id) {
            let _ = reply.send(busy("another membership change is not applied yet; retry".into()));
            return;
        }
        for &learner in promotes {
            match self.groups.lag_of(range_id, learner) {
                Some(lag) if lag <= MAX_PROMOTION_LAG => {}
                Some(lag) => {
                    let reason = if lag == u64::MAX {
                        format!("replica {learner:#x} has not installed its snapshot yet; retry")
                    } else {
                        format!(
                            "replica {learner:#x} lacks {lag} log entries (at most {MAX_PROMOTION_LAG} to be promoted): it is still catching up; retry"
                        )
                    };
                    let _ = reply.send(busy(reason));
                    return;
                }
                None => {
                    let _ = reply.send(refuse(format!("replica {learner:#x} is not a member of the range")));
                    return;
                }
            }
        }
        if self.groups.is_joint(range_id) && !change.changes.is_empty() {
            let _ = reply.send(busy("the range is in a joint membership, which its leader is leaving; retry".into()));
            return;
        }
        let leaves_joint = change.changes.is_empty();
        match self.groups.propose_conf_change(range_id, context, change) {
            Ok((index, term)) => {
                if leaves_joint {
                    self.leaving_joint.insert(range_id, index);
                }
                self.membership_proposals.insert((range_id, index));
                self.track_proposal(range_id, index, term, reply)
            }
            Err(error) => {
                tracing::debug!(range_id, %error, "membership change dropped");
                let _ = reply.send(refuse(format!("raft-rs refused to propose it: {error}")));
            }
        }
    }

    /// Starts a leadership transfer. The lease ends first and is not taken again in this term:
    /// the target's campaign is granted past the voters' check-quorum (the lease's argument), so
    /// only this node's consent keeps two leaders from serving reads, and a MsgTimeoutNow may
    /// arrive late (after raft-rs gave up the transfer), whenever the target wakes.
    fn transfer_leader(&mut self, range_id: u64, to: u64, reply: Reply) {
        let Some(reply) = self.as_leader(range_id, reply) else { return };
        let _ = reply.send(self.hand_over(range_id, to));
    }

    /// `transfer_leader` on a group this node leads: `to` must be another voter (of the
    /// incoming half of a joint membership).
    fn hand_over(&mut self, range_id: u64, to: u64) -> Result<(), ReplicaError> {
        let term = self.groups.term(range_id).unwrap_or_default();
        let is_voter = self.groups.conf_state(range_id).is_some_and(|conf| conf.voters.contains(&to));
        if !is_voter || to == self.groups.node() {
            let reason = format!("replica {to:#x} is not another voter of the range");
            return Err(ReplicaError::MembershipRefused { range_id, reason });
        }
        self.end_lease(range_id);
        self.transfer_terms.insert(range_id, term);
        kvfleet_proto::failpoint::hit("transfer-leader-after-lease-ended");
        self.groups
            .transfer_leader(range_id, to)
            .map_err(|error| ReplicaError::MembershipRefused { range_id, reason: error.to_string() })
    }

    /// Settles every membership in flux (see `joint`). The leader of a joint membership proposes
    /// leaving it (raft-rs's own automatic leave is lost if the leader changes before it is
    /// applied). A leader that the joint membership removes (a single copy's source, which had no
    /// other voter to hand the lead to first) hands the lead to an incoming voter instead (again
    /// every `HANDOVER_RETRY` while it leads): a leader must not apply its own removal. Out of
    /// the joint membership, the voter that left it stays as a demoted learner (see
    /// `plan_changes`): a leader that is one hands its lead to a voter; a leader that votes
    /// removes it, in a change of its own.
    fn leave_joints(&mut self) {
        let unsettled: Vec<u64> = self.joint.iter().copied().collect();
        for range_id in unsettled {
            let Some(conf) = self.groups.conf_state(range_id) else {
                self.joint.remove(&range_id);
                self.handovers.remove(&range_id);
                continue;
            };
            let me = self.groups.node();
            if conf.voters_outgoing.is_empty() && conf.learners.is_empty() {
                self.joint.remove(&range_id);
                self.handovers.remove(&range_id);
                continue;
            }
            if !conf.voters.contains(&me) && !self.groups.is_leader(range_id) {
                self.ask_if_removed(range_id, &conf.voters);
                continue;
            }
            if !conf.voters.contains(&me) {
                // Again after an abandoned attempt (the target may have dropped the campaign
                // order, not having applied the joint membership yet).
                let tried = self.handovers.get(&range_id).is_some_and(|at| at.elapsed() < HANDOVER_RETRY);
                if self.groups.is_leader(range_id) && !self.groups.is_transferring(range_id) && !tried {
                    self.handovers.insert(range_id, Instant::now());
                    let next = conf
                        .voters
                        .iter()
                        .copied()
                        .min_by_key(|&id| self.groups.lag_of(range_id, id).unwrap_or(u64::MAX));
                    if let Some(next) = next {
                        let outcome = self.hand_over(range_id, next);
                        tracing::info!(
                            range_id,
                            to = next,
                            ?outcome,
                            "handing over the lead of a range whose membership removes this node"
                        );
                    }
                }
                continue;
            }
            if !conf.voters_outgoing.is_empty() {
                match self.groups.leave_joint(range_id) {
                    Ok(Some((index, _))) => {
                        self.leaving_joint.insert(range_id, index);
                        tracing::info!(range_id, index, "proposed leaving the joint membership");
                    }
                    Ok(None) => {}
                    Err(error) => tracing::debug!(range_id, %error, "leaving the joint membership not proposed"),
                }
                continue;
            }
            self.remove_demoted(range_id);
        }
    }

    /// A demoted learner here (not a learner being added): it never campaigns, so its leader may
    /// have removed it while it was down or cut off without it ever sending a message that
    /// would have been answered with `Envelope::Removed` (see `tell_removed`). It sends each
    /// voter a stale heartbeat response (harmless to a leader that still has it) once per
    /// housekeeping pass until it is removed.
    fn ask_if_removed(&mut self, range_id: u64, voters: &[u64]) {
        let me = self.groups.node();
        let demoted = apply::stored_descriptor(&self.db, range_id).is_ok_and(|desc| {
            desc.replicas
                .iter()
                .any(|r| r.raft_id == me && r.membership() == kvfleet_proto::v1::ReplicaMembership::Demoted)
        });
        if !demoted {
            return;
        }
        let probes = voters.iter().map(|&to| {
            let mut message = kvfleet_replication::Message::default();
            message.set_msg_type(kvfleet_replication::MessageType::MsgHeartbeatResponse);
            // Term 1, which no leader is behind: raft-rs ignores it as stale, or takes it as the
            // learner's answer to a heartbeat; never as news of a later term, which would depose
            // the leader. The node reads who sent it before raft-rs does.
            (message.from, message.to, message.term) = (me, to, 1);
            kvfleet_replication::Envelope::Raft { group: range_id, message }
        });
        self.peers.send(probes.collect());
    }

    /// On the leader, a voter: proposes removing a learner that the end of a joint membership
    /// demoted (the descriptor names them), once no other change is pending. Forgets
    /// the range once it has none (a follower keeps it: it may lead next).
    fn remove_demoted(&mut self, range_id: u64) {
        let desc = match apply::stored_descriptor(&self.db, range_id) {
            Ok(desc) => desc,
            Err(error) => {
                tracing::warn!(range_id, %error, "cannot read the range to remove its demoted learners");
                return;
            }
        };
        let demoted = desc.replicas.iter().find(|r| r.membership() == kvfleet_proto::v1::ReplicaMembership::Demoted);
        let Some(demoted) = demoted.map(|r| r.raft_id) else {
            self.joint.remove(&range_id);
            return;
        };
        if !self.groups.is_leader(range_id) || self.groups.has_pending_conf(range_id) {
            return;
        }
        // One at a time: raft-rs takes a ConfChangeV2 of more than one change as joint.
        let mut change = kvfleet_replication::ConfChangeV2::default();
        change.set_changes(
            vec![kvfleet_replication::ConfChangeSingle {
                change_type: kvfleet_replication::ConfChangeType::RemoveNode,
                node_id: demoted,
                ..Default::default()
            }]
            .into(),
        );
        let context =
            kvfleet_proto::v1::RaftMembershipChange { expected_conf_version: desc.conf_version, added: Vec::new() };
        match self.groups.propose_conf_change(range_id, prost::Message::encode_to_vec(&context), change) {
            Ok((index, _)) => {
                self.membership_proposals.insert((range_id, index));
                tracing::info!(range_id, index, replicas = %describe_replicas(&desc), "proposed removing a demoted learner");
            }
            Err(error) => tracing::debug!(range_id, %error, "removing a demoted learner not proposed"),
        }
    }

    /// Remembers `range_id` as in flux if its membership is joint or has a learner (a group
    /// opened, or a snapshot taken, in such a membership): see `leave_joints`.
    fn note_joint(&mut self, range_id: u64) {
        if self
            .groups
            .conf_state(range_id)
            .is_some_and(|conf| !conf.voters_outgoing.is_empty() || !conf.learners.is_empty())
        {
            self.joint.insert(range_id);
        }
    }

    fn track_proposal(&mut self, range_id: u64, index: u64, term: u64, reply: Reply) {
        let proposal = Proposal { term, reply, deadline: Instant::now() + PROPOSAL_TIMEOUT };
        if let Some(replaced) = self.proposals.insert((range_id, index), proposal) {
            // The index was proposed at an older term and never applied here.
            let _ = replaced.reply.send(Err(ReplicaError::Superseded { range_id }));
        }
    }

    fn tick(&mut self) {
        for silent in self.peers.liveness().silent() {
            self.groups.wake_groups_led_by(silent);
        }
        self.groups.tick();
        self.ticks += 1;
        let deferred = !self.campaigns_deferred.is_empty() || !self.awaiting_campaign.is_empty();
        if deferred && Instant::now() >= self.votes_from {
            for range_id in std::mem::take(&mut self.campaigns_deferred) {
                let leaderless = self.groups.term(range_id).is_some() && self.groups.leader_of(range_id).is_none();
                if leaderless && let Err(error) = self.groups.campaign(range_id) {
                    tracing::warn!(range_id, %error, "campaign failed");
                }
            }
            for input in std::mem::take(&mut self.awaiting_campaign) {
                self.take(input);
            }
        }
        if self.ticks.is_multiple_of(HOUSEKEEPING_EVERY_TICKS) {
            self.forget_early_messages();
            self.leave_joints();
            self.compact_logs();
            self.make_wanted_snapshots();
            self.retry_lost_snapshots();
        }
        let now = Instant::now();
        let expired: Vec<(u64, u64)> =
            self.proposals.iter().filter(|(_, p)| p.deadline <= now).map(|(key, _)| *key).collect();
        for key in expired {
            if let Some(proposal) = self.proposals.remove(&key) {
                let reason = format!(
                    "not committed within {} s (the leader may have lost its quorum)",
                    PROPOSAL_TIMEOUT.as_secs()
                );
                let _ = proposal.reply.send(Err(ReplicaError::OutcomeUnknown { range_id: key.0, reason }));
            }
        }
        let late: Vec<u64> =
            self.reads_asked.iter().filter(|(_, r)| r.deadline <= now).map(|(context, _)| *context).collect();
        for context in late {
            if let Some(batch) = self.reads_asked.remove(&context) {
                let range_id = batch.range_id;
                batch.answer(Err(ReplicaError::ReadNotConfirmed { range_id }));
            }
        }
        // Granted but not applied in time (this replica is far behind or cut off): retry.
        let (late, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.reads_granted).into_iter().partition(|(_, read)| read.deadline <= now);
        self.reads_granted = waiting;
        for (_, read) in late {
            let range_id = read.range_id;
            read.answer(Err(ReplicaError::ReadNotConfirmed { range_id }));
        }
        self.publish_all();
    }

    /// Compacts every log holding at least twice `log_keep_entries` applied entries down to
    /// `log_keep_entries` (a follower further behind gets a snapshot). Not while a snapshot is
    /// being made, and while one is on its way to a follower, not past it: the follower goes on
    /// from there with the log (else a follower of a busy range would chase snapshots for ever).
    fn compact_logs(&mut self) {
        let keep = self.log_keep_entries;
        let ids: Vec<u64> = self.groups.ids().collect();
        for range_id in ids {
            // A snapshot being made must still cover the log when it is done: else the follower
            // needs entries compacted meanwhile, and the leader makes another, and another.
            if self.making_snapshots.lock().contains(&range_id) {
                continue;
            }
            let applied = self.applied.get(&range_id).copied().unwrap_or(0);
            let in_flight = self.snapshots_sent.keys().any(|(group, _)| *group == range_id);
            let offered = self.snapshot_slots.get(&range_id).and_then(|slot| slot.offered_index());
            let Some(first) = self.groups.log_mut(range_id).map(|storage| storage.first_log_index()) else { continue };
            if applied < first || applied - first + 1 < 2 * keep {
                continue;
            }
            let mut up_to = applied - keep;
            if let Some(&(split_index, applied_at)) = self.splits_applied.get(&range_id) {
                // A replica that missed the split entry must get it from the log: a snapshot
                // would skip it, and that replica would hold no replica of the new range. So
                // the leader keeps every entry some replica lacks; a follower (which does not
                // know what the others have, and may lead next) compacts nothing. Until every
                // replica has the split entry, or `SPLIT_LOG_HOLD` has passed: a replica down
                // for longer is narrowed by a snapshot instead (see `snapshot::Installer`).
                let lowest = self.groups.lowest_match(range_id);
                if lowest.is_some_and(|matched| matched >= split_index) || applied_at.elapsed() > SPLIT_LOG_HOLD {
                    self.splits_applied.remove(&range_id);
                } else {
                    up_to = up_to.min(lowest.unwrap_or(0));
                }
            }
            if let (true, Some(offered)) = (in_flight, offered) {
                up_to = up_to.min(offered);
            }
            if up_to < first {
                continue;
            }
            let Some(storage) = self.groups.log_mut(range_id) else { continue };
            match self.log.compact(storage, up_to) {
                Ok(()) => tracing::debug!(range_id, up_to, "Raft log compacted"),
                Err(error) => tracing::warn!(range_id, %error, "Raft log not compacted"),
            }
        }
    }

    /// Starts making the snapshots leaders asked for, one thread per snapshot, one at a time per
    /// group. The leader asks again (at its next heartbeat) until one is on offer.
    fn make_wanted_snapshots(&mut self) {
        for (&range_id, slot) in &self.snapshot_slots {
            // Only a leader sends snapshots (a request left from before it stepped down is moot).
            if !slot.take_wanted() || !self.groups.is_leader(range_id) || !self.making_snapshots.lock().insert(range_id)
            {
                continue;
            }
            let (db, log, files, slot, making, end) = (
                self.db.clone(),
                self.log.clone(),
                self.installer.files.clone(),
                slot.clone(),
                self.making_snapshots.clone(),
                self.key_space_end.clone(),
            );
            let spawned = std::thread::Builder::new().name("kv-snapshot".into()).spawn(move || {
                let started = Instant::now();
                match snapshot::make(&db, &log, &files, range_id, &end) {
                    Ok(made) => {
                        let index = made.get_metadata().index;
                        tracing::info!(range_id, index, took = ?started.elapsed(), "snapshot made for a follower");
                        slot.offer(made);
                    }
                    Err(error) => tracing::warn!(range_id, %error, "making a snapshot failed"),
                }
                making.lock().remove(&range_id);
            });
            if let Err(error) = spawned {
                tracing::warn!(range_id, %error, "cannot start a thread to make a snapshot");
                self.making_snapshots.lock().remove(&range_id);
            }
        }
    }

    /// A follower sent a snapshot long ago and still not caught up is sent another: after
    /// `SNAPSHOT_TRANSFER_TIMEOUT`, or twice the time the file takes at the send rate.
    fn retry_lost_snapshots(&mut self) {
        let rate = self.snapshot_send_bytes_per_sec;
        let patience = |range_id: &u64| {
            let file_bytes = self
                .snapshot_slots
                .get(range_id)
                .and_then(|slot| slot.offered_data())
                .and_then(|data| snapshot::describe(*range_id, &data).ok())
                .map_or(0, |info| info.file_bytes);
            let at_rate = if rate == 0 { 0.0 } else { 2.0 * file_bytes as f64 / rate as f64 };
            SNAPSHOT_TRANSFER_TIMEOUT.max(std::time::Duration::from_secs_f64(at_rate))
        };
        let lost: Vec<(u64, u64)> = self
            .snapshots_sent
            .iter()
            .filter(|((range_id, _), at)| at.elapsed() > patience(range_id))
            .map(|(key, _)| *key)
            .collect();
        for (range_id, to) in lost {
            self.snapshots_sent.remove(&(range_id, to));
            self.groups.report_snapshot(range_id, to, false);
        }
    }

    fn ask_read_indexes(&mut self) {
        let now = Instant::now();
        let held = std::mem::take(&mut self.reads_held).into_iter().map(|(id, (since, replies))| (id, since, replies));
        let arrived = std::mem::take(&mut self.reads_arrived).into_iter().map(|(id, replies)| (id, now, replies));
        for (range_id, since, replies) in held.chain(arrived) {
            let deadline = since + READ_INDEX_TIMEOUT;
            // A leader just elected: asked now, raft-rs would drop the read index; it is asked
            // once the leader's first entry commits (a pass or two), or given up at the deadline.
            // A leader that does not vote (demoted by the end of a joint membership it committed,
            // handing its lead over): raft-rs would grant the read index at once, its voters
            // being one other node, which may already lead a later term; asked again once it
            // follows (the follower asks the leader).
            if self.groups.is_leader(range_id)
                && (!self.groups.leads_with_commit_in_term(range_id) || !self.groups.votes(range_id))
            {
                if now >= deadline {
                    for reply in replies {
                        let _ = reply.send(Err(ReplicaError::ReadNotConfirmed { range_id }));
                    }
                } else {
                    let (first, waiting) = self.reads_held.entry(range_id).or_insert((since, Vec::new()));
                    *first = (*first).min(since);
                    waiting.extend(replies);
                }
                continue;
            }
            let leader_term = self.groups.term(range_id).filter(|_| self.groups.is_leader(range_id));
            let early_acked = leader_term.and_then(|term| self.fast.unapplied(range_id, term)).unwrap_or(0);
            let batch = ReadBatch { range_id, replies, deadline, asked: now, leader_term, early_acked };
            // Under its lease, the leader's commit index covers every acknowledged write (it
            // applied each before acknowledging it) and no other leader can exist.
            let lease = self.leases.get(&range_id).copied();
            if let (Some(term), Some(lease)) = (leader_term, lease)
                && lease.term == term
                && now < lease.until
                && let Some(commit) = self.groups.committed(range_id)
            {
                // Served under the lease, not confirmed by a quorum: extends nothing.
                self.reads_granted.push((commit, ReadBatch { leader_term: None, ..batch }));
                continue;
            }
            let context = self.next_read_context;
            self.next_read_context += 1;
            // The leader keeps pending reads by context: followers' contexts must not collide
            // with its own or each other's, so the context names this node.
            let wire_context = [self.groups.node().to_be_bytes(), context.to_be_bytes()].concat();
            match self.groups.read_index(range_id, wire_context) {
                Ok(()) => {
                    self.reads_asked.insert(context, batch);
                }
                Err(_) => batch.answer(Err(ReplicaError::NoGroup { range_id })),
            }
        }
    }

    /// One ready pass over every group: send leaders' appends, persist, send what had to wait
    /// for the write, install snapshots, apply what committed, answer. Sending first overlaps
    /// the followers' log writes with this node's.
    fn pass(&mut self) -> Result<(), GroupsError> {
        let mut early = self.groups.take_ready();
        self.tell(&mut early)?;
        let log = &self.log;
        let mut batch = self.groups.finish_ready(|persist| log.write(persist).map_err(|e| e.to_string()))?;
        self.tell(&mut batch)?;
        self.ack_early();
        let mut touched: Vec<u64> = Vec::new();
        // A snapshot comes before the group's entries committed in the same pass (they follow it).
        for taken in batch.snapshots {
            self.install(taken);
        }
        for (range_id, entries) in batch.committed {
            touched.push(range_id);
            self.apply(range_id, &entries);
        }
        self.grant_reads(batch.reads, &mut touched);
        self.answer_reads();
        for range_id in touched {
            self.publish(range_id);
        }
        Ok(())
    }

    /// Sends a batch's messages to their nodes, after fsyncing any log write not yet fsynced if
    /// they carry entries, and notes the snapshots among them as sent (a transfer not answered
    /// in time is resent).
    fn tell(&mut self, batch: &mut ReadyBatch) -> Result<(), GroupsError> {
        if batch.tells_entries() {
            self.log.sync_unsynced().map_err(|e| GroupsError::Persist { groups: 0, reason: e.to_string() })?;
        }
        self.peers.send(std::mem::take(&mut batch.messages));
        for sent in batch.snapshots_sent.drain(..) {
            self.snapshots_sent.insert(sent, Instant::now());
        }
        Ok(())
    }

    /// Takes the read indexes the groups granted: each extends its leader's lease and waits
    /// until its index is applied.
    fn grant_reads(&mut self, reads: Vec<(u64, Vec<u8>, u64)>, touched: &mut Vec<u64>) {
        for (range_id, context, index) in reads {
            let Some(context) = context
                .strip_prefix(&self.groups.node().to_be_bytes()[..])
                .and_then(|c| <[u8; 8]>::try_from(c).ok())
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            match self.reads_asked.remove(&context) {
                Some(read) if read.range_id == range_id => {
                    self.extend_lease(&read);
                    self.reads_granted.push((index, read))
                }
                Some(read) => {
                    tracing::warn!(range_id, asked = read.range_id, "a read index granted for another group");
                    self.reads_asked.insert(context, read);
                }
                None => {}
            }
            touched.push(range_id);
        }
    }

    /// Whether a write proposed now in `term` (its keys: `keys`) may be acknowledged before a
    /// majority has it: nothing can refuse it before it applies (every entry of earlier terms
    /// applied, no split or freeze pending, the range not frozen and holding every key), and no
    /// planned step can depose this leader first (no leadership transfer this term, no
    /// membership change pending).
    fn may_ack_early(&mut self, range_id: u64, term: u64, keys: &Option<Vec<bytes::Bytes>>) -> bool {
        use kvfleet_proto::RangeBounds as _;
        let Some(keys) = keys else { return false };
        let span = self.spans.get(&range_id);
        self.applied_terms.get(&range_id) == Some(&term)
            && !self.splits_proposed.contains_key(&range_id)
            && span.is_some_and(|span| !span.frozen && keys.iter().all(|key| span.contains_key(key)))
            && self.transfer_terms.get(&range_id) != Some(&term)
            && !self.groups.has_pending_conf(range_id)
            && !self.joint.contains(&range_id)
    }

    /// In `fast` durability: acknowledges the writes proposed since the last pass, now that this
    /// node's log holds them durably (the write `ready` just made), if it still leads at their
    /// term. Any other is answered when it applies, as in `majority`.
    fn ack_early(&mut self) {
        for (range_id, index) in self.fast.take_candidates() {
            let Some(term) = self.groups.term(range_id) else { continue };
            let held = self.groups.log_mut(range_id).is_some_and(|log| log.last_log_index() >= index);
            if !held || !self.groups.is_leader(range_id) {
                continue;
            }
            if self.proposals.get(&(range_id, index)).is_none_or(|p| p.term != term) {
                continue;
            }
            let Some(proposal) = self.proposals.remove(&(range_id, index)) else { continue };
            self.fast.acked(range_id, index, term);
            // Before the answer: a read that starts once the writer has it must wait for it.
            self.published.unapplied_acks.write().insert(range_id);
            let _ = proposal.reply.send(Ok(()));
        }
    }

    fn install(&mut self, taken: kvfleet_replication::SnapshotToInstall) {
        let range_id = taken.group;
        if self.groups.term(range_id).is_none() {
            // Stopped earlier in this pass (merged away, or retired by another snapshot).
            return;
        }
        let outcome = snapshot::describe(range_id, &taken.data).and_then(|info| {
            self.installer.install(range_id, taken.index, taken.term, &taken.data).map(|outcome| (info, outcome))
        });
        match outcome {
            Ok((_, snapshot::InstallOutcome { obsolete: Some(newer), .. })) => {
                tracing::warn!(
                    range_id,
                    newer,
                    index = taken.index,
                    "a snapshot of a range merged into another here was not installed; its replica stops"
                );
                self.stop_group(range_id, |range_id, _| {
                    let reason = "the range was merged into another on this node".to_string();
                    ReplicaError::OutcomeUnknown { range_id, reason }
                });
            }
            Ok((info, snapshot::InstallOutcome { changed, retired, .. })) => {
                let change = match &changed {
                    Some(snapshot::Installed::Added(desc)) => Some((desc, super::RangeChange::Added(desc))),
                    Some(snapshot::Installed::Replaced { desc, narrowed }) => {
                        if *narrowed {
                            tracing::warn!(
                                range_id,
                                span = %desc.span(),
                                generation = desc.generation,
                                "a snapshot narrowed the range: this replica missed a split, and holds no replica of the split's new range"
                            );
                        }
                        Some((desc, super::RangeChange::Replaced(desc)))
                    }
                    None => None,
                };
                if let Some((desc, change)) = change {
                    self.spans.insert(range_id, Span::of(desc));
                    self.learn_addresses(desc);
                    (self.on_range_change)(change);
                    for tombstone in &retired {
                        self.retire_taken(desc, tombstone);
                    }
                }
                self.note_joint(range_id);
                self.fast.snapshot_installed(range_id, taken.index);
                tracing::info!(
                    range_id,
                    index = taken.index,
                    pairs = info.pairs,
                    "installed a snapshot from the leader"
                );
                let applied = self.applied.entry(range_id).or_default();
                *applied = (*applied).max(taken.index);
            }
            Err(error) => {
                // The log already says the data is there: the node must not serve it without.
                tracing::error!(range_id, %error, "installing a snapshot failed; stopping the node");
                eprintln!("kvfleet-node: installing a snapshot of range {range_id} failed: {error}");
                std::process::abort();
            }
        }
    }

    /// A snapshot of `desc`'s range took `tombstone`'s range here (this replica missed their
    /// merge; the snapshot's write retired it): its group stops and the range table retires it.
    fn retire_taken(
        &mut self,
        desc: &kvfleet_proto::v1::RangeDescriptor,
        tombstone: &kvfleet_proto::v1::RangeDescriptor,
    ) {
        let taken = tombstone.range_id;
        self.stop_group(taken, |range_id, _| {
            let reason = "a snapshot of the range that took it replaced this replica".to_string();
            ReplicaError::OutcomeUnknown { range_id, reason }
        });
        (self.on_range_change)(super::RangeChange::Merged { left: desc, right: tombstone });
        tracing::info!(
            range_id = desc.range_id,
            taken,
            "a snapshot of a merged range retired the replica of a range it took"
        );
    }

    fn apply(&mut self, range_id: u64, entries: &[Entry]) {
        if self.groups.term(range_id).is_none() {
            // Removed earlier in this pass (a ready can hand out two runs of one group).
            return;
        }
        let span = self.spans.entry(range_id).or_default();
        let self_id = self.groups.node();
        let (groups, log) = (&mut self.groups, &self.log);
        let mut conf_changer = |change: &kvfleet_replication::ConfChangeV2,
                                index: u64,
                                batch: &mut rocksdb::WriteBatch| {
            let conf_state = groups.apply_conf_change(range_id, change).map_err(|error| {
                apply::Failure::Refused(ReplicaError::MembershipRefused { range_id, reason: error.to_string() })
            })?;
            let storage = groups.log_mut(range_id).ok_or_else(|| apply::Failure::Fatal("the group is gone".into()))?;
            log.stage_conf_state(storage, conf_state.clone(), index, batch)
                .map_err(|error| apply::Failure::Fatal(error.to_string()))?;
            Ok(conf_state)
        };
        let run = match apply::apply_entries(&self.db, log, range_id, self_id, span, entries, &mut conf_changer) {
            Ok(run) => run,
            Err(error) => {
                tracing::error!(range_id, %error, "applying committed entries failed; stopping the node");
                eprintln!("kvfleet-node: applying range {range_id}'s log failed: {error}");
                std::process::abort();
            }
        };
        // Merges first: a split applied after one in this run may start where the merged
        // range did. The last change's descriptor is the range's in the end, whatever the order.
        // Splits of a merged-away range first: it must still be in the table.
        for split in &run.caught_up_splits {
            self.start_split_group(split.left.range_id, split);
        }
        for merge in &run.caught_up_merges {
            self.merged(merge.left.range_id, merge);
        }
        for merge in &run.merges {
            self.merged(range_id, merge);
        }
        for split in &run.splits {
            self.start_split_group(range_id, split);
        }
        for change in &run.memberships {
            self.membership_changed(range_id, change);
        }
        if let (Some(desc), None) = (run.last_descriptor(), &run.removed) {
            (self.on_range_change)(super::RangeChange::Replaced(desc));
        }
        for freeze in &run.freezes {
            tracing::info!(
                range_id,
                index = freeze.desc.merge_freeze_index,
                span = %freeze.desc.span(),
                "frozen to be merged into its left neighbour"
            );
        }
        for thawed in &run.thaws {
            tracing::warn!(range_id, generation = thawed.generation, span = %thawed.span(), "thawed: its merge was refused for good; serving again");
        }
        let mut all_early_applied = true;
        for entry in run.entries {
            if self.fast.enabled() {
                all_early_applied = self.fast.applied(range_id, entry.index, entry.term);
            }
            if let Some(proposal) = self.proposals.remove(&(range_id, entry.index)) {
                let dropped = self.membership_proposals.remove(&(range_id, entry.index)) && !entry.membership;
                let outcome = if proposal.term != entry.term {
                    Err(ReplicaError::Superseded { range_id })
                } else if dropped {
                    let reason = "raft-rs did not take the change (another one was in force); retry".to_string();
                    Err(ReplicaError::MembershipBusy { range_id, reason })
                } else {
                    entry.outcome
                };
                let _ = proposal.reply.send(outcome);
            }
        }
        if let Some(tombstone) = &run.removed {
            self.remove_group(range_id, tombstone);
            return;
        }
        if all_early_applied && self.fast.enabled() {
            self.published.unapplied_acks.write().remove(&range_id);
        }
        if let Some(last) = entries.last() {
            self.applied.insert(range_id, last.index);
            self.applied_terms.insert(range_id, last.term);
            if self.splits_proposed.get(&range_id).is_some_and(|&index| index <= last.index) {
                self.splits_proposed.remove(&range_id);
            }
        }
    }

    /// A membership change of `range_id` is applied here: every node of the new membership is
    /// reachable, the node's range table learns the replicas, and a leader that entered a joint
    /// membership proposes leaving it at once.
    fn membership_changed(&mut self, range_id: u64, change: &apply::MembershipApplied) {
        self.learn_addresses(&change.desc);
        let demoted =
            change.desc.replicas.iter().any(|r| r.membership() == kvfleet_proto::v1::ReplicaMembership::Demoted);
        if !change.joint {
            self.leaving_joint.remove(&range_id);
            // Demoted by this change while leading: hand over now, whenever it last tried to in
            // the joint membership.
            self.handovers.remove(&range_id);
        }
        if change.joint || demoted {
            self.joint.insert(range_id);
        } else {
            self.joint.remove(&range_id);
        }
        if change.desc.replicas.iter().any(|r| r.raft_id == self.groups.node()) {
            (self.on_range_change)(super::RangeChange::Replaced(&change.desc));
        }
        kvfleet_proto::failpoint::hit("membership-apply-after-write");
        tracing::info!(
            range_id,
            index = change.index,
            conf_version = change.desc.conf_version,
            replicas = %describe_replicas(&change.desc),
            "membership change applied"
        );
        if change.joint || demoted {
            self.leave_joints();
        }
    }

    fn learn_addresses(&mut self, desc: &kvfleet_proto::v1::RangeDescriptor) {
        let mut addresses = self.addresses.write();
        for replica in desc.replicas.iter().filter(|r| r.raft_id != self.groups.node() && !r.address.is_empty()) {
            self.peers.connect(replica.raft_id, &replica.address);
            addresses.insert(replica.raft_id, replica.address.clone());
        }
    }

    /// This node's replica of `range_id` was removed from the group (its log and descriptor are
    /// already gone or retired, durably): the group stops, whatever waited on it is answered,
    /// and the node retires the range and deletes its data.
    fn remove_group(&mut self, range_id: u64, tombstone: &kvfleet_proto::v1::RangeDescriptor) {
        let reason = "this replica was removed from the range before the write was applied here";
        self.stop_group(range_id, |range_id, _| ReplicaError::OutcomeUnknown { range_id, reason: reason.to_string() });
        (self.on_range_change)(super::RangeChange::Removed(tombstone));
        tracing::info!(range_id, replicas = %describe_replicas(tombstone), "this replica was removed from the range");
    }

    /// `range_id` took its frozen right neighbour's keys (durably: the neighbour's log is gone and
    /// its descriptor retired here): the neighbour's group stops here (a write still waiting on it
    /// was ordered after its freeze, so it is not applied), and the node's range table retires
    /// it and widens the range.
    fn merged(&mut self, range_id: u64, merge: &apply::MergeApplied) {
        kvfleet_proto::failpoint::hit("merge-apply-after-write");
        let (right_id, frozen_at) = (merge.right.range_id, merge.right.merge_freeze_index);
        // A write after the freeze was refused (or will be, on the replicas still applying); one
        // before it may have been applied here by the merge itself, unanswered.
        self.stop_group(right_id, |range_id, index| {
            if index > frozen_at {
                ReplicaError::Merging { range_id }
            } else {
                let reason = "the range was merged into its left neighbour while the write was applied".to_string();
                ReplicaError::OutcomeUnknown { range_id, reason }
            }
        });
        (self.on_range_change)(super::RangeChange::Merged { left: &merge.left, right: &merge.right });
        self.publish(range_id);
        tracing::info!(
            range_id,
            right_id,
            index = merge.index,
            span = %merge.left.span(),
            generation = merge.left.generation,
            "merge applied"
        );
    }

    /// Stops this node's group of `range_id` and answers whatever waited on it (a proposal with
    /// `unapplied`).
    fn stop_group(&mut self, range_id: u64, unapplied: impl Fn(u64, u64) -> ReplicaError) {
        let leader = self.groups.leader_of(range_id).filter(|&id| id != self.groups.node());
        self.fast.forget(range_id);
        self.published.unapplied_acks.write().remove(&range_id);
        self.applied_terms.remove(&range_id);
        self.groups.remove(range_id);
        self.applied.remove(&range_id);
        self.spans.remove(&range_id);
        self.snapshot_slots.remove(&range_id);
        self.end_lease(range_id);
        self.splits_proposed.remove(&range_id);
        self.splits_applied.remove(&range_id);
        self.transfer_terms.remove(&range_id);
        self.joint.remove(&range_id);
        self.handovers.remove(&range_id);
        self.leaving_joint.remove(&range_id);
        self.campaigns_deferred.retain(|&id| id != range_id);
        self.removed_told.retain(|(group, _), _| *group != range_id);
        self.snapshots_sent.retain(|(group, _), _| *group != range_id);
        self.membership_proposals.retain(|(group, _)| *group != range_id);
        self.published.leaders.write().remove(&range_id);
        self.published.current_as_of.write().remove(&range_id);
        let pending: Vec<(u64, u64)> = self.proposals.keys().filter(|(id, _)| *id == range_id).copied().collect();
        for key in pending {
            if let Some(proposal) = self.proposals.remove(&key) {
                let _ = proposal.reply.send(Err(unapplied(range_id, key.1)));
            }
        }
        let (gone, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.reads_granted).into_iter().partition(|(_, read)| read.range_id == range_id);
        self.reads_granted = kept;
        for (_, read) in gone {
            read.answer(Err(ReplicaError::NotLeader { range_id, leader }));
        }
    }

    /// A split of `range_id` is durable here: the new range's group starts (its log was created
    /// with the split), the node's range table learns both halves, and the replica that leads
    /// the old range campaigns for the new one at once (the others wait an election timeout, so
    /// it normally wins: leaders stay where the load was).
    fn start_split_group(&mut self, range_id: u64, split: &apply::SplitApplied) {
        kvfleet_proto::failpoint::hit("split-apply-after-write");
        let right_id = split.right.range_id;
        let started = match self.log.open_group(right_id) {
            Ok(Some(storage)) => {
                let slot = storage.snapshot_slot();
                let applied = self.groups.create_applied(right_id, storage, kvfleet_replication::SPLIT_LOG_START);
                applied.map(|applied| (applied, slot)).map_err(|e| e.to_string())
            }
            Ok(None) => Err("it has no Raft log".to_string()),
            Err(error) => Err(error.to_string()),
        };
        let (applied, slot) = match started {
            Ok(started) => started,
            Err(error) => {
                tracing::error!(range_id, right_id, %error, "cannot start the split's new Raft group; stopping the node");
                eprintln!("kvfleet-node: cannot start range {right_id}, split from range {range_id}: {error}");
                std::process::abort();
            }
        };
        self.applied.insert(right_id, applied);
        self.snapshot_slots.insert(right_id, slot);
        self.splits_applied.insert(range_id, (split.index, Instant::now()));
        self.spans.insert(right_id, Span::of(&split.right));
        (self.on_range_change)(super::RangeChange::Split(split));
        // The new group's leader may have asked for this replica's vote before it existed.
        if let Some((since, early)) = self.early_messages.remove(&right_id)
            && since.elapsed() < EARLY_MESSAGES_FOR
        {
            for envelope in early {
                self.deliver(envelope);
            }
        }
        if self.groups.is_leader(range_id)
            && let Err(error) = self.groups.campaign(right_id)
        {
            tracing::warn!(right_id, %error, "campaign failed");
        }
        self.publish(right_id);
        tracing::info!(
            range_id,
            right_id,
            index = split.index,
            split_key = %kvfleet_proto::display_key(&split.right.start_key),
            generation = split.left.generation,
            "split applied"
        );
    }

    /// A quorum confirmed this node's leadership in `read`'s term at some instant after the read
    /// was asked: nobody else can be elected before `LEASE` after it.
    fn extend_lease(&mut self, read: &ReadBatch) {
        let Some(term) = read.leader_term else { return };
        if !self.groups.votes(read.range_id) {
            return;
        }
        if self.splits_proposed.contains_key(&read.range_id) || self.transfer_terms.get(&read.range_id) == Some(&term) {
            return;
        }
        if self.groups.term(read.range_id) != Some(term) || !self.groups.is_leader(read.range_id) {
            return;
        }
        let until = read.asked + super::LEASE;
        let lease = self.leases.entry(read.range_id).or_insert(Lease { term, until });
        if lease.term != term || lease.until < until {
            *lease = Lease { term, until };
        }
    }

    fn answer_reads(&mut self) {
        let applied = &self.applied;
        // A read waits for the read index, and for every write this node acknowledged early
        // before it was asked.
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.reads_granted).into_iter().partition(|(index, read)| {
                applied.get(&read.range_id).is_some_and(|a| *a >= (*index).max(read.early_acked))
            });
        self.reads_granted = waiting;
        for (_, read) in ready {
            self.publish_lease(&read);
            let mut current = self.published.current_as_of.write();
            let at = current.entry(read.range_id).or_insert(read.asked);
            *at = (*at).max(read.asked);
            drop(current);
            read.answer(Ok(()));
        }
    }

    /// `read` (asked as the leader, granted by a quorum round, now applied here) lets the
    /// request handlers serve reads on their own until its lease ends.
    fn publish_lease(&self, read: &ReadBatch) {
        let Some(lease) = self.leases.get(&read.range_id) else { return };
        if read.leader_term != Some(lease.term) || self.groups.term(read.range_id) != Some(lease.term) {
            return;
        }
        let until = read.asked + super::LEASE;
        let mut published = self.published.read_leases.write();
        let entry = published.entry(read.range_id).or_insert(until);
        if *entry < until {
            *entry = until;
        }
    }

    /// Publishes the group's leader; a node that no longer leads it drops its lease (the vote
    /// refusal already keeps a leader with a lease from stepping down; this is the second lock).
    fn publish(&mut self, range_id: u64) {
        self.published.leaders.write().insert(range_id, self.groups.leader_of(range_id));
        if !self.groups.is_leader(range_id) && self.leases.contains_key(&range_id) {
            self.end_lease(range_id);
        }
        if !self.groups.is_leader(range_id) && self.fast.stopped_leading(range_id) {
            self.published.unapplied_acks.write().remove(&range_id);
        }
    }

    /// This node serves no linearizable read of `range_id` on its lease any more.
    fn end_lease(&mut self, range_id: u64) {
        self.leases.remove(&range_id);
        self.published.read_leases.write().remove(&range_id);
    }

    fn publish_all(&mut self) {
        let ids: Vec<u64> = self.groups.ids().collect();
        for range_id in ids {
            self.publish(range_id);
        }
    }
}

/// The replicas of `desc` for a log line: node ids with their part in the membership.
pub fn describe_replicas(desc: &kvfleet_proto::v1::RangeDescriptor) -> String {
    use kvfleet_proto::v1::ReplicaMembership;
    let parts: Vec<String> = desc
        .replicas
        .iter()
        .map(|r| match r.membership() {
            ReplicaMembership::Voter => r.node_id.clone(),
            ReplicaMembership::Learner => format!("{} (learner)", r.node_id),
            ReplicaMembership::Leaving => format!("{} (leaving)", r.node_id),
            ReplicaMembership::Joining => format!("{} (joining)", r.node_id),
            ReplicaMembership::Demoted => format!("{} (demoted)", r.node_id),
        })
        .collect();
    parts.join(", ")
}

fn is_vote_request(envelope: &kvfleet_replication::Envelope) -> bool {
    use kvfleet_replication::MessageType::{MsgRequestPreVote, MsgRequestVote};
    matches!(envelope, kvfleet_replication::Envelope::Raft { message, .. }
        if matches!(message.get_msg_type(), MsgRequestVote | MsgRequestPreVote))
}

impl ReadBatch {
    fn answer(self, outcome: Result<(), ReplicaError>) {
        for reply in self.replies {
            let _ = reply.send(outcome.clone());
        }
    }
}
