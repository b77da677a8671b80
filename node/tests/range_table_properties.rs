//! Property tests of the node's range table: whatever sequence of splits is applied (valid or
//! not), the owned ranges tile the key space, every key routes to exactly one range, and
//! generations only grow.

use std::sync::Arc;

use kvfleet_node::load::RangeLoad;
use kvfleet_node::ranges::{RangeTable, bootstrap_descriptor};
use kvfleet_node::replica::apply::split_halves;
use kvfleet_proto::RangeBounds;
use kvfleet_proto::v1::{RangeDescriptor, SplitRangeRequest};
use proptest::prelude::*;

fn load() -> Arc<RangeLoad> {
    Arc::new(RangeLoad::new(false, 1))
}

fn owned_sorted(table: &RangeTable) -> Vec<RangeDescriptor> {
    let mut ranges: Vec<RangeDescriptor> = table.owned().map(|r| r.desc.clone()).collect();
    ranges.sort_by(|a, b| a.start_key.cmp(&b.start_key));
    ranges
}

proptest! {
    #[test]
    fn splits_keep_the_key_space_tiled(
        splits in proptest::collection::vec((0usize..8, proptest::collection::vec(any::<u8>(), 0..4)), 1..40),
        probes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..5), 1..50),
    ) {
        let mut table = RangeTable::new("n1");
        table.install(bootstrap_descriptor("n1", "127.0.0.1:1"), load).unwrap();
        let mut next_id = 10u64;
        for (pick, key) in splits {
            let ranges = owned_sorted(&table);
            let target = &ranges[pick % ranges.len()];
            let before = target.generation;
            let request = SplitRangeRequest {
                range_id: target.range_id,
                expected_generation: target.generation,
                split_key: key.clone().into(),
                right_id: next_id,
            };
            // As the log applies a split: checked, then installed (the left half keeps the id).
            match table.check_split(&request) {
                Ok(desc) => {
                    prop_assert!(target.is_interior(&key));
                    let [left, right] = split_halves(desc.clone(), &request.split_key, next_id);
                    prop_assert!(left.generation > before && right.generation > before);
                    prop_assert!(table.apply_replicated_split(&left, &right, load));
                    next_id += 1;
                }
                // Refusals must be for a reason: the key is not strictly inside the range.
                Err(_) => prop_assert!(!target.is_interior(&key)),
            }
            let ranges = owned_sorted(&table);
            prop_assert!(ranges[0].start_key.is_empty());
            prop_assert!(ranges.last().unwrap().end_key.is_empty());
            for pair in ranges.windows(2) {
                prop_assert_eq!(&pair[0].end_key, &pair[1].start_key);
            }
        }
        let ranges = owned_sorted(&table);
        for key in probes {
            let holders = ranges.iter().filter(|r| r.contains_key(&key)).count();
            prop_assert_eq!(holders, 1);
            let routed = table.route(&key, None).unwrap();
            prop_assert!(routed.desc.contains_key(&key));
        }
    }
}
