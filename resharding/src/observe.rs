//! Collect: ask every node for its ranges and their load, and turn the answers into the range
//! map the controller acts on and the `ClusterView` the planner reads.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use kvfleet_client::{ChannelConfig, ChannelPool};
use kvfleet_planner::{Action, ClusterView, Load, NodeId, NodeView, RangeView};
use kvfleet_proto::RangeBounds;
use kvfleet_proto::admin_auth::AdminToken;
use kvfleet_proto::v1::{
    LoadReportRequest, LoadReportResponse, RangeDescriptor, RangeLoad, RangeState, ReplicaMembership, ReplicaRole,
    admin_client::AdminClient,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::leadership::{EpochStamp, Leadership};
use crate::platform::Member;
use crate::state::ReshardingState;

/// A voter further behind its leader than this many log entries (or waiting for a snapshot)
/// does not count toward its range's replicas: it cannot help commit soon (a pod just back from
/// a restart, catching up).
pub const MAX_BEHIND_ENTRIES: u64 = 10_000;

/// Key samples and hot keys asked of each range per round.
const SAMPLE_KEYS: u32 = 64;
const HOT_KEYS: u32 = 4;
const MAX_ADMIN_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// An admin client whose calls carry this controller's epoch (and are not sent without leadership).
pub type Admin = AdminClient<InterceptedService<Channel, EpochStamp>>;

/// Admin clients of the nodes, over channels shared with every other caller of the pool.
#[derive(Clone)]
pub struct NodeClients {
    channels: ChannelPool,
    leadership: Leadership,
    admin_token: AdminToken,
    /// Data address -> admin address, for nodes that take admin changes on a port of their own
    /// (a replica move knows replicas by the address in their range's descriptor).
    admin_routes: std::sync::Arc<parking_lot::RwLock<std::collections::HashMap<String, String>>>,
}

impl Default for NodeClients {
    fn default() -> Self {
        NodeClients::new(Leadership::default(), AdminToken::default())
    }
}

impl NodeClients {
    pub fn new(leadership: Leadership, admin_token: AdminToken) -> Self {
        // No pings: every call has a deadline, and a round notices a node that stopped answering.
        let config = ChannelConfig {
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: None,
            ..ChannelConfig::default()
        };
        NodeClients { channels: ChannelPool::new(config), leadership, admin_token, admin_routes: Default::default() }
    }

    /// Sends admin calls meant for each member's data address to its admin address.
    pub fn route_admin_calls(&self, members: &[Member]) {
        let routes = members
            .iter()
            .filter_map(|m| m.admin_address.as_ref().map(|admin| (m.address.clone(), admin.clone())))
            .collect();
        *self.admin_routes.write() = routes;
    }

    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    pub fn admin(&self, address: &str) -> Result<Admin, String> {
        let routed = self.admin_routes.read().get(address).cloned();
        let address = routed.as_deref().unwrap_or(address);
        let channel = self.channels.channel(address).map_err(|e| format!("node {e}"))?;
        // Load reports and routing maps of large clusters exceed tonic's 4 MiB default.
        Ok(AdminClient::with_interceptor(
            channel,
            EpochStamp { leadership: self.leadership.clone(), token: self.admin_token.clone() },
        )
        .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_ADMIN_MESSAGE_BYTES))
    }
}

/// A request with a deadline.
pub fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// What one node said this round.
#[derive(Debug, Clone, Default)]
pub struct NodeReport {
    pub load: LoadReportResponse,
    /// The highest range id the node ever recorded.
    pub max_range_id: u64,
    /// Its ranges as `ListRanges` gives them: on the ranges it leads, how far behind each
    /// replica is (`Replica.behind_entries`).
    pub listed: Vec<RangeDescriptor>,
}

#[derive(Debug, Clone)]
pub struct ObservedNode {
    pub member: Member,
    pub report: Result<NodeReport, String>,
}

impl ObservedNode {
    pub fn owned(&self) -> impl Iterator<Item = &RangeDescriptor> {
        self.report.iter().flat_map(|r| r.load.ranges.iter().filter_map(|l| l.range.as_ref()))
    }

    pub fn holds(&self, range_id: u64) -> Option<&RangeDescriptor> {
        self.owned().find(|d| d.range_id == range_id)
    }
}

