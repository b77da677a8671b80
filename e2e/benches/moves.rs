//! Resharding costs on real processes (two `kvfleet-node`s on loopback, release build):
//! - split and merge latency (metadata only, one fsync each);
//! - online move throughput, to compare with RocksDB's own ingest and scan speed
//!   (`cargo bench -p kvfleet-node --bench rocksdb_baseline`);
//! - the write-freeze window of each move, for ranges of 10 MB and 1 GB, under 4 concurrent
//!   writers into the moving range.
//!
//! Moves are driven by the controller's own code (`kvfleet_resharding::moves::drive`).
//! Run: `cargo build --release --bins && cargo bench -p kvfleet-e2e --bench moves`
//! Knobs: MOVE_SIZES_MB (default "10,1024"), MOVES (per size; default 20 up to 100 MB, else 4),
//! SPLITS (default 50).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_e2e::{NodeProcess, client_for};
use kvfleet_proto::v1::{ListRangesRequest, MergeRangesRequest, Mutation, RangeDescriptor, SplitRangeRequest};
use kvfleet_resharding::moves::{MoveTimeouts, drive};
use kvfleet_resharding::observe::NodeClients;
use kvfleet_resharding::platform::Member;
use kvfleet_resharding::state::InFlightMove;
use rand::RngCore;

const VALUE_BYTES: usize = 1000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn key(i: u64) -> Bytes {
    Bytes::from(format!("k{i:013}"))
}

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn member(node: &NodeProcess) -> Member {
    Member::at(&node.node_id, &node.address)
}

async fn range_one(node: &NodeProcess) -> Option<RangeDescriptor> {
    let ranges = node.admin().list_ranges(ListRangesRequest {}).await.ok()?.into_inner().ranges;
    ranges.into_iter().find(|r| r.range_id == 1)
}

async fn load(client: &kvfleet_client::Client, pairs: u64) {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (client, next) = (client.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let first = next.fetch_add(256, Ordering::Relaxed);
                    if first >= pairs {
                        return;
                    }
                    // Random (incompressible) values: LZ4 must not make the copy look cheap.
                    let mutations: Vec<Mutation> = {
                        let mut rng = rand::rng();
                        (first..(first + 256).min(pairs))
                            .map(|i| {
                                let mut value = vec![0u8; VALUE_BYTES];
                                rng.fill_bytes(&mut value);
                                Mutation {
                                    op: kvfleet_proto::v1::mutation::Op::Put as i32,
                                    key: key(i),
                                    value: Bytes::from(value),
                                }
                            })
                            .collect()
                    };
                    client.batch(mutations).await.expect("load batch");
                    if first % (pairs / 10).max(256) < 256 {
                        eprintln!("  loaded {:.0}%", 100.0 * first as f64 / pairs as f64);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("loader");
    }
    let mb = pairs as f64 * (VALUE_BYTES + 14) as f64 / 1e6;
    eprintln!("  loaded {mb:.0} MB in {:.1} s", started.elapsed().as_secs_f64());
}

/// Writers updating random keys of the range until stopped; each returns how many writes
/// succeeded and its slowest write (what the freeze cost a client, retries included).
fn writers(
    client: &kvfleet_client::Client,
    pairs: u64,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(u64, Duration)>> {
    (0..4u64)
        .map(|w| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut done, mut slowest) = (0, Duration::ZERO);
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    i = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let started = Instant::now();
                    client
                        .put(key(i % pairs.max(1)), Bytes::from(vec![b'w'; VALUE_BYTES]))
                        .await
                        .expect("write during a move");
                    slowest = slowest.max(started.elapsed());
                    done += 1;
                }
                (done, slowest)
            })
        })
        .collect()
}

