//! kvfleet-operator: kvfleet on Kubernetes (the KeyValueCluster resource, its reconciler, the
//! Kubernetes platform of the resharding loop) and the local playground, around the resharding
//! loop of `kvfleet-resharding`.
//!
//! Where things live: `k8s` (the resource, the reconciler, the Kubernetes platform, leader
//! election), `playground` (node processes on loopback, the resharding loop and a live view;
//! `playground::local` is the local platform), `policy` (the planner's knobs as command-line
//! flags), `cli` (the commands), `error`. Nothing outside `k8s` speaks to Kubernetes; `cli`
//! depends on the others and nothing depends on `cli`.

pub mod cli;
pub mod error;
pub mod k8s;
pub mod playground;
pub mod policy;
