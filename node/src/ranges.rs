//! Key -> range on the node: the table of ranges this node owns (and tombstones of those it no
//! longer owns, and routing hints for the rest), how a key is routed, and the split rules.
//!
//! The table is the in-memory image of the descriptors persisted in the `meta` column family;
//! changes are persisted first (see `node.rs`) and applied here after.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use kvfleet_proto::RangeBounds;
use kvfleet_proto::display_key;
use kvfleet_proto::v1::{
    NotOwner, RangeDescriptor, RangeState, Replica, ReplicaRole, RequestHeader, SplitRangeRequest,
};
use prost::Message;

use crate::error::NodeError;
use crate::load::RangeLoad;
use crate::storage::{CF_META, WriteOp};

/// Metadata key prefix of persisted range descriptors: `range/` + id (big-endian).
pub const RANGE_PREFIX: &[u8] = b"range/";
/// Metadata key holding the node id that owns the data directory.
pub const NODE_ID_KEY: &[u8] = b"node/id";

/// The metadata write that persists `desc`.
pub fn descriptor_write(desc: &RangeDescriptor) -> WriteOp {
    WriteOp::Put { cf: CF_META, key: descriptor_key(desc.range_id), value: desc.encode_to_vec().into() }
}

pub fn descriptor_key(range_id: u64) -> Bytes {
    let mut key = RANGE_PREFIX.to_vec();
    key.extend_from_slice(&range_id.to_be_bytes());
    key.into()
}

pub fn decode_descriptor(key: &[u8], value: &[u8]) -> Result<RangeDescriptor, NodeError> {
    RangeDescriptor::decode(value)
        .map_err(|e| NodeError::Corrupt(format!("range descriptor at {}: {e}", display_key(key))))
}

/// A range this node owns, with what the request path needs beside its descriptor.
#[derive(Debug)]
pub struct OwnedRange {
    pub desc: RangeDescriptor,
    /// Requests hold it shared while they run; splits (and later moves) take it exclusively, so
    /// they wait for in-flight requests and no request runs against a replaced descriptor.
    pub gate: Arc<tokio::sync::RwLock<()>>,
    pub load: Arc<RangeLoad>,
    /// Set when this descriptor is replaced; a request that raced with the change re-routes.
    pub replaced: AtomicBool,
    /// Woken when the descriptor is replaced: requests waiting on a frozen range re-route.
    pub changed: tokio::sync::Notify,
    /// When this descriptor was installed in this process (for a frozen range: since when it
    /// has been frozen here, at most).
    pub since: std::time::Instant,
}

impl OwnedRange {
    pub fn new(desc: RangeDescriptor, load: Arc<RangeLoad>) -> Self {
        OwnedRange {
            desc,
            gate: Arc::new(tokio::sync::RwLock::new(())),
            load,
            replaced: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
            since: std::time::Instant::now(),
        }
    }

    pub fn mark_replaced(&self) {
        self.replaced.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub fn is_replaced(&self) -> bool {
        self.replaced.load(Ordering::Acquire)
    }
}

/// The outcome of validating a merge: the merged range and the two it replaces.
#[derive(Debug, Clone, PartialEq)]
pub struct MergePlan {
    pub merged: RangeDescriptor,
    pub retired: [RangeDescriptor; 2],
}

#[derive(Debug, Default)]
pub struct RangeTable {
    node_id: String,
    /// Owned ranges by start key. They never overlap.
    owned: BTreeMap<Bytes, Arc<OwnedRange>>,
    /// Descriptors of ranges this node used to own, by id.
    retired: HashMap<u64, RangeDescriptor>,
    /// Hints about ranges owned elsewhere, by start key (from PublishRouting).
    routing: BTreeMap<Bytes, RangeDescriptor>,
}

impl RangeTable {
    pub fn new(node_id: impl Into<String>) -> Self {
        RangeTable { node_id: node_id.into(), ..Default::default() }
    }