async fn bench_size(megabytes: u64, moves: usize, splits: usize) {
    let pairs = megabytes * 1024 * 1024 / (VALUE_BYTES as u64 + 14);
    eprintln!("range of {megabytes} MB ({pairs} pairs):");
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let nodes = [NodeProcess::start("n1", d1.path(), &["--bootstrap"]), NodeProcess::start("n2", d2.path(), &[])];
    let client = client_for(&[&nodes[0], &nodes[1]]);
    load(&client, pairs).await;

    let (mut copy_mbps, mut freeze_ms, mut copy_secs) = (Vec::new(), Vec::new(), Vec::new());
    let mut slowest_write_ms = Vec::new();
    let mut writes = 0;
    let mut from = 0;
    for move_id in 1..=moves as u64 {
        let to = 1 - from;
        let desc = range_one(&nodes[from]).await.expect("range 1 on the source");
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = writers(&client, pairs, &stop);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mv = InFlightMove {
            move_id,
            range_id: 1,
            generation: desc.generation,
            from: nodes[from].node_id.clone(),
            to: nodes[to].node_id.clone(),
            reason: "benchmark".into(),
            started_unix_ms: 0,
            replica: false,
        };
        let timeouts = MoveTimeouts { import: Duration::from_secs(3600), step: Duration::from_secs(30) };
        let report = drive(NodeClients::default(), mv, desc, member(&nodes[from]), member(&nodes[to]), timeouts)
            .await
            .expect("move");
        stop.store(true, Ordering::Relaxed);
        let mut slowest = Duration::ZERO;
        for task in tasks {
            let (done, slow) = task.await.expect("writer");
            writes += done;
            slowest = slowest.max(slow);
        }
        slowest_write_ms.push(slowest.as_secs_f64() * 1e3);
        let mb = report.bytes_copied as f64 / 1e6;
        copy_mbps.push(mb / report.copy.as_secs_f64());
        copy_secs.push(report.copy.as_secs_f64());
        freeze_ms.push(report.freeze.as_secs_f64() * 1e3);
        eprintln!(
            "  move {move_id}: {mb:.0} MB copied in {:.2} s ({:.0} MB/s), writes frozen {:.1} ms, slowest write {:.1} ms",
            report.copy.as_secs_f64(),
            mb / report.copy.as_secs_f64(),
            report.freeze.as_secs_f64() * 1e3,
            slowest_write_ms.last().copied().unwrap_or_default()
        );
        from = to;
    }

    // Splits and merges of the (now large) range on its owner: metadata only.
    let owner = &nodes[from];
    let (mut split_ms, mut merge_ms) = (Vec::new(), Vec::new());
    let mut current = 1u64;
    let mut next_id = 1000u64;
    for j in 0..splits as u64 {
        let at = key(pairs * (j % 9 + 1) / 10);
        let started = Instant::now();
        let split = SplitRangeRequest {
            range_id: current,
            expected_generation: 0,
            split_key: at,
            left_id: next_id,
            right_id: next_id + 1,
        };
        owner.admin().split_range(split).await.expect("split");
        split_ms.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let merge = MergeRangesRequest {
            left_id: next_id,
            right_id: next_id + 1,
            expected_left_generation: 0,
            expected_right_generation: 0,
            merged_id: next_id + 2,
        };
        owner.admin().merge_ranges(merge).await.expect("merge");
        merge_ms.push(started.elapsed().as_secs_f64() * 1e3);
        current = next_id + 2;
        next_id += 3;
    }

    println!(
        "| {megabytes} MB | {moves} | {:.0} / {:.0} | {:.2} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} | {writes} | {:.2} / {:.2} | {:.2} / {:.2} |",
        percentile(&copy_mbps, 0.5),
        percentile(&copy_mbps, 0.0),
        percentile(&copy_secs, 0.5),
        percentile(&freeze_ms, 0.5),
        percentile(&freeze_ms, 0.99),
        percentile(&freeze_ms, 1.0),
        percentile(&slowest_write_ms, 0.5),
        percentile(&slowest_write_ms, 1.0),
        percentile(&split_ms, 0.5),
        percentile(&split_ms, 0.99),
        percentile(&merge_ms, 0.5),
        percentile(&merge_ms, 0.99),
    );
}

fn main() {
    let sizes: Vec<u64> = std::env::var("MOVE_SIZES_MB")
        .unwrap_or_else(|_| "10,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let splits = env_or("SPLITS", 50usize);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!(
        "| range | moves | copy MB/s p50 / min | copy s p50 | freeze ms p50 / p99 / max | slowest write ms p50 / max | writes during moves | split ms p50 / p99 | merge ms p50 / p99 |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for megabytes in sizes {
        let moves = env_or("MOVES", if megabytes <= 100 { 20 } else { 4 });
        runtime.block_on(bench_size(megabytes, moves, splits));
    }
}
