//! `kvctl bench`: YCSB-style load against kvfleet, Redis or etcd through one harness, with a
//! progress bar, latency percentiles and verification of what it reads.

pub mod target;
pub mod workload;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::builder::TypedValueParser as _;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use kvfleet_client::BundleConfig;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use target::{Connection, TargetSpec};
use workload::{Distribution, KeyChooser, Workload, make_value, record_key, verify_value};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "a")]
    pub workload: Workload,
    #[arg(long, value_enum, default_value = "uniform")]
    pub distribution: Distribution,
    /// Records loaded before the run and chosen from during it.
    #[arg(long, default_value_t = 10_000)]
    pub records: u64,
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// TCP connections to each server, shared by the clients (default: one per client).
    #[arg(long)]
    pub connections: Option<usize>,
    /// Length of the run phase, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Stop after this many operations even if time remains.
    #[arg(long)]
    pub max_ops: Option<u64>,
    /// kvfleet (the cluster at --endpoints), redis://host:port or etcd://host:port.
    #[arg(long, default_value = "kvfleet")]
    pub target: TargetSpec,
    /// Do not load records first (they are already there).
    #[arg(long)]
    pub skip_load: bool,
    #[arg(long, default_value = "user")]
    pub key_prefix: String,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// How kvfleet reads: at the leader (linearizable), at any replica after a read index
    /// (follower), or at any replica within --max-staleness-ms (stale).
    #[arg(long, value_enum, default_value = "linearizable")]
    pub read_consistency: ReadConsistencyArg,
    /// The bound of --read-consistency stale, in milliseconds (1 to 60000).
    #[arg(long, default_value_t = 1000)]
    pub max_staleness_ms: u64,
    /// kvfleet: most requests one call to a node carries; the client bundles the requests its
    /// clients send a node while its calls are busy (1: every request in its own call).
    #[arg(long, default_value_t = BundleConfig::default().max_requests, value_parser = clap::value_parser!(u16).range(1..=1024).map(usize::from))]
    pub bundle_max_requests: usize,
    /// kvfleet: calls in flight to one node at once.
    #[arg(long, default_value_t = BundleConfig::default().max_in_flight, value_parser = clap::value_parser!(u16).range(1..=1024).map(usize::from))]
    pub bundle_in_flight: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadConsistencyArg {
    Linearizable,
    Follower,
    Stale,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl LatencySummary {
    fn of(histogram: &Histogram<u64>) -> Self {
        LatencySummary {
            count: histogram.len(),
            p50_us: histogram.value_at_quantile(0.50),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            mean_us: histogram.mean(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub target: String,
    /// How kvfleet read: "linearizable", "follower" or "stale (<bound> ms)" ("the server's own"
    /// for Redis and etcd).
    pub read_consistency: String,
    pub workload: Workload,
    pub distribution: Distribution,
    pub records: u64,
    pub value_size: usize,
    pub concurrency: usize,
    pub connections: usize,
    pub load_seconds: Option<f64>,
    pub load_ops_per_sec: Option<f64>,
    pub run_seconds: f64,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub errors: u64,
    pub verify_failures: u64,
    pub first_problem: Option<String>,
    pub reads: LatencySummary,
    pub updates: LatencySummary,
    pub all: LatencySummary,
}

#[derive(Default)]
struct Shared {
    ops: AtomicU64,
    errors: AtomicU64,
    verify_failures: AtomicU64,
    first_problem: parking_lot::Mutex<Option<String>>,
}

impl Shared {
    fn problem(&self, counter: &AtomicU64, message: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_problem.lock();
        if first.is_none() {
            *first = Some(message);
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

fn progress(quiet: bool, length: u64, template: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(length).with_style(style)
}

pub async fn run(args: &BenchArgs, endpoints: &[String], deadline: Duration) -> Result<BenchReport, String> {
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    let chooser = Arc::new(KeyChooser::new(args.distribution, args.records)?);
    let connection_count = args.connections.unwrap_or(args.concurrency).clamp(1, args.concurrency);
    let read_choice = match args.read_consistency {
        ReadConsistencyArg::Linearizable => target::ReadChoice::Linearizable,
        ReadConsistencyArg::Follower => target::ReadChoice::Follower,
        ReadConsistencyArg::Stale if (1..=60_000).contains(&args.max_staleness_ms) => {
            target::ReadChoice::Stale(Duration::from_millis(args.max_staleness_ms))
        }
        ReadConsistencyArg::Stale => {
            return Err(format!("--max-staleness-ms must be from 1 to 60000, got {}", args.max_staleness_ms));
        }
    };
    let bundling = BundleConfig { max_requests: args.bundle_max_requests, max_in_flight: args.bundle_in_flight };
    let connections =
        Connection::open_all(&args.target, endpoints, deadline, connection_count, read_choice, bundling).await?;

    let (load_seconds, load_ops_per_sec) = if args.skip_load {
        (None, None)
    } else {
        let seconds = load(args, &connections).await?;
        (Some(seconds), Some(args.records as f64 / seconds))
    };

    let shared = Arc::new(Shared::default());
    let bar = progress(args.quiet, args.duration, "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len}s {msg}");
    bar.set_prefix(format!("bench {:?} {:?}", args.workload, args.distribution));
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(args.duration);
    let mut workers = Vec::with_capacity(args.concurrency);
    for worker in 0..args.concurrency {
        let connection = connections[worker % connections.len()].clone();
        workers.push(tokio::spawn(run_worker(
            worker,
            connection,
            args.clone(),
            chooser.clone(),
            shared.clone(),
            stop_at,
        )));
    }
    let ticker = {
        let (bar, shared) = (bar.clone(), shared.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let elapsed = started.elapsed().as_secs_f64();
                let ops = shared.ops.load(Ordering::Relaxed);
                bar.set_position(elapsed as u64);
                bar.set_message(format!(
                    "{:.0} ops/s, {} errors",
                    ops as f64 / elapsed.max(1e-3),
                    shared.errors.load(Ordering::Relaxed)
                ));
            }
        })
    };
    let (mut reads, mut updates) = (new_histogram(), new_histogram());
    for worker in workers {
        let (r, u) = worker.await.map_err(|e| format!("bench worker failed: {e}"))?;
        reads.add(&r).map_err(|e| e.to_string())?;
        updates.add(&u).map_err(|e| e.to_string())?;
    }
    let run_seconds = started.elapsed().as_secs_f64();
    ticker.abort();
    bar.finish_and_clear();
    let mut all = reads.clone();
    all.add(&updates).map_err(|e| e.to_string())?;
    let ops = shared.ops.load(Ordering::Relaxed);
    let first_problem = shared.first_problem.lock().clone();
    Ok(BenchReport {
        target: args.target.to_string(),
        read_consistency: match read_choice {
            _ if args.target != TargetSpec::Kvfleet => "the server's own".into(),
            target::ReadChoice::Linearizable => "linearizable".into(),
            target::ReadChoice::Follower => "follower".into(),
            target::ReadChoice::Stale(bound) => format!("stale ({} ms)", bound.as_millis()),
        },
        workload: args.workload,
        distribution: args.distribution,
        records: args.records,
        value_size: args.value_size,
        concurrency: args.concurrency,
        connections: connection_count,
        load_seconds,
        load_ops_per_sec,
        run_seconds,
        ops,
        ops_per_sec: ops as f64 / run_seconds,
        errors: shared.errors.load(Ordering::Relaxed),
        verify_failures: shared.verify_failures.load(Ordering::Relaxed),
        first_problem,
        reads: LatencySummary::of(&reads),
        updates: LatencySummary::of(&updates),
        all: LatencySummary::of(&all),
    })
}

/// Writes every record at version 0, `concurrency` writers at a time.
async fn load(args: &BenchArgs, connections: &[Connection]) -> Result<f64, String> {
    let bar = progress(args.quiet, args.records, "load [{elapsed_precise}] {wide_bar} {pos}/{len} records ({per_sec})");
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut writers: Vec<tokio::task::JoinHandle<Result<(), String>>> = Vec::new();
    for worker in 0..args.concurrency {
        let mut connection = connections[worker % connections.len()].clone();
        let (next, bar, args) = (next.clone(), bar.clone(), args.clone());
        writers.push(tokio::spawn(async move {
            loop {
                let record = next.fetch_add(1, Ordering::Relaxed);
                if record >= args.records {
                    return Ok(());
                }
                let key = record_key(&args.key_prefix, record);
                let value = make_value(&key, 0, args.value_size);
                connection.put(&key, value).await.map_err(|e| format!("loading record {record}: {e}"))?;
                bar.inc(1);
            }
        }));
    }
    for writer in writers {
        writer.await.map_err(|e| format!("load worker failed: {e}"))??;
    }
    bar.finish_and_clear();
    Ok(started.elapsed().as_secs_f64().max(1e-9))
}

async fn run_worker(
    worker: usize,
    mut connection: Connection,
    args: BenchArgs,
    chooser: Arc<KeyChooser>,
    shared: Arc<Shared>,
    stop_at: Instant,
) -> (Histogram<u64>, Histogram<u64>) {
    let mut rng = SmallRng::seed_from_u64(0x5eed ^ worker as u64);
    let (mut reads, mut updates) = (new_histogram(), new_histogram());
    // Versions unique across workers: the worker in the top bits, a counter below.
    let mut version = ((worker as u64) + 1) << 40;
    let read_fraction = args.workload.read_fraction();
    while Instant::now() < stop_at {
        if args.max_ops.is_some_and(|max| shared.ops.load(Ordering::Relaxed) >= max) {
            break;
        }
        let key = record_key(&args.key_prefix, chooser.next(&mut rng));
        let is_read = rng.random_bool(read_fraction);
        let started = Instant::now();
        let outcome = if is_read {
            connection.get(&key).await.map(Some)
        } else {
            version += 1;
            connection.put(&key, make_value(&key, version, args.value_size)).await.map(|()| None)
        };
        let micros = (started.elapsed().as_micros() as u64).max(1);
        shared.ops.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Err(error) => shared.problem(&shared.errors, error),
            Ok(None) => {
                let _ = updates.record(micros);
            }
            Ok(Some(value)) => {
                let _ = reads.record(micros);
                check_read(&args, &key, value.as_deref(), &shared);
            }
        }
    }
    (reads, updates)
}

fn check_read(args: &BenchArgs, key: &[u8], value: Option<&[u8]>, shared: &Shared) {
    let key_text = String::from_utf8_lossy(key);
    match value {
        None if !args.skip_load => {
            shared.problem(&shared.verify_failures, format!("{key_text}: loaded record not found"));
        }
        None => {}
        Some(value) => match verify_value(key, value) {
            Err(problem) => shared.problem(&shared.verify_failures, format!("{key_text}: {problem}")),
            Ok(version) if args.workload == Workload::C && !args.skip_load && version != 0 => {
                shared.problem(&shared.verify_failures, format!("{key_text}: read-only run found version {version}"));
            }
            Ok(_) => {}
        },
    }
}