    /// Installs a persisted descriptor (at start-up). Owned ranges must not overlap.
    pub fn install(&mut self, desc: RangeDescriptor, load: impl FnOnce() -> Arc<RangeLoad>) -> Result<(), NodeError> {
        if !desc.is_owned_state() {
            self.retired.insert(desc.range_id, desc);
            return Ok(());
        }
        if let Some(other) = self.owned_overlapping(&desc) {
            return Err(NodeError::Corrupt(format!(
                "owned ranges overlap: {} {} and {} {}",
                other.desc.range_id,
                other.desc.span(),
                desc.range_id,
                desc.span()
            )));
        }
        let range = Arc::new(OwnedRange::new(desc, load()));
        self.owned.insert(range.desc.start_key.clone(), range);
        Ok(())
    }

    pub fn owned(&self) -> impl Iterator<Item = &Arc<OwnedRange>> {
        self.owned.values()
    }

    pub fn owned_count(&self) -> usize {
        self.owned.len()
    }

    pub fn routing_hints(&self) -> impl Iterator<Item = &RangeDescriptor> {
        self.routing.values()
    }

    pub fn by_id(&self, range_id: u64) -> Option<&Arc<OwnedRange>> {
        self.owned.values().find(|o| o.desc.range_id == range_id)
    }

    /// True when `range_id` names a range this node owns or owned.
    pub fn knows_id(&self, range_id: u64) -> bool {
        self.retired.contains_key(&range_id) || self.by_id(range_id).is_some()
    }

    /// The highest range id any descriptor here mentions (owned, retired; successors included).
    pub fn max_range_id(&self) -> u64 {
        let all = self.owned.values().map(|o| &o.desc).chain(self.retired.values());
        all.map(|d| d.successors.iter().copied().max().unwrap_or(0).max(d.range_id)).max().unwrap_or(0)
    }

    /// True when this node owns or owned any range: it is part of a fleet's history.
    pub fn has_history(&self) -> bool {
        !self.owned.is_empty() || !self.retired.is_empty()
    }

    /// The tombstone of a range this node no longer owns.
    pub fn retired(&self, range_id: u64) -> Option<&RangeDescriptor> {
        self.retired.get(&range_id)
    }

    /// An owned range overlapping `[start, end)`, if any.
    pub fn owned_overlapping(&self, desc: &RangeDescriptor) -> Option<&Arc<OwnedRange>> {
        self.owned.values().find(|o| o.desc.overlaps(desc))
    }

    /// Records a range no longer owned here (merged into its left neighbour, or this replica
    /// removed from it), kept as a tombstone whose replicas are the routing hint.
    pub fn retire(&mut self, tombstone: RangeDescriptor) {
        if let Some(old) = self.owned.remove(&tombstone.start_key) {
            old.mark_replaced();
        }
        self.retired.insert(tombstone.range_id, tombstone);
    }

    fn containing(&self, key: &[u8]) -> Option<&Arc<OwnedRange>> {
        self.owned
            .range::<[u8], _>((std::ops::Bound::Unbounded, std::ops::Bound::Included(key)))
            .next_back()
            .map(|(_, range)| range)
            .filter(|range| range.desc.contains_key(key))
    }

    /// Routes `key` to the owned range that holds it, checking the client's cached range and
    /// generation if it sent them. Otherwise explains why not, with the best hint known.
    pub fn route(&self, key: &[u8], header: Option<&RequestHeader>) -> Result<Arc<OwnedRange>, Box<NotOwner>> {
        let expected = header.filter(|h| h.range_id != 0);
        if let Some(range) = self.containing(key) {
            match expected {
                Some(h) if h.range_id != range.desc.range_id || h.generation != range.desc.generation => {
                    let reason = format!(
                        "the key is in range {} at generation {}, the request was routed to range {} at generation {}",
                        range.desc.range_id, range.desc.generation, h.range_id, h.generation
                    );
                    return Err(self.not_owner(key, Some(range.desc.clone()), reason));
                }
                _ => return Ok(range.clone()),
            }
        }
        let hint = self.hint_for(key, expected.map(|h| h.range_id));
        let reason = match &hint {
            Some(h) => format!(
                "node {} owns no range containing {}; range {} at generation {} is owned by {}",
                self.node_id,
                display_key(key),
                h.range_id,
                h.generation,
                h.leader().map_or("an unknown node", |r| r.node_id.as_str())
            ),
            None => format!("node {} owns no range containing {} and knows no owner", self.node_id, display_key(key)),
        };
        Err(self.not_owner(key, hint, reason))
    }

