//! Key -> range -> node on the client: the cached range map, and how it is rebuilt from what the
//! nodes report and corrected by NotOwner hints.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use kvfleet_proto::RangeBounds;
use kvfleet_proto::v1::{ListRangesResponse, RangeDescriptor};

/// The client's picture of which node serves which range. Entries never overlap.
#[derive(Debug, Default, Clone)]
pub struct RangeCache {
    /// Shared so that routing a request clones a pointer, not a descriptor.
    by_start: BTreeMap<Bytes, Arc<RangeDescriptor>>,
    /// Every node address learned from seeds, responses and hints.
    nodes: BTreeSet<String>,
}

impl RangeCache {
    /// The cached range holding `key`, if any.
    pub fn lookup(&self, key: &[u8]) -> Option<&Arc<RangeDescriptor>> {
        self.by_start
            .range::<[u8], _>((std::ops::Bound::Unbounded, std::ops::Bound::Included(key)))
            .next_back()
            .map(|(_, d)| d)
            .filter(|d| d.contains_key(key))
    }

    pub fn ranges(&self) -> impl Iterator<Item = &RangeDescriptor> {
        self.by_start.values().map(|d| d.as_ref())
    }

    pub fn nodes(&self) -> impl Iterator<Item = &String> {
        self.nodes.iter()
    }

    pub fn add_node(&mut self, address: &str) {
        if !address.is_empty() {
            self.nodes.insert(address.to_string());
        }
    }

    /// Inserts `desc` unless a cached range overlapping it is newer; drops the older overlaps.
    /// Returns whether the cache changed.
    pub fn update(&mut self, desc: RangeDescriptor) -> bool {
        if desc.leader().is_none_or(|l| l.address.is_empty()) {
            return false;
        }
        let overlapping: Vec<Bytes> =
            self.by_start.iter().filter(|(_, cached)| cached.overlaps(&desc)).map(|(start, _)| start.clone()).collect();
        let newer_exists = overlapping.iter().any(|start| self.by_start[start].generation > desc.generation);
        let identical = overlapping.len() == 1 && *self.by_start[&overlapping[0]] == desc;
        if newer_exists || identical {
            return false;
        }
        for start in overlapping {
            self.by_start.remove(&start);
        }
        if let Some(leader) = desc.leader() {
            self.nodes.insert(leader.address.clone());
        }
        self.by_start.insert(desc.start_key.clone(), Arc::new(desc));
        true
    }

    pub fn remove(&mut self, range_id: u64) {
        self.by_start.retain(|_, d| d.range_id != range_id);
    }

    /// Rebuilds the map from what nodes reported: ranges a node owns win over routing hints,
    /// and among overlapping descriptors the highest generation wins; at one generation, a
    /// replicated range as its leader reported it (the leader knows it leads, and how far
    /// behind each replica is).
    pub fn rebuild(&mut self, reports: &[ListRangesResponse]) {
        let mut owned: Vec<RangeDescriptor> = Vec::new();
        let mut hints: Vec<RangeDescriptor> = Vec::new();
        for report in reports {
            self.add_node(&report.address);
            owned.extend(report.ranges.iter().cloned());
            hints.extend(report.routing.iter().cloned());
        }
        let reported_by_leader = |d: &RangeDescriptor| d.replicas.iter().any(|r| r.behind_entries.is_some());
        owned.sort_by_key(|d| (std::cmp::Reverse(d.generation), !reported_by_leader(d)));
        hints.sort_by_key(|d| std::cmp::Reverse(d.generation));
        self.by_start.clear();
        for desc in owned.into_iter().chain(hints) {
            if let Some(leader) = desc.leader() {
                self.add_node(&leader.address);
            }
            if !self.by_start.values().any(|cached| cached.overlaps(&desc)) {
                self.by_start.insert(desc.start_key.clone(), Arc::new(desc));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_proto::v1::{RangeState, Replica, ReplicaRole};

    fn desc(id: u64, start: &str, end: &str, generation: u64, addr: &str) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start_key: Bytes::from(start.to_string()),
            end_key: Bytes::from(end.to_string()),
            generation,
            state: RangeState::Active as i32,
            replicas: vec![Replica {
                node_id: addr.into(),
                address: addr.into(),
                role: ReplicaRole::Leader as i32,
                raft_id: 0,
                behind_entries: None,
                membership: 0,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn newer_split_halves_replace_the_parent() {
        let mut cache = RangeCache::default();
        assert!(cache.update(desc(1, "", "", 1, "a:1")));
        assert!(cache.update(desc(2, "m", "", 2, "a:1")));
        assert_eq!(cache.lookup(b"z").unwrap().range_id, 2);
        // The parent is gone: keys before "m" are unknown until the left half arrives.
        assert!(cache.lookup(b"b").is_none());
        assert!(cache.update(desc(3, "", "m", 2, "a:1")));
        assert_eq!(cache.lookup(b"b").unwrap().range_id, 3);
    }

    #[test]
    fn older_descriptors_do_not_overwrite_newer() {
        let mut cache = RangeCache::default();
        cache.update(desc(2, "m", "", 2, "a:1"));
        assert!(!cache.update(desc(1, "", "", 1, "a:1")));
        assert_eq!(cache.lookup(b"z").unwrap().range_id, 2);
    }

    #[test]
    fn rebuild_prefers_owners_and_generations() {
        let mut cache = RangeCache::default();
        let node_a = ListRangesResponse {
            node_id: "a".into(),
            address: "a:1".into(),
            ranges: vec![desc(3, "", "m", 2, "a:1")],
            routing: vec![desc(1, "", "", 1, "a:1")],
            ..Default::default()
        };
        let node_b = ListRangesResponse {
            node_id: "b".into(),
            address: "b:1".into(),
            ranges: vec![desc(4, "m", "", 3, "b:1")],
            ..Default::default()
        };
        cache.rebuild(&[node_a, node_b]);
        assert_eq!(cache.lookup(b"a").unwrap().range_id, 3);
        assert_eq!(cache.lookup(b"q").unwrap().range_id, 4);
        assert_eq!(cache.nodes().count(), 2);
    }

    proptest::proptest! {
        /// Whatever descriptors arrive, in whatever order, cached entries never overlap and a
        /// lookup never returns a range that does not hold the key.
        #[test]
        fn cached_ranges_never_overlap(
            updates in proptest::collection::vec((0u64..50, 0u8..20, 0u8..20, 1u64..6), 1..60),
            probes in proptest::collection::vec(0u8..25, 1..30),
        ) {
            let mut cache = RangeCache::default();
            for (id, a, b, generation) in updates {
                let (start, end) = (a.min(b), a.max(b));
                let end = if end == start { String::new() } else { format!("{end:02}") };
                cache.update(desc(id, &format!("{start:02}"), &end, generation, "n:1"));
                let ranges: Vec<&RangeDescriptor> = cache.ranges().collect();
                for (i, x) in ranges.iter().enumerate() {
                    for y in &ranges[i + 1..] {
                        proptest::prop_assert!(!x.overlaps(*y), "{} overlaps {}", x.span(), y.span());
                    }
                }
            }
            for probe in probes {
                let key = format!("{probe:02}");
                if let Some(found) = cache.lookup(key.as_bytes()) {
                    proptest::prop_assert!(found.contains_key(key.as_bytes()));
                }
            }
        }
    }
}
