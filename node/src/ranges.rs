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
    MergeRangesRequest, NotOwner, RangeDescriptor, RangeState, Replica, ReplicaRole, RequestHeader, SplitRangeRequest,
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

/// The outcome of validating a split: the descriptors to persist, then to install.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitPlan {
    pub left: RangeDescriptor,
    pub right: RangeDescriptor,
    pub retired: RangeDescriptor,
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
    /// Ranges being copied onto this node by an online move, by id. Not served.
    importing: HashMap<u64, RangeDescriptor>,
}

impl RangeTable {
    pub fn new(node_id: impl Into<String>) -> Self {
        RangeTable { node_id: node_id.into(), ..Default::default() }
    }

    /// Installs a persisted descriptor (at start-up). Owned ranges must not overlap.
    pub fn install(&mut self, desc: RangeDescriptor, load: impl FnOnce() -> Arc<RangeLoad>) -> Result<(), NodeError> {
        if desc.state() == RangeState::Importing {
            self.importing.insert(desc.range_id, desc);
            return Ok(());
        }
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

    /// True when `range_id` names a range this node owns, owned or is importing.
    pub fn knows_id(&self, range_id: u64) -> bool {
        self.retired.contains_key(&range_id) || self.importing.contains_key(&range_id) || self.by_id(range_id).is_some()
    }

    /// The highest range id and move id any descriptor here mentions (owned, retired,
    /// importing; successors and move intents included).
    pub fn max_ids(&self) -> (u64, u64) {
        let all = self.owned.values().map(|o| &o.desc).chain(self.retired.values()).chain(self.importing.values());
        all.fold((0, 0), |(range, mv), d| {
            let successor = d.successors.iter().copied().max().unwrap_or(0);
            (range.max(d.range_id).max(successor), mv.max(d.move_intent.as_ref().map_or(0, |i| i.move_id)))
        })
    }

    /// True when this node owns, owned or is importing any range: it is part of a fleet's history.
    pub fn has_history(&self) -> bool {
        !self.owned.is_empty() || !self.retired.is_empty() || !self.importing.is_empty()
    }

    /// The tombstone of a range this node no longer owns.
    pub fn retired(&self, range_id: u64) -> Option<&RangeDescriptor> {
        self.retired.get(&range_id)
    }

    pub fn importing(&self, range_id: u64) -> Option<&RangeDescriptor> {
        self.importing.get(&range_id)
    }

    pub fn all_importing(&self) -> impl Iterator<Item = &RangeDescriptor> {
        self.importing.values()
    }

    /// An owned range overlapping `[start, end)`, if any.
    pub fn owned_overlapping(&self, desc: &RangeDescriptor) -> Option<&Arc<OwnedRange>> {
        self.owned.values().find(|o| o.desc.overlaps(desc))
    }

    /// Replaces an owned range's descriptor (freeze, unfreeze), keeping its gate and load.
    /// The caller holds the range's gate exclusively.
    pub fn replace_owned(&mut self, desc: RangeDescriptor) {
        let Some(old) = self.owned.get(&desc.start_key).filter(|o| o.desc.range_id == desc.range_id).cloned() else {
            return;
        };
        let mut range = OwnedRange::new(desc, old.load.clone());
        range.gate = old.gate.clone();
        self.owned.insert(range.desc.start_key.clone(), Arc::new(range));
        old.mark_replaced();
    }

    /// Records a range handed to another node: no longer owned, retired with the new owner as
    /// the hint. The caller holds the range's gate exclusively.
    pub fn retire_moved(&mut self, tombstone: RangeDescriptor) {
        if let Some(old) = self.owned.remove(&tombstone.start_key) {
            old.mark_replaced();
        }
        self.retired.insert(tombstone.range_id, tombstone);
    }

    pub fn start_import(&mut self, desc: RangeDescriptor) {
        self.importing.insert(desc.range_id, desc);
    }

    pub fn forget_import(&mut self, range_id: u64) -> Option<RangeDescriptor> {
        self.importing.remove(&range_id)
    }

    /// An import completed: the range is owned here from now on.
    pub fn activate_import(&mut self, desc: RangeDescriptor, load: Arc<RangeLoad>) {
        self.importing.remove(&desc.range_id);
        self.retired.remove(&desc.range_id);
        let range = Arc::new(OwnedRange::new(desc, load));
        self.owned.insert(range.desc.start_key.clone(), range);
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
        Ok(desc)
    }

    /// Validates a split (the ids must be chosen already) and computes the new descriptors.
    pub fn plan_split(&self, request: &SplitRangeRequest) -> Result<SplitPlan, NodeError> {
        let SplitRangeRequest { range_id, ref split_key, left_id, right_id, .. } = *request;
        let desc = self.check_split(request)?;
        if left_id == right_id || [left_id, right_id].iter().any(|&id| id == range_id || self.knows_id(id)) {
            return Err(NodeError::Invalid(format!(
                "split ids {left_id} and {right_id} must be distinct and new on this node"
            )));
        }
        let generation = desc.generation + 1;
        let half = |range_id, start_key: &[u8], end_key: &[u8]| RangeDescriptor {
            range_id,
            start_key: Bytes::copy_from_slice(start_key),
            end_key: Bytes::copy_from_slice(end_key),
            generation,
            state: RangeState::Active as i32,
            replicas: desc.replicas.clone(),
            successors: Vec::new(),
            move_intent: None,
            conf_version: 0,
            merge_freeze_index: 0,
        };
        let left = half(left_id, &desc.start_key, split_key);
        let right = half(right_id, split_key, &desc.end_key);
        let mut retired = desc.clone();
        retired.state = RangeState::Retired as i32;
        retired.generation = generation;
        retired.successors = vec![left_id, right_id];
        Ok(SplitPlan { left, right, retired })
    }

    /// Validates a merge of two adjacent owned ranges (the id chosen already) and computes the
    /// merged descriptor and the two retired ones.
    pub fn plan_merge(&self, request: &MergeRangesRequest) -> Result<MergePlan, NodeError> {
        let left = self.by_id(request.left_id).ok_or(NodeError::UnknownRange(request.left_id))?;
        let right = self.by_id(request.right_id).ok_or(NodeError::UnknownRange(request.right_id))?;
        for (range, expected) in [(left, request.expected_left_generation), (right, request.expected_right_generation)]
        {
            let desc = &range.desc;
            if expected != 0 && expected != desc.generation {
                return Err(NodeError::GenerationMismatch {
                    range_id: desc.range_id,
                    expected,
                    actual: desc.generation,
                });
            }
            if desc.state() != RangeState::Active {
                return Err(NodeError::Invalid(format!(
                    "range {} is {:?}, only active ranges merge",
                    desc.range_id,
                    desc.state()
                )));
            }
        }
        let (l, r) = (&left.desc, &right.desc);
        if l.end_key.is_empty() || l.end_key != r.start_key {
            return Err(NodeError::Invalid(format!(
                "ranges {} {} and {} {} are not adjacent (left's end must be right's start)",
                l.range_id,
                l.span(),
                r.range_id,
                r.span()
            )));
        }
        let merged_id = request.merged_id;
        if merged_id == l.range_id || merged_id == r.range_id || self.knows_id(merged_id) {
            return Err(NodeError::Invalid(format!("merged id {merged_id} must be new on this node")));
        }
        let generation = l.generation.max(r.generation) + 1;
        let merged = RangeDescriptor {
            range_id: merged_id,
            start_key: l.start_key.clone(),
            end_key: r.end_key.clone(),
            generation,
            state: RangeState::Active as i32,
            replicas: l.replicas.clone(),
            successors: Vec::new(),
            move_intent: None,
            conf_version: 0,
            merge_freeze_index: 0,
        };
        let retire = |d: &RangeDescriptor| RangeDescriptor {
            state: RangeState::Retired as i32,
            generation,
            successors: vec![merged_id],
            ..d.clone()
        };
        Ok(MergePlan { merged, retired: [retire(l), retire(r)] })
    }

    /// Installs a persisted merge. The caller holds both ranges' gates exclusively.
    pub fn apply_merge(&mut self, plan: &MergePlan, load: impl Fn() -> Arc<RangeLoad>) {
        for retired in &plan.retired {
            if let Some(old) = self.owned.remove(&retired.start_key) {
                old.mark_replaced();
            }
            self.retired.insert(retired.range_id, retired.clone());
        }
        let range = Arc::new(OwnedRange::new(plan.merged.clone(), load()));
        self.owned.insert(plan.merged.start_key.clone(), range);
    }

    /// Installs a persisted split. The caller holds the old range's gate exclusively.
    pub fn apply_split(&mut self, plan: &SplitPlan, load: impl Fn() -> Arc<RangeLoad>) {
        if let Some(old) = self.owned.remove(&plan.retired.start_key) {
            old.mark_replaced();
        }
        self.retired.insert(plan.retired.range_id, plan.retired.clone());
        for half in [&plan.left, &plan.right] {
            let range = Arc::new(OwnedRange::new(half.clone(), load()));
            self.owned.insert(half.start_key.clone(), range);
        }
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
        successors: Vec::new(),
        move_intent: None,
        conf_version: 0,
        merge_freeze_index: 0,
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

    fn split(range_id: u64, expected_generation: u64, key: &[u8], left_id: u64, right_id: u64) -> SplitRangeRequest {
        SplitRangeRequest { range_id, expected_generation, split_key: Bytes::copy_from_slice(key), left_id, right_id }
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
        let plan = table.plan_split(&split(1, 1, b"m", 10, 11)).unwrap();
        assert_eq!((plan.left.start_key.as_ref(), plan.left.end_key.as_ref()), (&b""[..], &b"m"[..]));
        assert_eq!((plan.right.start_key.as_ref(), plan.right.end_key.as_ref()), (&b"m"[..], &b""[..]));
        assert_eq!(plan.left.generation, 2);
        table.apply_split(&plan, load);
        assert_eq!(table.route(b"a", None).unwrap().desc.range_id, 10);
        assert_eq!(table.route(b"m", None).unwrap().desc.range_id, 11);
        assert_eq!(table.owned_count(), 2);
    }

    #[test]
    fn stale_cache_gets_not_owner_with_current_descriptor() {
        let mut table = table_with_bootstrap();
        let plan = table.plan_split(&split(1, 0, b"m", 10, 11)).unwrap();
        table.apply_split(&plan, load);
        let err = table.route(b"z", Some(&header(1, 1))).unwrap_err();
        let hint = err.hint.unwrap();
        assert_eq!((hint.range_id, hint.generation), (11, 2));
        assert!(table.route(b"z", Some(&header(11, 2))).is_ok());
    }

    #[test]
    fn split_rejects_bad_keys_ids_and_generations() {
        let mut table = table_with_bootstrap();
        assert!(matches!(table.plan_split(&split(9, 0, b"m", 10, 11)), Err(NodeError::UnknownRange(9))));
        assert!(matches!(table.plan_split(&split(1, 5, b"m", 10, 11)), Err(NodeError::GenerationMismatch { .. })));
        assert!(matches!(table.plan_split(&split(1, 0, b"", 10, 11)), Err(NodeError::Invalid(_))));
        assert!(matches!(table.plan_split(&split(1, 0, b"m", 10, 10)), Err(NodeError::Invalid(_))));
        let plan = table.plan_split(&split(1, 0, b"m", 10, 11)).unwrap();
        table.apply_split(&plan, load);
        assert!(matches!(table.plan_split(&split(10, 0, b"m", 12, 13)), Err(NodeError::Invalid(_))));
        assert!(matches!(table.plan_split(&split(10, 0, b"c", 1, 13)), Err(NodeError::Invalid(_))));
    }

    #[test]
    fn adjacent_ranges_merge_into_one_with_a_higher_generation() {
        let mut table = table_with_bootstrap();
        table.apply_split(&table.plan_split(&split(1, 0, b"m", 10, 11)).unwrap(), load);
        let request = MergeRangesRequest { left_id: 10, right_id: 11, merged_id: 12, ..Default::default() };
        let plan = table.plan_merge(&request).unwrap();
        assert_eq!((plan.merged.start_key.as_ref(), plan.merged.end_key.as_ref()), (&b""[..], &b""[..]));
        assert_eq!(plan.merged.generation, 3);
        table.apply_merge(&plan, load);
        assert_eq!(table.owned_count(), 1);
        assert_eq!(table.route(b"z", None).unwrap().desc.range_id, 12);
        // Stale routing to a merged-away range gets the merged descriptor as its hint.
        let hint = table.route(b"z", Some(&header(11, 2))).unwrap_err().hint.unwrap();
        assert_eq!((hint.range_id, hint.generation), (12, 3));
    }

    #[test]
    fn merge_refuses_non_adjacent_or_unknown_ranges() {
        let mut table = table_with_bootstrap();
        table.apply_split(&table.plan_split(&split(1, 0, b"m", 10, 11)).unwrap(), load);
        table.apply_split(&table.plan_split(&split(11, 0, b"t", 20, 21)).unwrap(), load);
        let gap = MergeRangesRequest { left_id: 10, right_id: 21, merged_id: 30, ..Default::default() };
        assert!(matches!(table.plan_merge(&gap), Err(NodeError::Invalid(m)) if m.contains("not adjacent")));
        let reversed = MergeRangesRequest { left_id: 20, right_id: 10, merged_id: 30, ..Default::default() };
        assert!(matches!(table.plan_merge(&reversed), Err(NodeError::Invalid(_))));
        let unknown = MergeRangesRequest { left_id: 10, right_id: 99, merged_id: 30, ..Default::default() };
        assert!(matches!(table.plan_merge(&unknown), Err(NodeError::UnknownRange(99))));
        let stale = MergeRangesRequest {
            left_id: 10,
            right_id: 20,
            expected_left_generation: 1,
            merged_id: 30,
            ..Default::default()
        };
        assert!(matches!(table.plan_merge(&stale), Err(NodeError::GenerationMismatch { .. })));
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
