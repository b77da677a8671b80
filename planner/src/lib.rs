//! Load -> plan -> action: kvfleet's resharding planner. Given the range map, each range's load
//! and the policy, it decides which ranges to split, move and merge, and says why for every
//! decision it does not take. Pure: no Kubernetes, no I/O, no clock (the caller passes `now`).
//!
//! Where things live: `model` (what the planner sees and decides: views, actions, reasons),
//! `policy` (thresholds and their defaults), `split` (size, load and hot-key splits),
//! `balance` (moves by load and size, drains), `merge` (cold neighbours), `sim` (a deterministic
//! cluster simulator for tests and benchmarks).

pub mod balance;
pub mod merge;
pub mod model;
pub mod policy;
pub mod sim;
pub mod split;

use std::collections::{HashMap, HashSet};

pub use model::*;
pub use policy::{Bounds, Knob, Policy, PolicyError, Surface, Unit};

/// What the planner remembers between rounds: since when each range has been hot or cold.
/// Keyed by range id; forgotten when a range disappears.
#[derive(Debug, Default, Clone)]
pub struct Memory {
    hot_since: HashMap<RangeId, u64>,
    cold_since: HashMap<RangeId, u64>,
}

/// The planner: a policy and the memory of sustained conditions.
#[derive(Debug, Clone)]
pub struct Planner {
    pub policy: Policy,
    memory: Memory,
}

impl Planner {
    pub fn new(policy: Policy) -> Self {
        Planner { policy, memory: Memory::default() }
    }

    /// One planning round at time `now` (seconds, from the caller's clock).
    pub fn plan(&mut self, view: &ClusterView, now: u64) -> Plan {
        let mut plan = Plan::default();
        let busy: HashSet<RangeId> = view.in_flight.iter().flat_map(Action::ranges).collect();
        self.remember(view, now);

        split::plan_splits(view, &self.policy, &self.memory, now, &busy, &mut plan);
        let mut touched: HashSet<RangeId> = busy.clone();
        touched.extend(plan.actions.iter().flat_map(Action::ranges));

        let moves_in_flight = view.in_flight.iter().filter(|a| matches!(a, Action::Move { .. })).count();
        let mut budget = self.policy.max_concurrent_moves.saturating_sub(moves_in_flight);
        merge::plan_merges(view, &self.policy, &self.memory, now, &mut touched, &mut budget, &mut plan);
        balance::plan_moves(view, &self.policy, now, &mut touched, &mut budget, &mut plan);
        plan
    }

    fn remember(&mut self, view: &ClusterView, now: u64) {
        let live: HashSet<RangeId> = view.ranges.iter().map(|r| r.id).collect();
        self.memory.hot_since.retain(|id, _| live.contains(id));
        self.memory.cold_since.retain(|id, _| live.contains(id));
        for range in &view.ranges {
            if split::is_hot(range, &self.policy) {
                self.memory.hot_since.entry(range.id).or_insert(now);
            } else {
                self.memory.hot_since.remove(&range.id);
            }
            if merge::is_cold(range, &self.policy) {
                self.memory.cold_since.entry(range.id).or_insert(now);
            } else {
                self.memory.cold_since.remove(&range.id);
            }
        }
    }
}

impl Memory {
    pub fn hot_since(&self, range: RangeId) -> Option<u64> {
        self.hot_since.get(&range).copied()
    }

    pub fn cold_since(&self, range: RangeId) -> Option<u64> {
        self.cold_since.get(&range).copied()
    }
}