/// The serving copy of a range: among owned descriptors that overlap, the newest generation.
/// A Raft group (one voter or more) is the one its leader reports.
#[derive(Debug, Clone)]
pub struct ObservedRange {
    pub desc: RangeDescriptor,
    /// Index into `Observation::nodes`: the single copy's node, or the leader's.
    pub owner: usize,
    /// The owner's load, plus the reads the other replicas served ...
    pub load: RangeLoad,
    /// ... those reads (ops/s) by node (index into `Observation::nodes`).
    pub follower_reads: Vec<(usize, f64)>,
    /// Voting replicas (node indices) whose node answers but has held no copy for a while (the
    /// loop decides how long: `copies_missing` is one round's look).
    pub lost: Vec<usize>,
}

impl ObservedRange {
    /// A Raft group of several replicas (the planner places a Raft group of one voter as it
    /// places any single copy).
    pub fn is_replicated(&self) -> bool {
        self.desc.replicas.len() > 1
    }

    /// A Raft group (of one voter or more): it moves by membership changes and merges through
    /// its log. Not a single copy made by the freeze-and-copy protocol of earlier versions.
    pub fn is_raft_group(&self) -> bool {
        self.desc.is_raft_group()
    }
}

/// Two owned ranges that overlap where one must have replaced the other: more than one node
/// would serve (and may have acknowledged writes for) these keys. Never planned on.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// Index into `Observation::nodes`, and the descriptor it reported.
    pub newer: (usize, RangeDescriptor),
    pub older: (usize, RangeDescriptor),
}

#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub nodes: Vec<ObservedNode>,
    /// The ranges that serve, by id. They tile what is known of the key space without
    /// overlapping; ranges in a conflict are left out.
    pub ranges: BTreeMap<u64, ObservedRange>,
    pub conflicts: Vec<Conflict>,
    /// Replicated ranges some node holds but no node reports leading (an election under way):
    /// missing from `ranges` this round.
    pub leaderless: Vec<u64>,
    /// Nodes that are not members yet hold a replica (a voter, or a learner a move left behind)
    /// of a range in `ranges`, as its leader has it: they left the fleet without being drained
    /// (a StatefulSet shrunk by hand, a move's target scaled away).
    /// Never asked for a report; drained once `draining` (the loop decides when). Node indices
    /// past `nodes` are these: `nodes.len() + i`.
    pub departed: Vec<Member>,
}

impl Observation {
    pub fn node(&self, node_id: &str) -> Option<&ObservedNode> {
        self.nodes.iter().find(|n| n.member.node_id == node_id)
    }

