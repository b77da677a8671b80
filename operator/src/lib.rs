//! kvfleet-operator: the controller that reshards a fleet of kvfleet nodes, the platforms it runs
//! on, and the local playground.
//!
//! Where things live: `controller` (load -> plan -> action: collect from nodes, run the
//! planner of `kvfleet-planner`, execute splits, merges and moves, persist, report status),
//! `platform` (where nodes run: `local` processes on loopback), `k8s` (the KeyValueCluster
//! resource, its reconciler and the Kubernetes platform), `policy` (the planner's thresholds as
//! command-line flags), `playground` (local fleet + controller + live view), `cli`.

pub mod cli;
pub mod controller;
pub mod k8s;
pub mod platform;
pub mod playground;
pub mod policy;
