//! kvfleet's resharding loop, apart from any platform: collect load from the nodes -> recover
//! moves a crash left in flight -> plan (`kvfleet-planner`) -> execute splits, merges and moves
//! through the nodes' admin API -> persist -> report status. No Kubernetes, no command line.
//!
//! Where things live: `resharding_loop` (the rounds), `observe` (what the nodes report, and the
//! planner's view built from it), `replica_moves` and `replica_merges` (a range's moves, as
//! membership changes, and merges, step by step), `platform` (the trait a platform implements: which nodes exist, where the state is saved), `state` (what
//! the loop persists), `fleet` (the typed fleet view the loop exports), `status` (the status API,
//! metrics and events), `leadership` (whether this loop may act, and its epoch).

pub mod fleet;
pub mod leadership;
pub mod observe;
pub mod platform;
pub mod replica_merges;
pub mod replica_moves;
pub mod resharding_loop;
pub mod state;
pub mod status;

pub use platform::{Member, Platform, PlatformError};
pub use resharding_loop::{LoopConfig, LoopError, ReshardingLoop};
pub use state::{InFlightMove, ReshardingState, unix_now};
