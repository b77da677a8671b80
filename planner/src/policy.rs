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

/// The longest any policy duration may be: a week, in seconds.
pub const MAX_SECONDS: u64 = 7 * 24 * 3600;
/// The largest any policy size may be: 1 TiB.
pub const MAX_BYTES: u64 = 1 << 40;
/// The most moves that may run at once.
pub const MAX_CONCURRENT_MOVES: usize = 64;

/// A threshold a user sets: a command-line flag in the playground, a `spec.sharding` field of a
/// KeyValueCluster. Its default and bounds live here once; each surface names it its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Knob {
    SplitQps,
    SplitBytes,
    SplitSustainSecs,
    MergeBelowQps,
    MergeBelowBytes,
    MergeDelaySecs,
    MaxConcurrentMoves,
    BalanceTolerance,
    MoveCooldownSecs,
}

/// Where a knob is set, for naming it in an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `--split-qps`, in the policy's own units (bytes, seconds).
    Flags,
    /// `spec.sharding.splitQps`, with sizes in MiB.
    Resource,
}

/// How a knob's value is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    OpsPerSec,
    Bytes,
    Seconds,
    Count,
    Fraction,
}

impl Knob {
    pub const ALL: [Knob; 9] = [
        Knob::SplitQps,
        Knob::SplitBytes,
        Knob::SplitSustainSecs,
        Knob::MergeBelowQps,
        Knob::MergeBelowBytes,
        Knob::MergeDelaySecs,
        Knob::MaxConcurrentMoves,
        Knob::BalanceTolerance,
        Knob::MoveCooldownSecs,
    ];

