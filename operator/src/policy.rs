//! The planner's knobs as command-line flags: each flag overrides one knob of a base policy (the
//! production defaults, or the playground's quicker ones). Names, defaults and bounds come from
//! `kvfleet_planner::Knob`.

use kvfleet_planner::{Knob, Policy, Surface};

#[derive(Debug, Clone, Default, clap::Args)]
pub struct PolicyArgs {
    /// Split a range above this many ops/s, sustained.
    #[arg(long)]
    pub split_qps: Option<f64>,
    /// Split a range larger than this many bytes.
    #[arg(long)]
    pub split_bytes: Option<u64>,
    /// How long a range must stay hot before a load split, in seconds.
    #[arg(long)]
    pub split_sustain_secs: Option<u64>,
    /// Merge neighbours below this many ops/s (each) ...
    #[arg(long)]
    pub merge_below_qps: Option<f64>,
    /// ... and below this many bytes (together).
    #[arg(long)]
    pub merge_below_bytes: Option<u64>,
    /// How long neighbours must stay cold, and how long after a split, before a merge.
    #[arg(long)]
    pub merge_delay_secs: Option<u64>,
    /// Moves running at once.
    #[arg(long)]
    pub max_concurrent_moves: Option<usize>,
    /// Node loads within this fraction above the mean count as balanced.
    #[arg(long)]
    pub balance_tolerance: Option<f64>,
    /// A range that moved stays put at least this long, in seconds.
    #[arg(long)]
    pub move_cooldown_secs: Option<u64>,
}

impl PolicyArgs {
    /// The knobs these flags set.
    pub fn overrides(&self) -> Vec<(Knob, f64)> {
        let PolicyArgs {
            split_qps,
            split_bytes,
            split_sustain_secs,
            merge_below_qps,
            merge_below_bytes,
            merge_delay_secs,
            max_concurrent_moves,
            balance_tolerance,
            move_cooldown_secs,
        } = self.clone();
        [
            (Knob::SplitQps, split_qps),
            (Knob::SplitBytes, split_bytes.map(|v| v as f64)),
            (Knob::SplitSustainSecs, split_sustain_secs.map(|v| v as f64)),
            (Knob::MergeBelowQps, merge_below_qps),
            (Knob::MergeBelowBytes, merge_below_bytes.map(|v| v as f64)),
            (Knob::MergeDelaySecs, merge_delay_secs.map(|v| v as f64)),
            (Knob::MaxConcurrentMoves, max_concurrent_moves.map(|v| v as f64)),
            (Knob::BalanceTolerance, balance_tolerance),
            (Knob::MoveCooldownSecs, move_cooldown_secs.map(|v| v as f64)),
        ]
        .into_iter()
        .filter_map(|(knob, value)| Some((knob, value?)))
        .collect()
    }

    /// `base` with these flags applied, refused (naming the flag and its limit) if the planner
    /// cannot work with it.
    pub fn apply(&self, base: Policy) -> Result<Policy, String> {
        let policy = base.with(self.overrides());
        policy.validate().map_err(|error| error.describe(Surface::Flags))?;
        Ok(policy)
    }
}

/// Quicker reactions for a laptop demo: splits after 10 s above 1,000 ops/s, moves cool down
/// for 30 s, cold neighbours merge after 2 minutes.
pub fn playground_policy() -> Policy {
    Policy {
        split_qps: 1000.0,
        split_bytes: 64 * 1024 * 1024,
        split_sustain_secs: 10,
        merge_below_qps: 20.0,
        merge_below_bytes: 16 * 1024 * 1024,
        merge_delay_secs: 120,
        move_cooldown_secs: 30,
        ..Policy::default()
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        policy: PolicyArgs,
    }

    #[test]
    fn flags_override_only_what_they_name() {
        let args = PolicyArgs { split_qps: Some(100.0), move_cooldown_secs: Some(1), ..Default::default() };
        let policy = args.apply(Policy::default()).unwrap();
        assert_eq!((policy.split_qps, policy.move_cooldown_secs), (100.0, 1));
        assert_eq!(policy.split_bytes, Policy::default().split_bytes);
    }

    #[test]
    fn invalid_thresholds_are_refused_with_the_flag_named() {
        let error = PolicyArgs { split_qps: Some(0.0), ..Default::default() }.apply(Policy::default()).unwrap_err();
        assert_eq!(error, "--split-qps must be above 0 (got 0)");
        let error =
            PolicyArgs { merge_below_qps: Some(5000.0), ..Default::default() }.apply(Policy::default()).unwrap_err();
        assert_eq!(error, "--merge-below-qps must be below --split-qps (default 2000)");
        assert!(PolicyArgs::default().apply(playground_policy()).is_ok());
    }

    /// The README states how the playground differs from production: it must say what
    /// `playground_policy` does, knob by knob.
    #[test]
    fn the_readme_states_the_playground_policy() {
        let readme = include_str!("../../README.md").split_whitespace().collect::<Vec<_>>().join(" ");
        let (playground, production) = (playground_policy(), Policy::default());
        let mut stated = 0;
        for knob in Knob::ALL {
            let value = knob.value(&playground);
            if value == knob.value(&production) {
                continue;
            }
            let words = match knob.unit() {
                kvfleet_planner::Unit::Bytes => format!("{} MiB", value / (1024.0 * 1024.0)),
                _ => format!("--{} {value}", knob.flag()),
            };
            assert!(readme.contains(&words), "README.md does not say the playground runs with {words}");
            stated += 1;
        }
        assert_eq!(stated, 7, "every difference from production is stated");
    }

    #[test]
    fn every_knob_has_its_flag() {
        let command = Flags::command();
        let flags: Vec<&str> = command.get_arguments().filter_map(|a| a.get_long()).collect();
        for knob in Knob::ALL {
            assert!(flags.contains(&knob.flag()), "no --{} flag", knob.flag());
        }
        assert_eq!(flags.len(), Knob::ALL.len(), "{flags:?}");
    }
}
