//! Key-space arithmetic: which keys a range descriptor covers, and how keys are printed.

use crate::v1::{RangeDescriptor, RangeState, Replica, ReplicaMembership, ReplicaRole};

/// Half-open interval arithmetic over byte keys, where an empty end means "end of key space".
pub trait RangeBounds {
    fn start(&self) -> &[u8];
    fn end(&self) -> &[u8];

    fn contains_key(&self, key: &[u8]) -> bool {
        key >= self.start() && (self.end().is_empty() || key < self.end())
    }

    /// True when the two half-open intervals share at least one key.
    fn overlaps(&self, other: &impl RangeBounds) -> bool {
        let self_before = !self.end().is_empty() && self.end() <= other.start();
        let other_before = !other.end().is_empty() && other.end() <= self.start();
        !(self_before || other_before)
    }

    /// True when `key` could be a split point: strictly after the start and before the end.
    fn is_interior(&self, key: &[u8]) -> bool {
        key > self.start() && (self.end().is_empty() || key < self.end())
    }
}

impl RangeBounds for RangeDescriptor {
    fn start(&self) -> &[u8] {
        &self.start_key
    }
    fn end(&self) -> &[u8] {
        &self.end_key
    }
}

impl RangeDescriptor {
    /// The leader replica (today, the one owner), if the descriptor names one.
    pub fn leader(&self) -> Option<&Replica> {
        self.replicas.iter().find(|r| r.role() == ReplicaRole::Leader).or_else(|| self.replicas.first())
    }

    /// Whether a replicated range is in a joint membership (a change that adds and removes
    /// voters at once, not left yet): some replica is leaving or joining.
    pub fn in_joint_membership(&self) -> bool {
        self.replicas.iter().any(|r| matches!(r.membership(), ReplicaMembership::Leaving | ReplicaMembership::Joining))
    }

    /// Whether the range is a Raft group (its replicas carry Raft ids), of one voter or more.
    /// Every range is, but for one written by an earlier version's single-copy protocol, which
    /// a node adopts as a group when it starts (a retired one stays as it was: a routing hint).
    pub fn is_raft_group(&self) -> bool {
        self.replicas.iter().any(|r| r.raft_id != 0)
    }

    pub fn is_owned_state(&self) -> bool {
        matches!(self.state(), RangeState::Active | RangeState::Frozen)
    }

    /// Whether this replicated range is frozen to be merged into its left neighbour (its
    /// `merge_freeze_index` set, its state FROZEN).
    pub fn is_frozen_for_merge(&self) -> bool {
        self.merge_freeze_index > 0 && self.state() == RangeState::Frozen
    }

    /// The node ids of its replicas, sorted: two ranges with the same are on the same nodes.
    pub fn replica_nodes(&self) -> Vec<&str> {
        let mut nodes: Vec<&str> = self.replicas.iter().map(|r| r.node_id.as_str()).collect();
        nodes.sort_unstable();
        nodes
    }

    /// `[start, end)` for people: keys escaped, the open end shown as `+inf`.
    pub fn span(&self) -> String {
        let end = if self.end_key.is_empty() { "+inf".to_string() } else { display_key(&self.end_key) };
        format!("[{}, {})", display_key(&self.start_key), end)
    }
}

/// Prints a key as text where it is printable ASCII, with `\xNN` escapes elsewhere.
pub fn display_key(key: &[u8]) -> String {
    if key.is_empty() {
        return "\"\"".to_string();
    }
    key.iter().flat_map(|b| std::ascii::escape_default(*b)).map(char::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: &[u8], end: &[u8]) -> RangeDescriptor {
        RangeDescriptor { start_key: start.to_vec().into(), end_key: end.to_vec().into(), ..Default::default() }
    }

    #[test]
    fn open_end_covers_everything_after_start() {
        let r = range(b"m", b"");
        assert!(r.contains_key(b"m"));
        assert!(r.contains_key(b"\xff\xff"));
        assert!(!r.contains_key(b"l"));
    }

    #[test]
    fn end_is_exclusive_and_split_points_are_interior() {
        let r = range(b"a", b"c");
        assert!(r.contains_key(b"b"));
        assert!(!r.contains_key(b"c"));
        assert!(!r.is_interior(b"a"));
        assert!(r.is_interior(b"b"));
        assert!(!r.is_interior(b"c"));
    }

    #[test]
    fn keys_print_escaped() {
        assert_eq!(display_key(b"user\x00\xff"), "user\\x00\\xff");
        assert_eq!(display_key(b""), "\"\"");
        assert_eq!(range(b"", b"").span(), "[\"\", +inf)");
    }
}