    pub fn node_index(&self, node_id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.member.node_id == node_id)
    }

    /// A node's index among the members, then the departed nodes after them (as the planner
    /// numbers them).
    pub fn any_node_index(&self, node_id: &str) -> Option<usize> {
        self.node_index(node_id)
            .or_else(|| self.departed.iter().position(|m| m.node_id == node_id).map(|i| self.nodes.len() + i))
    }

    /// The member or departed node at `index` (as `any_node_index` numbers them).
    pub fn any_node(&self, index: usize) -> Option<&Member> {
        match self.nodes.get(index) {
            Some(node) => Some(&node.member),
            None => self.departed.get(index - self.nodes.len()),
        }
    }

    pub fn unreachable(&self) -> impl Iterator<Item = (&Member, &str)> {
        self.nodes.iter().filter_map(|n| n.report.as_ref().err().map(|e| (&n.member, e.as_str())))
    }

    /// The highest range id any node mentions or ever recorded.
    pub fn max_range_id(&self) -> u64 {
        let mut max_range = 0;
        for node in &self.nodes {
            let Ok(report) = &node.report else { continue };
            max_range = max_range.max(report.max_range_id);
            for desc in report.load.ranges.iter().filter_map(|l| l.range.as_ref()) {
                max_range = max_range.max(desc.range_id).max(desc.successors.iter().copied().max().unwrap_or(0));
            }
        }
        max_range
    }

    /// Merges under way: each replicated range frozen to be merged, with its left neighbour
    /// (the range ending where it starts), as (left, right). A range frozen serves nothing until
    /// its merge is finished.
    pub fn frozen_merges(&self) -> Vec<(u64, u64)> {
        let frozen = self.ranges.values().filter(|r| r.is_raft_group() && r.desc.merge_freeze_index > 0);
        frozen
            .filter_map(|right| {
                let left = self.ranges.values().find(|l| l.desc.end_key == right.desc.start_key)?;
                Some((left.desc.range_id, right.desc.range_id))
            })
            .collect()
    }

    /// The nodes (indices as `any_node_index` gives them) holding a voting replica of `range`,
    /// as its leader has it; replicas on nodes neither members nor `departed` are left out.
    pub fn holders(&self, range: &ObservedRange) -> Vec<usize> {
        if !range.is_replicated() {
            return vec![range.owner];
        }
        let voting = range
            .desc
            .replicas
            .iter()
            .filter(|r| !matches!(r.membership(), ReplicaMembership::Learner | ReplicaMembership::Demoted));
        voting.filter_map(|r| self.any_node_index(&r.node_id)).collect()
    }

    /// Ranges with fewer than `factor` voting replicas that count: on a node that answers, holds
    /// a copy of the range's keys and is at most `MAX_BEHIND_ENTRIES` behind its leader (none
    /// when the factor is 1). In a joint membership both
    /// the outgoing and the incoming voters must have that many.
    pub fn under_replicated(&self, factor: usize) -> Vec<u64> {
        if factor <= 1 {
            return Vec::new();
        }
        let counts = |range: &ObservedRange, replica: &kvfleet_proto::v1::Replica| {
            replica.node_id == self.nodes[range.owner].member.node_id
                || replica.behind_entries.is_none_or(|behind| behind <= MAX_BEHIND_ENTRIES)
                    && self
                        .node(&replica.node_id)
                        .is_some_and(|n| n.report.is_ok() && n.owned().any(|d| d.overlaps(&range.desc)))
        };
        let short = |range: &ObservedRange, side: &[ReplicaMembership]| {
            let voters = range.desc.replicas.iter().filter(|r| side.contains(&r.membership()));
            voters.filter(|r| counts(range, r)).count() < factor
        };
        use ReplicaMembership::{Joining, Leaving, Voter};
        self.ranges
            .values()
            .filter(|r| short(r, &[Voter, Leaving]) || short(r, &[Voter, Joining]))
            .map(|r| r.desc.range_id)
            .collect()
    }

    /// Voting replicas (range id, node index) whose node answered this round holding no copy
    /// of any part of the range's keys: not a follower behind on a split (it would hold the
    /// range as it was), but one that lost its copy (a replaced disk).
    pub fn copies_missing(&self) -> Vec<(u64, usize)> {
        let mut missing = Vec::new();
        for range in self.ranges.values().filter(|r| r.is_replicated() && !r.desc.in_joint_membership()) {
            for replica in range.desc.replicas.iter().filter(|r| r.membership() == ReplicaMembership::Voter) {
                let Some(index) = self.node_index(&replica.node_id) else { continue };
                if self.nodes[index].report.is_err() {
                    continue;
                }
                if !self.nodes[index].owned().any(|d| d.overlaps(&range.desc)) {
                    missing.push((range.desc.range_id, index));
                }
            }
        }
        missing
    }

    /// The range map as published to nodes for routing hints: every serving descriptor.
    pub fn routing(&self) -> Vec<RangeDescriptor> {
        self.ranges.values().map(|r| r.desc.clone()).collect()
    }

    /// Changes whenever a range's id, generation or owner changes.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for range in self.ranges.values() {
            let desc = &range.desc;
            (desc.range_id, desc.generation, desc.conf_version, range.owner, desc.state).hash(&mut hasher);
        }
        hasher.finish()
    }
}

pub async fn collect(clients: &NodeClients, members: Vec<Member>, timeout: Duration) -> Observation {
    let reports = join_all(members.iter().map(|member| report_of(clients, member.admin_address(), timeout))).await;
    let nodes: Vec<ObservedNode> =
        members.into_iter().zip(reports).map(|(member, report)| ObservedNode { member, report }).collect();
    let (ranges, conflicts) = resolve_ownership(&nodes);
    let leaderless = leaderless(&nodes, &ranges);
    let departed = departed(&nodes, &ranges);
    Observation { nodes, ranges, conflicts, leaderless, departed }
}

/// The nodes that are voters or learners of some range of `ranges` (as its leader has it) but
/// are not among `nodes`, by node id, at the address the range's descriptor gives. (A demoted
/// replica is not: its leader removes it.)
fn departed(nodes: &[ObservedNode], ranges: &BTreeMap<u64, ObservedRange>) -> Vec<Member> {
    let mut departed: BTreeMap<&str, &str> = BTreeMap::new();
    for range in ranges.values().filter(|r| r.is_replicated()) {
        let held = range.desc.replicas.iter().filter(|r| r.membership() != ReplicaMembership::Demoted);
        for replica in held.filter(|r| !nodes.iter().any(|n| n.member.node_id == r.node_id)) {
            departed.entry(&replica.node_id).or_insert(&replica.address);
        }
    }
    departed.into_iter().map(|(node_id, address)| Member::at(node_id, address)).collect()
}

