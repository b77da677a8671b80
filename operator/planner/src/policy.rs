//! The planner's thresholds. The defaults are the documented defaults of the KeyValueCluster
//! `sharding` section.

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// A range above this many ops/s (reads + writes) for `split_sustain_secs` splits by load.
    pub split_qps: f64,
    /// ... or above this many bytes/s.
    pub split_bytes_per_sec: f64,
    /// A range larger than this splits by size.
    pub split_bytes: u64,
    pub split_sustain_secs: u64,
    /// A load split is refused if the best key leaves more than this share on one side.
    pub max_split_imbalance: f64,
    /// A key carrying at least this share of its range's load is isolated, not split around.
    pub hot_key_share: f64,
    /// Ranges below these are cold and merge with cold neighbours.
    pub merge_below_qps: f64,
    pub merge_below_bytes: u64,
    /// How long neighbours stay cold before merging, and how long after a split they may not.
    pub merge_delay_secs: u64,
    pub max_concurrent_moves: usize,
    /// Nodes within this fraction above the mean are balanced (no moves start).
    pub balance_tolerance: f64,
    /// A move must lower the busiest node by at least this fraction of the mean.
    pub min_move_gain: f64,
    /// A range that moved stays put at least this long.
    pub move_cooldown_secs: u64,
    /// Below this total load, balance by size instead of load.
    pub min_balance_qps: f64,
    /// Size is a reason to move only once the largest node holds this many bytes more than
    /// the mean: moving kilobytes around evens out nothing worth a move.
    pub min_size_imbalance_bytes: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            split_qps: 2000.0,
            split_bytes_per_sec: 64.0 * 1024.0 * 1024.0,
            split_bytes: 256 * 1024 * 1024,
            split_sustain_secs: 30,
            max_split_imbalance: 0.7,
            hot_key_share: 0.5,
            merge_below_qps: 50.0,
            merge_below_bytes: 64 * 1024 * 1024,
            merge_delay_secs: 600,
            max_concurrent_moves: 2,
            balance_tolerance: 0.15,
            min_move_gain: 0.05,
            move_cooldown_secs: 120,
            min_balance_qps: 100.0,
            min_size_imbalance_bytes: 64 * 1024 * 1024,
        }
    }
}