    fn not_owner(&self, key: &[u8], hint: Option<RangeDescriptor>, reason: String) -> Box<NotOwner> {
        Box::new(NotOwner { key: Bytes::copy_from_slice(key), node_id: self.node_id.clone(), hint, reason })
    }

    /// The best descriptor known for a key this node does not own: a routing hint covering it,
    /// else the tombstone of the range the client asked for, if it names another owner.
    fn hint_for(&self, key: &[u8], asked_range: Option<u64>) -> Option<RangeDescriptor> {
        let from_routing = self
            .routing
            .range::<[u8], _>((std::ops::Bound::Unbounded, std::ops::Bound::Included(key)))
            .next_back()
            .map(|(_, d)| d)
            .filter(|d| d.contains_key(key));
        let moved_away =
            |d: &&RangeDescriptor| d.contains_key(key) && d.leader().is_some_and(|l| l.node_id != self.node_id);
        let from_tombstone = asked_range
            .and_then(|id| self.retired.get(&id))
            .filter(moved_away)
            .or_else(|| self.retired.values().filter(moved_away).max_by_key(|d| d.generation));
        match (from_routing, from_tombstone) {
            (Some(a), Some(b)) => Some(if a.generation >= b.generation { a } else { b }.clone()),
            (a, b) => a.or(b).cloned(),
        }
    }

    /// The range a split names, if it may split there: at the expected generation, active, the
    /// key strictly inside.
    pub fn check_split(&self, request: &SplitRangeRequest) -> Result<&RangeDescriptor, NodeError> {
        let SplitRangeRequest { range_id, expected_generation, ref split_key, .. } = *request;
        let range = self.by_id(range_id).ok_or(NodeError::UnknownRange(range_id))?;
        let desc = &range.desc;
        if expected_generation != 0 && expected_generation != desc.generation {
            return Err(NodeError::GenerationMismatch {
                range_id,
                expected: expected_generation,
                actual: desc.generation,
            });
        }
        if desc.state() != RangeState::Active {
            return Err(NodeError::Invalid(format!(
                "range {range_id} is {:?}, only an active range can split",
                desc.state()
            )));
        }
        if !desc.is_interior(split_key) {
            return Err(NodeError::Invalid(format!(
                "split key {} is not strictly inside range {range_id} {}",
                display_key(split_key),
                desc.span()
            )));
        }
        // The freeze recorded this range's generation: a split would bump it, and the frozen
        // range could then neither be merged nor thawed.
        if let Some(frozen) = self.frozen_into(range_id) {
            return Err(NodeError::Move(format!(
                "range {range_id}'s right neighbour, range {}, is frozen to be merged into it: split once the merge \
                 is done (or undone); retry",
                frozen.desc.range_id
            )));
        }
        Ok(desc)
    }

    /// A range held here frozen to be merged into range `left_id`, if any.
    pub fn frozen_into(&self, left_id: u64) -> Option<&Arc<OwnedRange>> {
        self.owned().find(|r| r.desc.is_frozen_for_merge() && r.desc.merge_left_id == left_id)
    }

    /// Installs a split applied through a replicated range's log: the range keeps its id and
    /// the keys before the split key (`left`), the new range `right` takes the rest. Requests
    /// holding the old descriptor re-route. False if the range is not owned here any more.
    pub fn apply_replicated_split(
        &mut self,
        left: &RangeDescriptor,
        right: &RangeDescriptor,
        load: impl FnOnce() -> Arc<RangeLoad>,
    ) -> bool {
        // The replicas as this process knows them (its own address as advertised now).
        let Some(replicas) = self.by_id(left.range_id).map(|old| old.desc.replicas.clone()) else { return false };
        self.replace_replicated(left);
        let right = RangeDescriptor { replicas, ..right.clone() };
        self.owned.insert(right.start_key.clone(), Arc::new(OwnedRange::new(right, load())));
        true
    }