/// Which owned descriptor serves each key. Newest generation first: generations only grow along
/// a key's history (split, merge and move each bump it), so an older descriptor overlapping a
/// newer one was replaced. An older frozen copy is the source of a handoff in progress (frozen
/// until it retires) and is set aside; an older active one would still serve: a conflict, and
/// both sides of it are left out of the map.
///
/// A replicated range's replicas all report it; only its leader's report is a candidate (a
/// follower may not have applied the latest split yet), and of two nodes that both say they lead
/// it (a deposed leader that has not heard yet) the newer descriptor is kept: Raft lets only one
/// of them commit, so that is no conflict.
fn resolve_ownership(nodes: &[ObservedNode]) -> (BTreeMap<u64, ObservedRange>, Vec<Conflict>) {
    let mut owned: Vec<ObservedRange> = Vec::new();
    let mut led: BTreeMap<u64, ObservedRange> = BTreeMap::new();
    // Two groups under one range id (two fleets glued together): left out, like overlaps.
    let mut diverged: Vec<Conflict> = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        let Ok(report) = &node.report else { continue };
        for load in &report.load.ranges {
            let Some(desc) = &load.range else { continue };
            let range = ObservedRange {
                desc: desc.clone(),
                owner: index,
                load: load.clone(),
                follower_reads: Vec::new(),
                lost: Vec::new(),
            };
            if !range.is_raft_group() {
                owned.push(range);
            } else if leads(desc, &node.member.node_id) {
                let kept = led.get(&desc.range_id);
                if let Some(kept) = kept
                    && separate_groups(kept, &nodes[kept.owner].member.node_id, &range, &node.member.node_id)
                {
                    let version = |r: &ObservedRange| (r.desc.generation, r.desc.conf_version);
                    let (newer, older) = if version(&range) > version(kept) { (&range, kept) } else { (kept, &range) };
                    diverged.push(Conflict {
                        newer: (newer.owner, newer.desc.clone()),
                        older: (older.owner, older.desc.clone()),
                    });
                    continue;
                }
                let newer = |kept: &ObservedRange| {
                    (desc.generation, desc.conf_version) > (kept.desc.generation, kept.desc.conf_version)
                };
                if kept.is_none_or(newer) {
                    led.insert(desc.range_id, range);
                }
            }
        }
    }
    for conflict in &diverged {
        led.remove(&conflict.newer.1.range_id);
    }
    add_follower_reads(nodes, &mut led);
    add_lag(nodes, &mut led);
    owned.extend(led.into_values());
    // Newest first; at equal generations active before frozen, then by node for determinism.
    owned.sort_by_key(|r| (std::cmp::Reverse(r.desc.generation), r.desc.state() != RangeState::Active, r.owner));
    // Accepted ranges never overlap each other, so the ones overlapping a candidate are the last
    // starting at or before its start and those starting inside it.
    let mut serving: BTreeMap<Bytes, ObservedRange> = BTreeMap::new();
    let mut conflicts = diverged;
    for range in owned {
        let (start, end) = (&range.desc.start_key, &range.desc.end_key);
        let before = serving.range::<Bytes, _>(..=start).next_back().map(|(_, r)| r);
        let inside = serving.range::<Bytes, _>((Bound::Excluded(start), Bound::Unbounded)).map(|(_, r)| r);
        let inside = inside.take_while(|r| end.is_empty() || r.desc.start_key < *end);
        let newer: Vec<&ObservedRange> =
            before.into_iter().chain(inside).filter(|s| s.desc.overlaps(&range.desc)).collect();
        if newer.is_empty() {
            serving.insert(start.clone(), range);
            continue;
        }
        if range.desc.state() == RangeState::Frozen {
            continue;
        }
        // A replicated range's older descriptor overlapping newer replicated ones is a leader
        // that has not applied a split yet (splits go through the log): behind, not diverged.
        if range.is_raft_group() && newer.iter().all(|n| n.is_raft_group()) {
            continue;
        }
        for newer in newer {
            conflicts
                .push(Conflict { newer: (newer.owner, newer.desc.clone()), older: (range.owner, range.desc.clone()) });
        }
    }
    let in_conflict = |r: &ObservedRange| {
        conflicts.iter().any(|c: &Conflict| (c.newer.0, c.newer.1.range_id) == (r.owner, r.desc.range_id))
    };
    let ranges = serving.into_values().filter(|r| !in_conflict(r)).map(|r| (r.desc.range_id, r)).collect();
    (ranges, conflicts)
}