    /// The command-line flag, without its dashes.
    pub fn flag(self) -> &'static str {
        match self {
            Knob::SplitQps => "split-qps",
            Knob::SplitBytes => "split-bytes",
            Knob::SplitSustainSecs => "split-sustain-secs",
            Knob::MergeBelowQps => "merge-below-qps",
            Knob::MergeBelowBytes => "merge-below-bytes",
            Knob::MergeDelaySecs => "merge-delay-secs",
            Knob::MaxConcurrentMoves => "max-concurrent-moves",
            Knob::BalanceTolerance => "balance-tolerance",
            Knob::MoveCooldownSecs => "move-cooldown-secs",
        }
    }

    /// The field of a KeyValueCluster's `spec.sharding`.
    pub fn field(self) -> &'static str {
        match self {
            Knob::SplitQps => "splitQps",
            Knob::SplitBytes => "splitMiB",
            Knob::SplitSustainSecs => "splitSustainSeconds",
            Knob::MergeBelowQps => "mergeBelowQps",
            Knob::MergeBelowBytes => "mergeBelowMiB",
            Knob::MergeDelaySecs => "mergeDelaySeconds",
            Knob::MaxConcurrentMoves => "maxConcurrentMoves",
            Knob::BalanceTolerance => "balanceTolerance",
            Knob::MoveCooldownSecs => "moveCooldownSeconds",
        }
    }

    /// How the user names it on `surface`.
    pub fn name(self, surface: Surface) -> String {
        match surface {
            Surface::Flags => format!("--{}", self.flag()),
            Surface::Resource => format!("spec.sharding.{}", self.field()),
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            Knob::SplitQps | Knob::MergeBelowQps => Unit::OpsPerSec,
            Knob::SplitBytes | Knob::MergeBelowBytes => Unit::Bytes,
            Knob::SplitSustainSecs | Knob::MergeDelaySecs | Knob::MoveCooldownSecs => Unit::Seconds,
            Knob::MaxConcurrentMoves => Unit::Count,
            Knob::BalanceTolerance => Unit::Fraction,
        }
    }

    /// Its value in `policy`, in the policy's units.
    pub fn value(self, policy: &Policy) -> f64 {
        match self {
            Knob::SplitQps => policy.split_qps,
            Knob::SplitBytes => policy.split_bytes as f64,
            Knob::SplitSustainSecs => policy.split_sustain_secs as f64,
            Knob::MergeBelowQps => policy.merge_below_qps,
            Knob::MergeBelowBytes => policy.merge_below_bytes as f64,
            Knob::MergeDelaySecs => policy.merge_delay_secs as f64,
            Knob::MaxConcurrentMoves => policy.max_concurrent_moves as f64,
            Knob::BalanceTolerance => policy.balance_tolerance,
            Knob::MoveCooldownSecs => policy.move_cooldown_secs as f64,
        }
    }

    /// Sets it in `policy`, from the policy's units (a negative or NaN count or duration becomes
    /// 0, which `Policy::validate` refuses where 0 is not allowed).
    pub fn set(self, policy: &mut Policy, value: f64) {
        match self {
            Knob::SplitQps => policy.split_qps = value,
            Knob::SplitBytes => policy.split_bytes = value as u64,
            Knob::SplitSustainSecs => policy.split_sustain_secs = value as u64,
            Knob::MergeBelowQps => policy.merge_below_qps = value,
            Knob::MergeBelowBytes => policy.merge_below_bytes = value as u64,
            Knob::MergeDelaySecs => policy.merge_delay_secs = value as u64,
            Knob::MaxConcurrentMoves => policy.max_concurrent_moves = value as usize,
            Knob::BalanceTolerance => policy.balance_tolerance = value,
            Knob::MoveCooldownSecs => policy.move_cooldown_secs = value as u64,
        }
    }

    /// Converts a value in the policy's units to `surface`'s (MiB on a resource).
    pub fn to_surface(self, surface: Surface, value: f64) -> f64 {
        match (self.unit(), surface) {
            (Unit::Bytes, Surface::Resource) => value / (1024.0 * 1024.0),
            _ => value,
        }
    }

    /// Converts a value as `surface` spells it (MiB on a resource) to the policy's units.
    pub fn from_surface(self, surface: Surface, value: f64) -> f64 {
        match (self.unit(), surface) {
            (Unit::Bytes, Surface::Resource) => value * 1024.0 * 1024.0,
            _ => value,
        }
    }

    /// The production default, as `surface` spells it (sizes in MiB on a resource).
    pub fn default_on(self, surface: Surface) -> f64 {
        self.to_surface(surface, self.value(&Policy::default()))
    }

    /// The lowest and highest values allowed, in the policy's units; `above` is true when the
    /// lowest itself is refused (`> 0` rather than `>= 1`).
    pub fn bounds(self) -> Bounds {
        const MIB: f64 = 1024.0 * 1024.0;
        match self {
            Knob::SplitQps => Bounds { low: 0.0, above: true, high: None },
            Knob::MergeBelowQps => Bounds { low: 0.0, above: false, high: None },
            Knob::SplitBytes => Bounds { low: MIB, above: false, high: Some(MAX_BYTES as f64) },
            Knob::MergeBelowBytes => Bounds { low: 0.0, above: false, high: Some(MAX_BYTES as f64) },
            Knob::SplitSustainSecs => Bounds { low: 1.0, above: false, high: Some(MAX_SECONDS as f64) },
            Knob::MergeDelaySecs | Knob::MoveCooldownSecs => {
                Bounds { low: 0.0, above: false, high: Some(MAX_SECONDS as f64) }
            }
            Knob::MaxConcurrentMoves => Bounds { low: 1.0, above: false, high: Some(MAX_CONCURRENT_MOVES as f64) },
            Knob::BalanceTolerance => Bounds { low: 0.0, above: true, high: None },
        }
    }
}

/// A knob's allowed values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub low: f64,
    /// `low` itself is refused.
    pub above: bool,
    pub high: Option<f64>,
}

impl Bounds {
    pub fn allows(&self, value: f64) -> bool {
        let low_ok = if self.above { value > self.low } else { value >= self.low };
        low_ok && self.high.is_none_or(|high| value <= high)
    }
}

/// A policy the planner cannot work with: which knob, and what is wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyError {
    OutOfBounds {
        knob: Knob,
        value: f64,
    },
    /// `knob` must be below `other` (the merge thresholds below the split ones).
    NotBelow {
        knob: Knob,
        other: Knob,
    },
}

impl PolicyError {
    /// The knob to fix.
    pub fn knob(&self) -> Knob {
        match self {
            PolicyError::OutOfBounds { knob, .. } | PolicyError::NotBelow { knob, .. } => *knob,
        }
    }

