//! Resharding costs on real processes (two `kvfleet-node`s on loopback, release build):
//! - split and merge latency (metadata only, through the range's log);
//! - a single copy's move (a membership change: the target added as a learner and caught up
//!   by a snapshot of the range, then swapped in by one joint change), for ranges of 10 MB and
//!   1 GB: its duration, and what 4 concurrent writers into the moving range see meanwhile
//!   (p99 and slowest write; no write waits on the move).
//!
//! Moves are driven by the controller's own code (`kvfleet_resharding::replica_moves`).
//! Run: `cargo build --release --bins && cargo bench -p kvfleet-e2e --bench moves`
//! Knobs: MOVE_SIZES_MB (default "10,1024"), MOVES (per size; default 20 up to 100 MB, else 4),
//! SPLITS (default 50).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_e2e::{NodeProcess, client_for};
use kvfleet_proto::v1::{MergeRangesRequest, Mutation, SplitRangeRequest};
use kvfleet_resharding::observe::NodeClients;
use kvfleet_resharding::replica_moves::{Endpoint, move_replica};
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

fn endpoint(node: &NodeProcess) -> Endpoint {
    Endpoint { node_id: node.node_id.clone(), address: node.address.clone() }
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

/// Writers updating random keys of the range until stopped; each returns the latency of every
/// write it made (retries included), in milliseconds.
fn writers(
    client: &kvfleet_client::Client,
    pairs: u64,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<f64>>> {
    (0..4u64)
        .map(|w| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    i = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let started = Instant::now();
                    client
                        .put(key(i % pairs.max(1)), Bytes::from(vec![b'w'; VALUE_BYTES]))
                        .await
                        .expect("write during a move");
                    latencies.push(started.elapsed().as_secs_f64() * 1e3);
                }
                latencies
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

    let (mut move_secs, mut write_p99_ms, mut slowest_write_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut writes = 0;
    let mut from = 0;
    let seeds: Vec<String> = nodes.iter().map(|n| n.address.clone()).collect();
    for number in 1..=moves {
        let to = 1 - from;
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = writers(&client, pairs, &stop);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let (source, target) = (endpoint(&nodes[from]), endpoint(&nodes[to]));
        move_replica(&NodeClients::default(), 1, &seeds, &source, &target, Duration::from_secs(3600))
            .await
            .expect("move");
        let took = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.expect("writer"));
        }
        writes += latencies.len();
        move_secs.push(took);
        write_p99_ms.push(percentile(&latencies, 0.99));
        slowest_write_ms.push(percentile(&latencies, 1.0));
        eprintln!(
            "  move {number}: {megabytes} MB moved in {took:.2} s ({:.0} MB/s); {} writes meanwhile, p99 {:.1} ms, slowest {:.1} ms",
            megabytes as f64 / took,
            latencies.len(),
            write_p99_ms.last().copied().unwrap_or_default(),
            slowest_write_ms.last().copied().unwrap_or_default()
        );
        from = to;
    }

    // Splits and merges of the (now large) range on its owner: metadata only.
    let owner = &nodes[from];
    let (mut split_ms, mut merge_ms) = (Vec::new(), Vec::new());
    for j in 0..splits as u64 {
        let at = key(pairs * (j % 9 + 1) / 10);
        let started = Instant::now();
        let split = SplitRangeRequest { range_id: 1, expected_generation: 0, split_key: at, right_id: 1000 + j };
        owner.admin().split_range(split).await.expect("split");
        split_ms.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let merge = MergeRangesRequest { left_id: 1, right_id: 1000 + j, ..Default::default() };
        owner.admin().merge_ranges(merge).await.expect("merge");
        merge_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }

    println!(
        "| {megabytes} MB | {moves} | {:.2} / {:.2} | {:.0} | {:.1} / {:.1} | {:.1} / {:.1} | {writes} | {:.2} / {:.2} | {:.2} / {:.2} |",
        percentile(&move_secs, 0.5),
        percentile(&move_secs, 1.0),
        megabytes as f64 / percentile(&move_secs, 0.5),
        percentile(&write_p99_ms, 0.5),
        percentile(&write_p99_ms, 1.0),
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
        "| range | moves | move s p50 / max | MB/s p50 | write p99 ms during a move, p50 / max | slowest write ms p50 / max | writes during moves | split ms p50 / p99 | merge ms p50 / p99 |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for megabytes in sizes {
        let moves = env_or("MOVES", if megabytes <= 100 { 20 } else { 4 });
        runtime.block_on(bench_size(megabytes, moves, splits));
    }
}