/// Whether two nodes that each say they lead a range of the same id lead two different Raft
/// groups: neither is a member of the range as the other has it. Replicas of one group always
/// list each other (a deposed leader lists the members it knew, the new leader among them; a
/// removed replica still lists the ones that replaced it).
fn separate_groups(a: &ObservedRange, a_node: &str, b: &ObservedRange, b_node: &str) -> bool {
    let lists = |range: &ObservedRange, node: &str| range.desc.replicas.iter().any(|r| r.node_id == node);
    a_node != b_node && !lists(a, b_node) && !lists(b, a_node)
}

/// Whether `node_id` reports itself the leader of replicated range `desc`.
pub fn leads(desc: &RangeDescriptor, node_id: &str) -> bool {
    desc.replicas.iter().any(|r| r.node_id == node_id && r.role() == ReplicaRole::Leader)
}

/// Reads served by followers (follower and stale reads) count toward their range's load.
fn add_follower_reads(nodes: &[ObservedNode], led: &mut BTreeMap<u64, ObservedRange>) {
    for (index, node) in nodes.iter().enumerate() {
        let Ok(report) = &node.report else { continue };
        for load in &report.load.ranges {
            let Some(desc) = &load.range else { continue };
            let Some(range) = led.get_mut(&desc.range_id) else { continue };
            if range.owner == index || desc.generation != range.desc.generation {
                continue;
            }
            range.load.reads_per_sec += load.reads_per_sec;
            range.load.read_bytes_per_sec += load.read_bytes_per_sec;
            range.follower_reads.push((index, load.reads_per_sec));
        }
    }
}

/// Voting replicas a replicated range lacks for `factor`, out of a membership change (a joint
/// membership or a learner on the way is a change under way: none then). A single copy is not
/// a Raft group and takes no replicas: none.
fn missing_voters(range: &ObservedRange, factor: usize) -> usize {
    let changing = range.desc.in_joint_membership()
        || range
            .desc
            .replicas
            .iter()
            .any(|r| matches!(r.membership(), ReplicaMembership::Learner | ReplicaMembership::Demoted));
    if !range.is_replicated() || changing {
        return 0;
    }
    let voters = range.desc.replicas.iter().filter(|r| r.membership() == ReplicaMembership::Voter).count();
    factor.saturating_sub(voters)
}

/// How far behind each replica is, as the leader's `ListRanges` said (same membership only).
fn add_lag(nodes: &[ObservedNode], led: &mut BTreeMap<u64, ObservedRange>) {
    for range in led.values_mut() {
        let Ok(report) = &nodes[range.owner].report else { continue };
        let listed = report.listed.iter().find(|d| d.range_id == range.desc.range_id);
        let Some(listed) = listed.filter(|d| d.conf_version == range.desc.conf_version) else { continue };
        for replica in &mut range.desc.replicas {
            let lag = listed.replicas.iter().find(|r| r.node_id == replica.node_id);
            replica.behind_entries = lag.and_then(|r| r.behind_entries);
        }
    }
}

/// Raft groups some node reports that are not in the map and that no range in it covers
/// the keys of.
fn leaderless(nodes: &[ObservedNode], ranges: &BTreeMap<u64, ObservedRange>) -> Vec<u64> {
    let mut missing: Vec<u64> = nodes
        .iter()
        .flat_map(ObservedNode::owned)
        .filter(|d| d.is_raft_group() && !ranges.contains_key(&d.range_id))
        .filter(|d| !ranges.values().any(|r| r.desc.overlaps(*d) && r.desc.generation > d.generation))
        .map(|d| d.range_id)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    missing
}

async fn report_of(clients: &NodeClients, address: &str, timeout: Duration) -> Result<NodeReport, String> {
    let mut admin = clients.admin(address)?;
    let mut admin2 = admin.clone();
    let load =
        admin.load_report(with_timeout(LoadReportRequest { sample_keys: SAMPLE_KEYS, hot_keys: HOT_KEYS }, timeout));
    let list = admin2.list_ranges(with_timeout(kvfleet_proto::v1::ListRangesRequest {}, timeout));
    let (load, list) = futures::join!(load, list);
    let load = load.map_err(|s| describe_status(&s))?.into_inner();
    let list = list.map_err(|s| describe_status(&s))?.into_inner();
    clients.leadership.saw_node_epoch(list.operator_epoch);
    Ok(NodeReport { load, max_range_id: list.max_range_id, listed: list.ranges })
}

