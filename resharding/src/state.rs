//! What the controller persists between restarts: range and move id allocation, when ranges
//! split and moved (the planner's merge delays and cooldowns), and the moves in flight. Everything
//! else is rebuilt from what the nodes persist.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// The clock of every time the state records (Unix time).
pub fn unix_now() -> std::time::Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReshardingState {
    /// The next id to give a range created by a split or merge. Persisted before the ids are
    /// used, so a restart never hands out an id twice.
    pub next_range_id: u64,
    pub next_move_id: u64,
    /// Range id -> when (Unix seconds) a split created it.
    #[serde(default)]
    pub split_at: BTreeMap<u64, u64>,
    /// Range id -> when it last moved between nodes.
    #[serde(default)]
    pub moved_at: BTreeMap<u64, u64>,
    /// Moves started and not yet finished or rolled back.
    #[serde(default)]
    pub moves: Vec<InFlightMove>,
    /// Range 1 was created (or some node was seen holding a range): never bootstrap again, even
    /// if every node later reports nothing (that is lost data, not a new fleet).
    #[serde(default)]
    pub bootstrapped: bool,
    /// The nodes a replicated range 1 is created on (node id, address), recorded before the
    /// first is asked ...
    #[serde(default)]
    pub bootstrap_replicas: Vec<(String, String)>,
    /// ... and the node ids of those that have not answered yet: every one must create it, or
    /// the range cannot elect a leader. Nothing is planned until none is left.
    #[serde(default)]
    pub bootstrap_pending: Vec<String>,
    /// The replicas per range this fleet was created with (None: created before this was
    /// recorded; the loop takes the most replicas any range has).
    #[serde(default)]
    pub replication_factor: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InFlightMove {
    pub move_id: u64,
    pub range_id: u64,
    /// The range's generation when the move started; the target owns it at `generation + 1`.
    pub generation: u64,
    /// Node ids.
    pub from: String,
    pub to: String,
    pub reason: String,
    pub started_unix_ms: u64,
}

impl ReshardingState {
    /// A block of `count` fresh range ids; the caller persists the state before using them.
    pub fn allocate_range_ids(&mut self, count: u64) -> u64 {
        let first = self.next_range_id.max(1);
        self.next_range_id = first + count;
        first
    }

    pub fn allocate_move_id(&mut self) -> u64 {
        let id = self.next_move_id.max(1);
        self.next_move_id = id + 1;
        id
    }

    /// Never allocate a range id at or below one already seen on a node (the state file may be
    /// older than the nodes, or gone). Move ids live in the state only.
    pub fn observe_range_ids(&mut self, max_range_id: u64) {
        self.next_range_id = self.next_range_id.max(max_range_id + 1);
    }

    /// Drops the history of ranges that no longer exist.
    pub fn forget_ranges_except(&mut self, live: &HashSet<u64>) {
        self.split_at.retain(|id, _| live.contains(id));
        self.moved_at.retain(|id, _| live.contains(id));
    }

    pub fn move_by_id(&self, move_id: u64) -> Option<&InFlightMove> {
        self.moves.iter().find(|m| m.move_id == move_id)
    }

    pub fn finish_move(&mut self, move_id: u64) -> Option<InFlightMove> {
        let index = self.moves.iter().position(|m| m.move_id == move_id)?;
        Some(self.moves.remove(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_never_go_backwards_and_never_reuse_what_nodes_hold() {
        let mut state = ReshardingState::default();
        assert_eq!(state.allocate_range_ids(2), 1);
        assert_eq!(state.next_range_id, 3);
        state.observe_range_ids(10);
        assert_eq!(state.allocate_range_ids(2), 11);
        assert_eq!(state.allocate_move_id(), 1);
        state.observe_range_ids(3);
        assert_eq!(state.allocate_range_ids(1), 13);
        assert_eq!(state.allocate_move_id(), 2);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut state = ReshardingState { next_range_id: 7, next_move_id: 3, ..Default::default() };
        state.split_at.insert(5, 100);
        state.moves.push(InFlightMove {
            move_id: 2,
            range_id: 5,
            generation: 4,
            from: "n1".into(),
            to: "n2".into(),
            reason: "balance".into(),
            started_unix_ms: 1,
        });
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<ReshardingState>(&json).unwrap(), state);
    }

    #[test]
    fn a_state_saved_before_every_move_was_a_membership_change_still_loads() {
        // Its moves in flight name their kind (`replica`); each is resumed as a replica move.
        let json = r#"{"nextRangeId":7,"nextMoveId":3,"moves":[{"moveId":2,"rangeId":5,"generation":4,
            "from":"n1","to":"n2","reason":"balance","startedUnixMs":1,"replica":false}]}"#;
        let state: ReshardingState = serde_json::from_str(json).unwrap();
        assert_eq!((state.moves[0].move_id, state.moves[0].from.as_str()), (2, "n1"));
    }
}
