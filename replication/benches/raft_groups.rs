//! What many Raft groups cost a node, measured with the group driver kvfleet runs
//! (`kvfleet_replication::groups`, tikv/raft-rs underneath):
//!
//! 1. Idle: three nodes in this process, each holding a replica of every one of `--groups`
//!    groups (leaders spread), ticked every 100 ms for `--seconds`, with quiescence off and on.
//!    Reported per node: CPU (this process's user + system time / 3), ticks and messages.
//! 2. Busy: `--busy-groups` groups on three nodes, each node with its own log store
//!    (`kvfleet_replication::log_store`, RocksDB, fsynced writes); rounds of one proposal to every
//!    group, replicated and committed. Reported: log entries per fsync and committed entries per
//!    second, with every group's entries of a `ready` pass in one write (the driver's batching)
//!    and with one fsynced write per group.
//!
//! Run: `cargo bench -p kvfleet-replication --bench raft_groups -- --groups 10000 --seconds 10`.
//! The three nodes share this process and its cores, so the idle figure is an upper bound of one
//! node's share (it also counts delivering every message in memory).

use std::time::{Duration, Instant};

use kvfleet_replication::groups::{GroupsConfig, Persist};
use kvfleet_replication::local::LocalCluster;
use kvfleet_replication::log_store::LogStore;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct it is given and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let time = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn idle(groups: u64, seconds: u64, quiesce: bool) {
    let config = GroupsConfig { quiesce, ..GroupsConfig::default() };
    let started = Instant::now();
    let mut cluster = LocalCluster::new(3, groups, config).expect("groups start");
    cluster.elect_spread(groups).expect("leaders elected");
    // Let every group reach its steady state (quiet, or heartbeating) before measuring.
    for _ in 0..40 {
        cluster.tick();
        cluster.settle(100).expect("messages delivered");
    }
    let setup = started.elapsed();
    let leaders = (1..=groups).filter(|g| cluster.agreed_leader(*g).is_some()).count();
    let (cpu_before, delivered_before, heartbeats_before) = (cpu_time(), cluster.delivered, cluster.heartbeats);
    let wall = Instant::now();
    let mut ticks = 0usize;
    let mut next = Instant::now();
    while wall.elapsed() < Duration::from_secs(seconds) {
        next += Duration::from_millis(100);
        ticks += cluster.tick();
        cluster.settle(100).expect("messages delivered");
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let (cpu, wall) = (cpu_time() - cpu_before, wall.elapsed());
    let per_node_core = cpu.as_secs_f64() / wall.as_secs_f64() / 3.0;
    let per_second = |n: u64| n as f64 / wall.as_secs_f64() / 3.0;
    println!(
        "idle, quiescence {}: {groups} groups x 3 nodes ({leaders} with an agreed leader, set up in {:.1} s): \
         {:.2}% of a core per node; per node per second: {:.0} group ticks, {:.0} messages ({:.0} heartbeats)",
        if quiesce { "on " } else { "off" },
        setup.as_secs_f64(),
        100.0 * per_node_core,
        ticks as f64 / wall.as_secs_f64() / 3.0,
        per_second(cluster.delivered - delivered_before),
        per_second(cluster.heartbeats - heartbeats_before),
    );
}

/// One node's log store, written once per `ready` pass or once per group, counting fsyncs.
struct Log {
    store: LogStore,
    per_group: bool,
    fsyncs: u64,
    entries: u64,
}

impl Log {
    fn write(&mut self, persist: &[Persist<'_>]) -> Result<(), String> {
        self.entries += persist.iter().map(|p| p.entries.len() as u64).sum::<u64>();
        if self.per_group {
            for part in persist {
                self.store.write(std::slice::from_ref(part)).map_err(|e| e.to_string())?;
                self.fsyncs += 1;
            }
        } else {
            self.store.write(persist).map_err(|e| e.to_string())?;
            self.fsyncs += 1;
        }
        Ok(())
    }
}

fn busy(groups: u64, rounds: u64, per_group: bool) {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("a temporary directory")).collect();
    let mut logs: Vec<Log> = dirs
        .iter()
        .map(|dir| Log {
            store: LogStore::open(dir.path()).expect("the log store opens"),
            per_group,
            fsyncs: 0,
            entries: 0,
        })
        .collect();
    let mut cluster = LocalCluster::new(3, groups, GroupsConfig::default()).expect("groups start");
    cluster.elect_spread(groups).expect("leaders elected");
    let leaders: Vec<u64> = (1..=groups).map(|g| cluster.agreed_leader(g).unwrap_or(1)).collect();
    let payload = vec![7u8; 100];
    let started = Instant::now();
    let mut committed = 0u64;
    for _ in 0..rounds {
        for (index, leader) in leaders.iter().enumerate() {
            cluster.node(*leader).propose(index as u64 + 1, payload.clone()).expect("proposal accepted");
        }
        // Deliver until every proposal is committed everywhere: each node's Ready is persisted
        // into its own log.
        committed += cluster
            .settle_with(100, |node, persist| logs[(node - 1) as usize].write(persist))
            .expect("messages delivered");
    }
    let elapsed = started.elapsed();
    let (fsyncs, entries) = logs.iter().fold((0, 0), |(f, e), log| (f + log.fsyncs, e + log.entries));
    println!(
        "busy, {}: {groups} groups x 3 nodes, {rounds} rounds: {entries} log entries in {fsyncs} fsyncs \
         ({:.1} entries per fsync), {:.0} entries committed per second ({committed} applied on 3 nodes, {:.1} s)",
        if per_group { "one fsync per group  " } else { "one fsync per batch  " },
        entries as f64 / fsyncs.max(1) as f64,
        committed as f64 / 3.0 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
    );
}

fn main() {
    let groups = arg("--groups", 10_000);
    let seconds = arg("--seconds", 10);
    let busy_groups = arg("--busy-groups", 1_000);
    let rounds = arg("--rounds", 20);
    idle(groups, seconds, false);
    idle(groups, seconds, true);
    busy(busy_groups, rounds, false);
    busy(busy_groups, rounds.min(5), true);
}
