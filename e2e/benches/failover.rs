//! Failover of a replicated range on real processes (three `kvfleet-node`s on loopback, range 1
//! replicated on all three, release build): kill -9 the leader while 8 writers write through the
//! client, and time how long until a write issued after the kill is acknowledged (election
//! timeout 1 to 2 s with pre-vote, plus the client learning the new leader). The killed node is
//! restarted and catches up before the next kill. Also: write throughput before each kill.
//!
//! Run: `cargo build --release --bins && cargo bench -p kvfleet-e2e --bench failover`
//! Knobs: KILLS (default 20).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvfleet_e2e::replicated::ReplicatedFleet;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let kills: usize = env_or("KILLS", 20);
    let mut fleet = ReplicatedFleet::start(3);
    let client = fleet.client();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let (client, stop, acked) = (client.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                for n in 0..u64::MAX {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if client.put(format!("w{writer}-{}", n % 1000), format!("{n}")).await.is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    let mut failovers = Vec::new();
    let mut rates = Vec::new();
    for kill in 1..=kills {
        let leader = fleet.leader(None).await;
        let before = acked.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        rates.push((acked.load(Ordering::Relaxed) - before) as f64 / 2.0);
        fleet.nodes[leader].kill9();
        let killed = Instant::now();
        client.put("probe", format!("after kill {kill}")).await.expect("writes resume after the leader's kill");
        let took = killed.elapsed().as_secs_f64();
        failovers.push(took);
        eprintln!("kill {kill}/{kills}: writes resumed after {:.0} ms", took * 1000.0);
        fleet.nodes[leader].spawn();
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        let _ = tokio::time::timeout(Duration::from_secs(30), writer).await;
    }
    println!(
        "failover over {kills} leader kills (kill -9 to the first acknowledged write): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&failovers, 0.5) * 1000.0,
        percentile(&failovers, 0.99) * 1000.0,
        percentile(&failovers, 1.0) * 1000.0
    );
    println!(
        "writes acknowledged per second by 8 writers before each kill (N = 3, majority): p50 {:.0}, min {:.0}",
        percentile(&rates, 0.5),
        percentile(&rates, 0.0)
    );
}
