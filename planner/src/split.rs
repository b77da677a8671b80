//! Splits: by size at the middle key; by sustained load at the sampled key that best balances
//! the two halves (rejecting skewed candidates, as CockroachDB's and TiKV's load splitters do);
//! and around a single hot key, which is cut out into its own range rather than split forever.

use std::collections::HashSet;

use crate::model::*;
use crate::{Memory, Policy};

pub fn is_hot(range: &RangeView, policy: &Policy) -> bool {
    range.load.ops() >= policy.split_qps || range.load.bytes() >= policy.split_bytes_per_sec
}

/// The smallest key after `key`: `key` followed by a zero byte.
pub fn successor(key: &[u8]) -> Key {
    let mut next = key.to_vec();
    next.push(0);
    next
}

pub fn plan_splits(
    view: &ClusterView,
    policy: &Policy,
    memory: &Memory,
    now: u64,
    busy: &HashSet<RangeId>,
    plan: &mut Plan,
) {
    for range in &view.ranges {
        if busy.contains(&range.id) {
            continue;
        }
        if let Some(hot) = dominant_hot_key(range, policy) {
            plan.hot_keys.push((range.id, hot.0.clone(), hot.1));
        }
        if range.size_bytes > policy.split_bytes
            && let Some(key) = size_split_key(range)
        {
            let reason = SplitReason::Size { size_bytes: range.size_bytes };
            plan.actions.push(Action::Split { range: range.id, key, reason });
            continue;
        }
        if !is_hot(range, policy) {
            continue;
        }
        let hot_for = memory.hot_since(range.id).map_or(0, |since| now.saturating_sub(since));
        if hot_for < policy.split_sustain_secs {
            plan.skipped.push(Skip::SplitNotSustained { range: range.id, hot_for, needed: policy.split_sustain_secs });
            continue;
        }
        match load_split(range, policy) {
            Ok(action) => plan.actions.push(action),
            Err(skip) => plan.skipped.push(skip),
        }
    }
}

/// The hottest key if it carries at least `hot_key_share` of the range's load.
fn dominant_hot_key<'a>(range: &'a RangeView, policy: &Policy) -> Option<&'a (Key, f64)> {
    let ops = range.load.ops();
    range.hot_keys.first().filter(|(_, key_ops)| ops > 0.0 && *key_ops >= policy.hot_key_share * ops)
}

fn size_split_key(range: &RangeView) -> Option<Key> {
    if let Some(key) = range.size_middle_key.as_ref().filter(|k| range.is_interior(k)) {
        return Some(key.clone());
    }
    // Without a size-based middle, the median sampled key is the best guess.
    let mut keys: Vec<&Key> = range.samples.iter().map(|(k, _)| k).filter(|k| range.is_interior(k)).collect();
    keys.sort();
    keys.get(keys.len() / 2).map(|k| (*k).clone())
}

fn load_split(range: &RangeView, policy: &Policy) -> Result<Action, Skip> {
    let ops = range.load.ops();
    if let Some((key, key_ops)) = dominant_hot_key(range, policy) {
        if range.is_single_key() {
            return Err(Skip::SingleKeyRange { range: range.id, ops });
        }
        // Cut just before the key, or, if the range already starts with it, just after it.
        let cut = if range.is_interior(key) { key.clone() } else { successor(key) };
        if !range.is_interior(&cut) {
            return Err(Skip::SingleKeyRange { range: range.id, ops });
        }
        let reason = SplitReason::IsolateHotKey { share: key_ops / ops };
        return Ok(Action::Split { range: range.id, key: cut, reason });
    }
    let (key, left_share) =
        balanced_split_key(range).ok_or(Skip::NoBalancedSplitKey { range: range.id, best_left_share: None })?;
    if left_share.max(1.0 - left_share) > policy.max_split_imbalance {
        return Err(Skip::NoBalancedSplitKey { range: range.id, best_left_share: Some(left_share) });
    }
    Ok(Action::Split { range: range.id, key, reason: SplitReason::Load { ops, left_share } })
}

/// The interior sampled key whose left side carries the share of the sampled load closest to
/// one half, and that share.
pub fn balanced_split_key(range: &RangeView) -> Option<(Key, f64)> {
    let mut samples: Vec<&(Key, f64)> = range.samples.iter().collect();
    samples.sort_by(|a, b| a.0.cmp(&b.0));
    let total: f64 = samples.iter().map(|(_, w)| w).sum();
    if total <= 0.0 {
        return None;
    }
    let mut best: Option<(Key, f64)> = None;
    let mut left = 0.0;
    let mut index = 0;
    while index < samples.len() {
        let key = &samples[index].0;
        // Everything strictly before `key` goes left.
        let left_share = left / total;
        if range.is_interior(key) {
            let better = best.as_ref().is_none_or(|(_, s)| (left_share - 0.5).abs() < (s - 0.5).abs());
            if better {
                best = Some((key.clone(), left_share));
            }
        }
        while index < samples.len() && samples[index].0 == *key {
            left += samples[index].1;
            index += 1;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::range_view;

    fn samples(keys: &[(&str, f64)]) -> Vec<(Key, f64)> {
        keys.iter().map(|(k, w)| (k.as_bytes().to_vec(), *w)).collect()
    }

    #[test]
    fn balanced_key_splits_load_in_half() {
        let mut range = range_view(1, b"", b"", 0);
        range.samples = samples(&[("a", 1.0), ("b", 1.0), ("c", 1.0), ("d", 1.0)]);
        let (key, share) = balanced_split_key(&range).unwrap();
        assert_eq!((key.as_slice(), share), (&b"c"[..], 0.5));
    }

    #[test]
    fn skewed_candidates_are_rejected_with_a_reason() {
        let policy = Policy::default();
        let mut range = range_view(1, b"a", b"", 0);
        range.load.reads = 10_000.0;
        // 90% of the samples sit on the start key, which cannot be a split point.
        range.samples = samples(&[("a", 9.0), ("b", 1.0)]);
        let skip = load_split(&range, &policy).unwrap_err();
        assert!(matches!(skip, Skip::NoBalancedSplitKey { best_left_share: Some(s), .. } if s > 0.8));
        assert!(skip.to_string().contains("90% of the load on one side"), "{skip}");
    }

    #[test]
    fn a_dominant_key_is_cut_out_then_left_alone() {
        let policy = Policy::default();
        let mut range = range_view(1, b"a", b"z", 0);
        range.load.reads = 10_000.0;
        range.hot_keys = vec![(b"m".to_vec(), 9_000.0)];
        let Ok(Action::Split { key, reason: SplitReason::IsolateHotKey { .. }, .. }) = load_split(&range, &policy)
        else {
            panic!("expected an isolating split");
        };
        assert_eq!(key, b"m");
        // The right half starts with the hot key: cut just after it.
        let mut right = range_view(2, b"m", b"z", 0);
        right.load = range.load;
        right.hot_keys = range.hot_keys.clone();
        let Ok(Action::Split { key, .. }) = load_split(&right, &policy) else { panic!("expected a split") };
        assert_eq!(key, b"m\0");
        // [m, m\0) holds only the hot key: no more splits.
        let mut single = range_view(3, b"m", b"m\0", 0);
        single.load = range.load;
        single.hot_keys = range.hot_keys.clone();
        assert!(single.is_single_key());
        assert!(matches!(load_split(&single, &policy), Err(Skip::SingleKeyRange { .. })));
    }
}
