//! The ceiling for online moves on this machine: how fast this node's storage layer ingests a
//! range's pairs (write batches of 1,024 pairs into the WAL without fsync, as a move's target
//! does) and streams them out of a snapshot (as a move's source does). Run:
//! `cargo bench -p kvfleet-node --bench rocksdb_baseline` (BASELINE_MB=1024 by default).

use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_node::config::Durability;
use kvfleet_node::metrics::NodeMetrics;
use kvfleet_node::storage::{Storage, WriteOp};
use prometheus_client::registry::Registry;
use rand::RngCore;

const VALUE_BYTES: usize = 1000;
const CHUNK_PAIRS: usize = 1024;

fn main() {
    let megabytes: usize = std::env::var("BASELINE_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let pairs = megabytes * 1024 * 1024 / (VALUE_BYTES + 14);
    let dir = tempfile::tempdir().expect("temporary directory");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let metrics = NodeMetrics::new(&mut Registry::default()).storage;
    let storage = Storage::open(dir.path(), Durability::Sync, Duration::from_secs(1), 4096, metrics).expect("open");
    let mut rng = rand::rng();

    let started = Instant::now();
    let mut bytes = 0usize;
    runtime.block_on(async {
        let mut next = 0usize;
        while next < pairs {
            let end = (next + CHUNK_PAIRS).min(pairs);
            let ops = (next..end)
                .map(|i| {
                    let mut value = vec![0u8; VALUE_BYTES];
                    rng.fill_bytes(&mut value);
                    let key = Bytes::from(format!("k{i:013}"));
                    bytes += key.len() + value.len();
                    WriteOp::put(key, Bytes::from(value))
                })
                .collect();
            storage.write_deferred(ops).await.expect("write");
            next = end;
        }
    });
    let ingest = started.elapsed();

    let started = Instant::now();
    let mut read = 0usize;
    runtime.block_on(async {
        let (_taken, mut chunks) = storage.stream_snapshot(Bytes::new(), Bytes::new(), CHUNK_PAIRS);
        while let Some(chunk) = chunks.recv().await {
            read += chunk.expect("snapshot chunk").iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        }
    });
    let scan = started.elapsed();
    assert_eq!(read, bytes, "the scan read back what was written");
    let mb = bytes as f64 / 1e6;
    println!("rocksdb baseline: {pairs} pairs, {mb:.0} MB (random, incompressible values of {VALUE_BYTES} B)");
    println!(
        "  ingest (write batches of {CHUNK_PAIRS}, WAL, no fsync): {:.1} s = {:.0} MB/s",
        ingest.as_secs_f64(),
        mb / ingest.as_secs_f64()
    );
    println!("  snapshot scan: {:.1} s = {:.0} MB/s", scan.as_secs_f64(), mb / scan.as_secs_f64());
    storage.shutdown().expect("shutdown");
}