    /// Installs a newer descriptor of a replicated range this node owns (a split, a membership
    /// change, or a snapshot after changes this replica missed: its keys may be fewer), keeping
    /// its gate and load, and this node's address as this process advertises it. Requests
    /// holding the old descriptor re-route. False if the range is not owned here.
    pub fn replace_replicated(&mut self, desc: &RangeDescriptor) -> bool {
        let Some(old) = self.by_id(desc.range_id).cloned() else { return false };
        self.owned.remove(&old.desc.start_key);
        let mut desc = desc.clone();
        let own_address = old.desc.replicas.iter().find(|r| r.node_id == self.node_id).map(|r| r.address.clone());
        for replica in desc.replicas.iter_mut().filter(|r| r.node_id == self.node_id) {
            if let Some(address) = &own_address {
                replica.address = address.clone();
            }
        }
        let mut replaced = OwnedRange::new(desc, old.load.clone());
        replaced.gate = old.gate.clone();
        self.owned.insert(replaced.desc.start_key.clone(), Arc::new(replaced));
        old.mark_replaced();
        true
    }

    /// A replica added to a replicated range installed its first snapshot: the range is owned
    /// here from now on (a tombstone of an earlier replica here is replaced). False if it
    /// overlaps another range owned here (which `create_replica` refuses).
    pub fn add_replica(&mut self, desc: RangeDescriptor, load: Arc<RangeLoad>) -> bool {
        if self.owned_overlapping(&desc).is_some_and(|other| other.desc.range_id != desc.range_id) {
            return false;
        }
        if let Some(old) = self.by_id(desc.range_id).cloned() {
            return self.replace_replicated(&desc) || old.is_replaced();
        }
        self.retired.remove(&desc.range_id);
        let range = Arc::new(OwnedRange::new(desc, load));
        self.owned.insert(range.desc.start_key.clone(), range);
        true
    }

