//! Prometheus metrics of the node, and the HTTP endpoint that serves them.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The data and admin operations, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Get,
    Put,
    Delete,
    Scan,
    Batch,
    Split,
    Merge,
}

impl Op {
    const ALL: [Op; 7] = [Op::Get, Op::Put, Op::Delete, Op::Scan, Op::Batch, Op::Split, Op::Merge];

    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Delete => "delete",
            Op::Scan => "scan",
            Op::Batch => "batch",
            Op::Split => "split",
            Op::Merge => "merge",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    op: &'static str,
    code: String,
}

/// Handles resolved once at start-up so that recording on the hot path is a few atomic adds.
#[derive(Clone)]
struct OpHandles {
    ok: Counter,
    latency: Histogram,
}

#[derive(Clone)]
pub struct NodeMetrics {
    ops: Arc<[OpHandles; 7]>,
    outcomes: Family<OutcomeLabels, Counter>,
    pub ranges: Gauge,
    pub not_owner: Counter,
    pub forwarded: Counter,
    pub storage: StorageMetrics,
    pub fast_ack: crate::replica::fast_ack::FastAckMetrics,
}

/// Metrics of the write pipeline (group commit and fsyncs).
#[derive(Clone)]
pub struct StorageMetrics {
    group_size: Histogram,
    commit_seconds: Histogram,
    fsyncs: Counter,
    background_fsync_seconds: Histogram,
}

impl StorageMetrics {
    pub fn observe_commit(&self, writes: usize, took: Duration, fsynced: bool) {
        self.group_size.observe(writes as f64);
        self.commit_seconds.observe(took.as_secs_f64());
        if fsynced {
            self.fsyncs.inc();
        }
    }

    pub fn observe_background_fsync(&self, took: Duration) {
        self.background_fsync_seconds.observe(took.as_secs_f64());
        self.fsyncs.inc();
    }
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~42 s
    Histogram::new(exponential_buckets(1e-5, 2.0, 22))
}

impl NodeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let latency = Family::<OpLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        let ops = Op::ALL.map(|op| OpHandles {
            ok: outcomes.get_or_create_owned(&OutcomeLabels { op: op.name(), code: "ok".into() }),
            latency: latency.get_or_create_owned(&OpLabels { op: op.name() }),
        });
        registry.register("kvfleet_requests", "Requests by operation and outcome (gRPC code)", outcomes.clone());
        registry.register("kvfleet_request_duration_seconds", "Time to serve a request", latency);
        let ranges = Gauge::default();
        registry.register("kvfleet_ranges", "Ranges this node owns", ranges.clone());
        let not_owner = Counter::default();
        registry.register("kvfleet_not_owner", "Requests answered with NotOwner", not_owner.clone());
        let forwarded = Counter::default();
        registry.register("kvfleet_forwarded", "Requests forwarded one hop to the owner", forwarded.clone());

        let storage = StorageMetrics {
            group_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            commit_seconds: latency_histogram(),
            fsyncs: Counter::default(),
            background_fsync_seconds: latency_histogram(),
        };
        registry.register(
            "kvfleet_commit_group_size",
            "Writes committed together (one WriteBatch, at most one fsync)",
            storage.group_size.clone(),
        );
        registry.register(
            "kvfleet_commit_duration_seconds",
            "Time to commit one group, fsync included",
            storage.commit_seconds.clone(),
        );
        registry.register(
            "kvfleet_wal_fsyncs",
            "WAL fsyncs (group commits in sync mode, background syncs in async mode)",
            storage.fsyncs.clone(),
        );
        registry.register(
            "kvfleet_background_fsync_duration_seconds",
            "Duration of background WAL fsyncs (async mode)",
            storage.background_fsync_seconds.clone(),
        );

        let fast_ack =
            crate::replica::fast_ack::FastAckMetrics { unreplicated: latency_histogram(), lost: Counter::default() };
        registry.register(
            "kvfleet_fast_ack_unreplicated_seconds",
            "Replicated writes acknowledged early (fast durability): time from the acknowledgement to the \
             leader applying it (a majority held it by then), during which the leader's loss would lose it",
            fast_ack.unreplicated.clone(),
        );
        registry.register(
            "kvfleet_fast_ack_lost",
            "Replicated writes acknowledged early (fast durability) that another leader's log replaced: lost",
            fast_ack.lost.clone(),
        );

        NodeMetrics { ops: Arc::new(ops), outcomes, ranges, not_owner, forwarded, storage, fast_ack }
    }

    pub fn observe(&self, op: Op, took: Duration, code: Option<tonic::Code>) {
        let handles = &self.ops[op as usize];
        handles.latency.observe(took.as_secs_f64());
        match code {
            None => {
                handles.ok.inc();
            }
            Some(code) => {
                self.outcomes.get_or_create(&OutcomeLabels { op: op.name(), code: format!("{code:?}") }).inc();
            }
        }
    }
}
