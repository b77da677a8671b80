//! The planner's thresholds as command-line flags: each flag overrides one field of a base
//! policy (the production defaults, or the playground's quicker ones).

use kvfleet_planner::Policy;

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
    pub fn apply(&self, mut policy: Policy) -> Policy {
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
        policy.split_qps = split_qps.unwrap_or(policy.split_qps);
        policy.split_bytes = split_bytes.unwrap_or(policy.split_bytes);
        policy.split_sustain_secs = split_sustain_secs.unwrap_or(policy.split_sustain_secs);
        policy.merge_below_qps = merge_below_qps.unwrap_or(policy.merge_below_qps);
        policy.merge_below_bytes = merge_below_bytes.unwrap_or(policy.merge_below_bytes);
        policy.merge_delay_secs = merge_delay_secs.unwrap_or(policy.merge_delay_secs);
        policy.max_concurrent_moves = max_concurrent_moves.unwrap_or(policy.max_concurrent_moves);
        policy.balance_tolerance = balance_tolerance.unwrap_or(policy.balance_tolerance);
        policy.move_cooldown_secs = move_cooldown_secs.unwrap_or(policy.move_cooldown_secs);
        policy
    }

    /// Refuses values the planner cannot work with, naming the flag and the limit.
    pub fn validate(policy: &Policy) -> Result<(), String> {
        let checks = [
            (policy.split_qps > 0.0, "--split-qps must be above 0"),
            (policy.split_bytes > 0, "--split-bytes must be above 0"),
            (policy.merge_below_qps >= 0.0, "--merge-below-qps must not be negative"),
            (policy.merge_below_qps < policy.split_qps, "--merge-below-qps must be below --split-qps"),
            (policy.merge_below_bytes < policy.split_bytes, "--merge-below-bytes must be below --split-bytes"),
            (policy.max_concurrent_moves >= 1, "--max-concurrent-moves must be at least 1"),
            (policy.balance_tolerance > 0.0, "--balance-tolerance must be above 0"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, message)) => Err(message.to_string()),
            None => Ok(()),
        }
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
    use super::*;

    #[test]
    fn flags_override_only_what_they_name() {
        let args = PolicyArgs { split_qps: Some(10.0), move_cooldown_secs: Some(1), ..Default::default() };
        let policy = args.apply(Policy::default());
        assert_eq!((policy.split_qps, policy.move_cooldown_secs), (10.0, 1));
        assert_eq!(policy.split_bytes, Policy::default().split_bytes);
    }

    #[test]
    fn invalid_thresholds_are_refused_with_the_flag_named() {
        let policy = PolicyArgs { split_qps: Some(0.0), ..Default::default() }.apply(Policy::default());
        assert_eq!(PolicyArgs::validate(&policy).unwrap_err(), "--split-qps must be above 0");
        let policy = PolicyArgs { merge_below_qps: Some(5000.0), ..Default::default() }.apply(Policy::default());
        assert!(PolicyArgs::validate(&policy).unwrap_err().contains("--merge-below-qps"));
        assert!(PolicyArgs::validate(&playground_policy()).is_ok());
        assert!(PolicyArgs::validate(&Policy::default()).is_ok());
    }
}