    /// Replaces the routing hints with the descriptors in `ranges` that name another owner.
    pub fn set_routing(&mut self, ranges: Vec<RangeDescriptor>) -> usize {
        self.routing = ranges
            .into_iter()
            .filter(|d| d.leader().is_some_and(|l| l.node_id != self.node_id))
            .map(|d| (d.start_key.clone(), d))
            .collect();
        self.routing.len()
    }
}

/// The replica entry for this node as leader.
pub fn leader_replica(node_id: &str, address: &str) -> Replica {
    Replica {
        node_id: node_id.to_string(),
        address: address.to_string(),
        role: ReplicaRole::Leader as i32,
        raft_id: 0,
        behind_entries: None,
        membership: 0,
    }
}

/// The first range of a new cluster: the whole key space, owned by this node.
pub fn bootstrap_descriptor(node_id: &str, address: &str) -> RangeDescriptor {
    RangeDescriptor {
        range_id: 1,
        start_key: Bytes::new(),
        end_key: Bytes::new(),
        generation: 1,
        state: RangeState::Active as i32,
        replicas: vec![leader_replica(node_id, address)],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load() -> Arc<RangeLoad> {
        Arc::new(RangeLoad::new(false, 1))
    }

    fn table_with_bootstrap() -> RangeTable {
        let mut table = RangeTable::new("n1");
        table.install(bootstrap_descriptor("n1", "127.0.0.1:1"), load).unwrap();
        table
    }

    fn split(range_id: u64, expected_generation: u64, key: &[u8], right_id: u64) -> SplitRangeRequest {
        SplitRangeRequest { range_id, expected_generation, split_key: Bytes::copy_from_slice(key), right_id }
    }

    /// A split as the log applies it: checked, then installed (the left half keeps the id).
    fn apply_split(table: &mut RangeTable, request: &SplitRangeRequest) {
        let desc = table.check_split(request).unwrap().clone();
        let [left, right] = crate::replica::apply::split_halves(desc, &request.split_key, request.right_id);
        assert!(table.apply_replicated_split(&left, &right, load));
    }

    fn header(range_id: u64, generation: u64) -> RequestHeader {
        RequestHeader { range_id, generation, allow_forward: false }
    }

    #[test]
    fn bootstrap_range_routes_every_key() {
        let table = table_with_bootstrap();
        for key in [&b""[..], b"a", b"\xff\xff"] {
            assert_eq!(table.route(key, None).unwrap().desc.range_id, 1);
        }
    }

    #[test]
    fn split_tiles_the_parent_and_bumps_generation() {
        let mut table = table_with_bootstrap();
        apply_split(&mut table, &split(1, 1, b"m", 11));
        let left = table.route(b"a", None).unwrap().desc.clone();
        let right = table.route(b"m", None).unwrap().desc.clone();
        assert_eq!((left.range_id, left.start_key.as_ref(), left.end_key.as_ref()), (1, &b""[..], &b"m"[..]));
        assert_eq!((right.range_id, right.start_key.as_ref(), right.end_key.as_ref()), (11, &b"m"[..], &b""[..]));
        assert_eq!((left.generation, right.generation), (2, 2));
        assert_eq!(table.owned_count(), 2);
    }

    #[test]
    fn stale_cache_gets_not_owner_with_current_descriptor() {
        let mut table = table_with_bootstrap();
        apply_split(&mut table, &split(1, 0, b"m", 11));
        let err = table.route(b"z", Some(&header(1, 1))).unwrap_err();
        let hint = err.hint.unwrap();
        assert_eq!((hint.range_id, hint.generation), (11, 2));
        assert!(table.route(b"z", Some(&header(11, 2))).is_ok());
    }

    #[test]
    fn split_rejects_bad_keys_and_generations() {
        let mut table = table_with_bootstrap();
        assert!(matches!(table.check_split(&split(9, 0, b"m", 11)), Err(NodeError::UnknownRange(9))));
        assert!(matches!(table.check_split(&split(1, 5, b"m", 11)), Err(NodeError::GenerationMismatch { .. })));
        assert!(matches!(table.check_split(&split(1, 0, b"", 11)), Err(NodeError::Invalid(_))));
        apply_split(&mut table, &split(1, 0, b"m", 11));
        assert!(matches!(table.check_split(&split(1, 0, b"m", 13)), Err(NodeError::Invalid(_))));
        assert!(matches!(table.check_split(&split(1, 0, b"q", 13)), Err(NodeError::Invalid(_))));
        assert!(table.knows_id(11) && !table.knows_id(13));
    }

    #[test]
    fn a_merged_away_range_points_stale_requests_at_the_merged_one() {
        let mut table = table_with_bootstrap();
        apply_split(&mut table, &split(1, 0, b"m", 11));
        let right = table.by_id(11).unwrap().desc.clone();
        let merged = RangeDescriptor { end_key: Bytes::new(), generation: 3, ..table.by_id(1).unwrap().desc.clone() };
        assert!(table.replace_replicated(&merged));
        table.retire(RangeDescriptor {
            state: RangeState::Retired as i32,
            generation: 3,
            successors: vec![1],
            ..right
        });
        assert_eq!(table.owned_count(), 1);
        assert_eq!(table.route(b"z", None).unwrap().desc.range_id, 1);
        let hint = table.route(b"z", Some(&header(11, 2))).unwrap_err().hint.unwrap();
        assert_eq!((hint.range_id, hint.generation), (1, 3));
        assert_eq!(table.max_range_id(), 11);
    }

    #[test]
    fn keys_owned_elsewhere_get_routing_hints() {
        let mut table = RangeTable::new("n2");
        assert!(table.route(b"k", None).unwrap_err().hint.is_none());
        table.set_routing(vec![bootstrap_descriptor("n1", "127.0.0.1:1")]);
        let err = table.route(b"k", None).unwrap_err();
        assert_eq!(err.hint.unwrap().leader().unwrap().node_id, "n1");
    }

    #[test]
    fn overlapping_descriptors_are_refused() {
        let mut table = table_with_bootstrap();
        let mut other = bootstrap_descriptor("n1", "x");
        other.range_id = 2;
        other.start_key = Bytes::from_static(b"q");
        assert!(matches!(table.install(other, load), Err(NodeError::Corrupt(_))));
    }
}