    /// The error as the user who set the knob on `surface` reads it.
    pub fn describe(&self, surface: Surface) -> String {
        match self {
            PolicyError::OutOfBounds { knob, value } => {
                let bounds = knob.bounds();
                let low = knob.to_surface(surface, bounds.low);
                let name = knob.name(surface);
                let value = knob.to_surface(surface, *value);
                match (bounds.above, bounds.high.map(|high| knob.to_surface(surface, high))) {
                    (true, None) => format!("{name} must be above {low} (got {value})"),
                    (false, None) if low == 0.0 => format!("{name} must not be negative (got {value})"),
                    (false, None) => format!("{name} must be at least {low} (got {value})"),
                    (true, Some(high)) => format!("{name} must be above {low} and at most {high} (got {value})"),
                    (false, Some(high)) => format!("{name} must be between {low} and {high} (got {value})"),
                }
            }
            PolicyError::NotBelow { knob, other } => format!(
                "{} must be below {} (default {})",
                knob.name(surface),
                other.name(surface),
                other.default_on(surface)
            ),
        }
    }
}

impl Policy {
    /// This policy with each knob of `overrides` set (values in the policy's units).
    pub fn with(mut self, overrides: impl IntoIterator<Item = (Knob, f64)>) -> Policy {
        for (knob, value) in overrides {
            knob.set(&mut self, value);
        }
        self
    }

    /// Refuses values the planner cannot work with, naming the knob and its limit.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for knob in Knob::ALL {
            let value = knob.value(self);
            if value.is_nan() || !knob.bounds().allows(value) {
                return Err(PolicyError::OutOfBounds { knob, value });
            }
        }
        if self.merge_below_qps >= self.split_qps {
            return Err(PolicyError::NotBelow { knob: Knob::MergeBelowQps, other: Knob::SplitQps });
        }
        if self.merge_below_bytes >= self.split_bytes {
            return Err(PolicyError::NotBelow { knob: Knob::MergeBelowBytes, other: Knob::SplitBytes });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_within_every_bound() {
        assert_eq!(Policy::default().validate(), Ok(()));
        for knob in Knob::ALL {
            assert!(knob.bounds().allows(knob.value(&Policy::default())), "{knob:?}");
        }
    }

    #[test]
    fn every_knob_sets_the_field_it_reads() {
        for (index, knob) in Knob::ALL.into_iter().enumerate() {
            let value = 3.0 + index as f64;
            let policy = Policy::default().with([(knob, value)]);
            assert_eq!(knob.value(&policy), value, "{knob:?}");
            for other in Knob::ALL.into_iter().filter(|k| *k != knob) {
                assert_eq!(other.value(&policy), other.value(&Policy::default()), "{knob:?} changed {other:?}");
            }
        }
    }

    #[test]
    fn errors_name_the_knob_as_each_surface_spells_it() {
        let policy = Policy { split_bytes: 0, ..Policy::default() };
        let error = policy.validate().unwrap_err();
        assert_eq!(error.knob(), Knob::SplitBytes);
        assert_eq!(error.describe(Surface::Flags), "--split-bytes must be between 1048576 and 1099511627776 (got 0)");
        assert_eq!(error.describe(Surface::Resource), "spec.sharding.splitMiB must be between 1 and 1048576 (got 0)");
        let policy = Policy { merge_below_qps: 5000.0, ..Policy::default() };
        assert_eq!(
            policy.validate().unwrap_err().describe(Surface::Resource),
            "spec.sharding.mergeBelowQps must be below spec.sharding.splitQps (default 2000)"
        );
        let policy = Policy { split_qps: f64::NAN, ..Policy::default() };
        assert!(policy.validate().unwrap_err().describe(Surface::Flags).starts_with("--split-qps must be above 0"));
        let policy = Policy { max_concurrent_moves: 65, ..Policy::default() };
        assert_eq!(
            policy.validate().unwrap_err().describe(Surface::Flags),
            "--max-concurrent-moves must be between 1 and 64 (got 65)"
        );
    }
}