pub fn describe_status(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

/// The planner's view: nodes by index, every serving range with its load, what is in flight.
pub fn cluster_view(observation: &Observation, state: &ReshardingState, replication_factor: usize) -> ClusterView {
    let nodes = observation
        .nodes
        .iter()
        .enumerate()
        .map(|(index, node)| NodeView {
            id: NodeId(index as u32),
            name: node.member.node_id.clone(),
            schedulable: node.report.is_ok() && !node.member.draining,
            draining: node.member.draining,
            restarting: node.member.restarting,
            departed: false,
        })
        .chain(observation.departed.iter().enumerate().map(|(index, member)| NodeView {
            id: NodeId((observation.nodes.len() + index) as u32),
            name: member.node_id.clone(),
            schedulable: false,
            draining: member.draining,
            restarting: false,
            departed: true,
        }))
        .collect();
    let ranges = observation
        .ranges
        .values()
        .map(|range| {
            let load = &range.load;
            RangeView {
                id: range.desc.range_id,
                start: range.desc.start_key.to_vec(),
                end: range.desc.end_key.to_vec(),
                owner: NodeId(range.owner as u32),
                replicas: if range.is_replicated() {
                    observation.holders(range).into_iter().map(|n| NodeId(n as u32)).collect()
                } else {
                    Vec::new()
                },
                follower_reads: range.follower_reads.iter().map(|(n, ops)| (NodeId(*n as u32), *ops)).collect(),
                lost: range.lost.iter().map(|n| NodeId(*n as u32)).collect(),
                missing_voters: missing_voters(range, replication_factor),
                load: Load {
                    reads: load.reads_per_sec,
                    writes: load.writes_per_sec,
                    read_bytes: load.read_bytes_per_sec,
                    write_bytes: load.write_bytes_per_sec,
                },
                size_bytes: load.approx_size_bytes,
                samples: load.key_samples.iter().map(|s| (s.key.to_vec(), s.weight)).collect(),
                hot_keys: load.hot_keys.iter().map(|h| (h.key.to_vec(), h.ops_per_sec)).collect(),
                size_middle_key: None,
                split_at: state.split_at.get(&range.desc.range_id).copied(),
                moved_at: state.moved_at.get(&range.desc.range_id).copied(),
            }
        })
        .collect();
    let moves = state.moves.iter().filter_map(|m| {
        let from = observation.any_node_index(&m.from)?;
        let to = observation.any_node_index(&m.to)?;
        Some(Action::Move {
            range: m.range_id,
            from: NodeId(from as u32),
            to: NodeId(to as u32),
            reason: kvfleet_planner::MoveReason::Drain,
        })
    });
    let merges = observation.frozen_merges().into_iter().map(|(left, right)| Action::Merge {
        left,
        right,
        reason: kvfleet_planner::MergeReason::Frozen,
    });
    let in_flight = moves.chain(merges).collect();
    ClusterView { nodes, ranges, in_flight }
}

pub fn leader_replica(member: &Member) -> kvfleet_proto::v1::Replica {
    kvfleet_proto::v1::Replica {
        node_id: member.node_id.clone(),
        address: member.address.clone(),
        role: ReplicaRole::Leader as i32,
        raft_id: 0,
        behind_entries: None,
        membership: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(range_id: u64, span: (&str, &str), generation: u64, state: RangeState) -> RangeDescriptor {
        RangeDescriptor {
            range_id,
            start_key: span.0.as_bytes().to_vec().into(),
            end_key: span.1.as_bytes().to_vec().into(),
            generation,
            state: state as i32,
            ..Default::default()
        }
    }

    fn node(id: &str, owned: Vec<RangeDescriptor>) -> ObservedNode {
        let member = Member::at(id, &format!("{id}:1"));
        let ranges = owned.into_iter().map(|d| RangeLoad { range: Some(d), ..Default::default() }).collect();
        let load = LoadReportResponse { ranges, ..Default::default() };
        ObservedNode { member, report: Ok(NodeReport { load, ..Default::default() }) }
    }

    /// n2 completed the move of range 4 ["k", "t") at generation 4, then split it; it also owns
    /// range 5 ["t", +inf).
    fn n2_after_the_move_and_a_split() -> ObservedNode {
        use RangeState::Active;
        let owned =
            vec![range(600, ("k", "p"), 5, Active), range(601, ("p", "t"), 5, Active), range(5, ("t", ""), 4, Active)];
        node("n2", owned)
    }

    fn serving(ranges: &BTreeMap<u64, ObservedRange>) -> Vec<(u64, usize)> {
        ranges.values().map(|r| (r.desc.range_id, r.owner)).collect()
    }

    #[test]
    fn a_frozen_source_after_the_handoff_is_set_aside_not_a_conflict() {
        use RangeState::*;
        // n1 froze range 4 for a move; n2 completed it and split it since.
        let nodes = [
            node("n1", vec![range(2, ("", "k"), 2, Active), range(4, ("k", "t"), 3, Frozen)]),
            n2_after_the_move_and_a_split(),
        ];
        let (ranges, conflicts) = resolve_ownership(&nodes);
        assert!(conflicts.is_empty(), "{conflicts:?}");
        assert_eq!(serving(&ranges), vec![(2, 0), (5, 1), (600, 1), (601, 1)]);
        // Before the handoff the frozen copy is the only one: it serves (frozen) in the map.
        let nodes = [node("n1", vec![range(4, ("k", "t"), 3, Frozen)]), node("n2", vec![])];
        assert_eq!(serving(&resolve_ownership(&nodes).0), vec![(4, 0)]);
    }

    #[test]
    fn two_active_owners_of_the_same_keys_are_a_conflict_and_left_out() {
        use RangeState::*;
        // n1 reactivated its pre-move copy (generation 3) although n2 owns the keys at 5.
        let nodes = [
            node("n1", vec![range(2, ("", "k"), 2, Active), range(4, ("k", "t"), 3, Active)]),
            n2_after_the_move_and_a_split(),
        ];
        let (ranges, conflicts) = resolve_ownership(&nodes);
        let pairs: Vec<(u64, u64)> = conflicts.iter().map(|c| (c.newer.1.range_id, c.older.1.range_id)).collect();
        assert_eq!(pairs, vec![(600, 4), (601, 4)]);
        assert_eq!(serving(&ranges), vec![(2, 0), (5, 1)], "nothing on the conflicting keys is planned");
        // The same id active on two nodes (equal generations) is a conflict too.
        let nodes = [node("n1", vec![range(1, ("", ""), 1, Active)]), node("n2", vec![range(1, ("", ""), 1, Active)])];
        let (ranges, conflicts) = resolve_ownership(&nodes);
        assert_eq!(conflicts.len(), 1);
        assert!(ranges.is_empty());
    }

    /// Range `range_id` over `span` replicated on n1..n3, as `reporter` sees it: `leader` leads.
    fn replicated(range_id: u64, span: (&str, &str), generation: u64, leader: &str) -> RangeDescriptor {
        let replicas = ["n1", "n2", "n3"]
            .iter()
            .enumerate()
            .map(|(index, id)| kvfleet_proto::v1::Replica {
                node_id: id.to_string(),
                address: format!("{id}:1"),
                role: if *id == leader { ReplicaRole::Leader } else { ReplicaRole::Follower } as i32,
                raft_id: index as u64 + 1,
                ..Default::default()
            })
            .collect();
        RangeDescriptor { replicas, ..range(range_id, span, generation, RangeState::Active) }
    }

    fn with_reads(mut node: ObservedNode, reads: f64) -> ObservedNode {
        if let Ok(report) = &mut node.report {
            report.load.ranges.iter_mut().for_each(|l| l.reads_per_sec = reads);
        }
        node
    }

    #[test]
    fn a_replicated_range_is_its_leader_s_report_and_a_lagging_follower_is_no_conflict() {
        // n1 leads range 1 after splitting it (range 7 led by n2); n3 has not applied the split
        // yet, and n2 still thinks it leads range 1 from an older term.
        let nodes = [
            with_reads(node("n1", vec![replicated(1, ("", "m"), 2, "n1"), replicated(7, ("m", ""), 2, "n2")]), 10.0),
            with_reads(node("n2", vec![replicated(1, ("", ""), 1, "n2"), replicated(7, ("m", ""), 2, "n2")]), 5.0),
            with_reads(node("n3", vec![replicated(1, ("", ""), 1, "n1")]), 100.0),
        ];
        let (ranges, conflicts) = resolve_ownership(&nodes);
        assert!(conflicts.is_empty(), "{conflicts:?}");
        assert_eq!(serving(&ranges), vec![(1, 0), (7, 1)]);
        // Reads served by followers count: range 7 is n2's 5 plus n1's 10. Older copies (n2's
        // and n3's range 1 before the split) do not count toward range 1 as it is now.
        assert_eq!(ranges[&7].load.reads_per_sec, 15.0);
        assert_eq!(ranges[&7].follower_reads, vec![(0, 10.0)], "n1's reads of range 7, by node");
        assert_eq!(ranges[&1].load.reads_per_sec, 10.0);
        assert!(leaderless(&nodes, &ranges).is_empty());

        // Range 7's leader does not answer: it is missing this round, and said to be.
        let nodes = [node("n1", vec![replicated(1, ("", "m"), 2, "n1"), replicated(7, ("m", ""), 2, "n2")])];
        let (ranges, _) = resolve_ownership(&nodes);
        assert_eq!(serving(&ranges), vec![(1, 0)]);
        assert_eq!(leaderless(&nodes, &ranges), vec![7]);
    }

    #[test]
    fn a_voter_far_behind_or_without_a_copy_does_not_count_toward_its_replicas() {
        let mut leader = node("n1", vec![replicated(1, ("", ""), 1, "n1")]);
        let mut listed = replicated(1, ("", ""), 1, "n1");
        listed.replicas[1].behind_entries = Some(5);
        listed.replicas[2].behind_entries = Some(MAX_BEHIND_ENTRIES + 1);
        if let Ok(report) = &mut leader.report {
            report.listed = vec![listed];
        }
        let followers =
            [node("n2", vec![replicated(1, ("", ""), 1, "n1")]), node("n3", vec![replicated(1, ("", ""), 1, "n1")])];
        let nodes: Vec<ObservedNode> = std::iter::once(leader).chain(followers).collect();
        let (ranges, _) = resolve_ownership(&nodes);
        let observation = Observation { nodes: nodes.clone(), ranges, ..Default::default() };
        assert_eq!(observation.under_replicated(3), vec![1], "n3 is catching up");
        assert!(observation.under_replicated(1).is_empty());
        // Caught up, but n3 lost its copy (a new disk): still short.
        let mut caught_up = observation.clone();
        caught_up.ranges.get_mut(&1).expect("range 1").desc.replicas[2].behind_entries = Some(0);
        assert!(caught_up.under_replicated(3).is_empty());
        caught_up.nodes[2] = node("n3", vec![]);
        assert_eq!(caught_up.under_replicated(3), vec![1]);
        assert_eq!(caught_up.copies_missing(), vec![(1, 2)]);
    }

    #[test]
    fn a_voter_on_a_node_that_is_not_a_member_is_a_departed_node_the_planner_drains() {
        // Members n1, n2 and n4; range 1's third voter is on n3, which left the fleet.
        let nodes = vec![
            node("n1", vec![replicated(1, ("", ""), 1, "n1")]),
            node("n2", vec![replicated(1, ("", ""), 1, "n1")]),
            node("n4", vec![]),
        ];
        let (ranges, _) = resolve_ownership(&nodes);
        let left = departed(&nodes, &ranges);
        assert_eq!(left.iter().map(|m| (m.node_id.as_str(), m.address.as_str())).collect::<Vec<_>>(), [("n3", "n3:1")]);
        let mut observation = Observation { nodes, ranges, departed: left, ..Default::default() };
        assert_eq!(observation.any_node_index("n3"), Some(3));
        assert_eq!(observation.any_node(3).map(|m| m.node_id.as_str()), Some("n3"));
        assert_eq!(observation.under_replicated(3), vec![1], "a departed voter does not count");

        let mut state = ReshardingState::default();
        let view = cluster_view(&observation, &state, 3);
        let n3 = &view.nodes[3];
        assert!(n3.departed && !n3.draining && !n3.schedulable, "not drained before the loop says so: {n3:?}");
        observation.departed[0].draining = true;
        let view = cluster_view(&observation, &state, 3);
        assert!(view.nodes[3].draining);
        assert_eq!(view.ranges[0].replicas, vec![NodeId(0), NodeId(1), NodeId(3)]);
        assert_eq!(view.ranges[0].missing_voters, 0, "its voter is there, on a node to drain");
        // A move off the departed node in flight is in flight for the planner too.
        state.moves.push(crate::state::InFlightMove {
            move_id: 1,
            range_id: 1,
            generation: 1,
            from: "n3".into(),
            to: "n4".into(),
            reason: "replace a replica on a node that left the fleet".into(),
            started_unix_ms: 0,
        });
        let view = cluster_view(&observation, &state, 3);
        assert!(
            matches!(view.in_flight.as_slice(), [Action::Move { range: 1, from: NodeId(3), to: NodeId(2), .. }]),
            "{:?}",
            view.in_flight
        );
        // Once every voter is on a member, nothing is departed.
        let nodes = vec![node("n1", vec![replicated(1, ("", ""), 1, "n1")])];
        let (ranges, _) = resolve_ownership(&nodes);
        let members = ["n1", "n2", "n3"].map(|id| node(id, vec![]));
        assert!(departed(&members, &ranges).is_empty());
    }
}
