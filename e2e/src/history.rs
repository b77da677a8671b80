//! A history checker for reads and writes through the client. Writers give each key increasing
//! versions (`<key>@<version>`), one writer per key; readers read random keys and check each
//! answer against what was acknowledged before the read started: a read must never return a
//! version older than one already acknowledged (linearizability's real-time order, per key),
//! nor one nobody wrote. At the end every key must read back its last acknowledged version (or
//! a later one whose write failed ambiguously).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_client::Client;
use kvfleet_proto::v1::ReadConsistency;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// No task runs longer than this, whatever the test does.
const MAX_RUN: Duration = Duration::from_secs(300);

/// `count` keys, `key000` on.
pub fn keys(count: usize) -> Vec<Bytes> {
    (0..count).map(|i| Bytes::from(format!("key{i:03}"))).collect()
}

/// The keys under test and, per key, the last acknowledged and the last attempted version.
pub struct KeySpace {
    pub keys: Vec<Bytes>,
    acked: Vec<AtomicU64>,
    attempted: Vec<AtomicU64>,
}

impl KeySpace {
    pub fn new(keys: Vec<Bytes>) -> Self {
        let zeros = || keys.iter().map(|_| AtomicU64::new(0)).collect();
        KeySpace { acked: zeros(), attempted: zeros(), keys }
    }

    fn value(&self, index: usize, version: u64) -> Bytes {
        let mut value = self.keys[index].to_vec();
        value.extend_from_slice(format!("@{version}").as_bytes());
        value.into()
    }

    /// The version a read returned (0: not found), or why the value is not one of ours.
    fn version_of(&self, index: usize, value: Option<&Bytes>) -> Result<u64, String> {
        let Some(value) = value else { return Ok(0) };
        let prefix = self.value(index, 0);
        let prefix = &prefix[..prefix.len() - 1];
        value
            .strip_prefix(prefix)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{:?} holds {:?}, which no writer wrote", self.keys[index], value))
    }

    /// Checks that a read issued when `floor` was acknowledged, answering `value`, saw neither
    /// the past nor a value never written.
    fn check_read(&self, index: usize, floor: u64, value: Option<&Bytes>) -> Result<(), String> {
        let version = self.version_of(index, value)?;
        let ceiling = self.attempted[index].load(Ordering::Acquire);
        if version < floor {
            return Err(format!(
                "stale read of {:?}: version {version}, but version {floor} was acknowledged before the read began",
                self.keys[index]
            ));
        }
        if version > ceiling {
            return Err(format!(
                "{:?} read version {version}, never written (last attempt {ceiling})",
                self.keys[index]
            ));
        }
        Ok(())
    }

    /// Reads every key back: each must hold its last acknowledged version, or a later one whose
    /// write failed without an answer. Returns what is wrong.
    pub async fn verify_final(&self, client: &Client) -> Vec<String> {
        let mut wrong = Vec::new();
        for (index, key) in self.keys.iter().enumerate() {
            let floor = self.acked[index].load(Ordering::Acquire);
            match client.get(key.clone()).await {
                Ok(value) => {
                    if let Err(why) = self.check_read(index, floor, value.as_ref()) {
                        wrong.push(why);
                    }
                }
                Err(error) => wrong.push(format!("reading {key:?} back failed: {error}")),
            }
        }
        wrong
    }

    /// Acknowledged writes in total (the sum of versions acknowledged).
    pub fn acked_writes(&self) -> u64 {
        self.acked.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    /// Waits up to 30 s for the acknowledged writes to pass `count` (after a fault, an election
    /// and the clients' back-off take longer on a loaded machine); panics with `stopped`.
    pub async fn wait_for_writes_past(&self, count: u64, stopped: &str) {
        let started = std::time::Instant::now();
        while self.acked_writes() <= count {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{stopped}: {} acknowledged, not past {count} in 30 s",
                self.acked_writes()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What the workload saw.
#[derive(Debug, Default)]
pub struct Report {
    pub writes: u64,
    pub reads: u64,
    pub errors: Vec<String>,
    /// Reads that broke the history: older than acknowledged, or never written.
    pub violations: Vec<String>,
}

impl Report {
    fn absorb(&mut self, other: Report) {
        self.writes += other.writes;
        self.reads += other.reads;
        self.errors.extend(other.errors);
        self.violations.extend(other.violations);
    }
}

/// Writers and readers running against `KeySpace` until `finish`.
pub struct HistoryWorkload {
    pub space: Arc<KeySpace>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Report>>,
}

impl HistoryWorkload {
    pub fn start(client: Client, keys: Vec<Bytes>, writers: usize, readers: usize) -> Self {
        let space = Arc::new(KeySpace::new(keys));
        let stop = Arc::new(AtomicBool::new(false));
        let writers = writers.max(1);
        let mut tasks = Vec::new();
        for writer in 0..writers {
            let (client, space, stop) = (client.clone(), space.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut report = Report::default();
                let mine: Vec<usize> = (writer..space.keys.len()).step_by(writers).collect();
                let started = Instant::now();
                for index in mine.iter().cycle().take(10_000_000) {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > MAX_RUN {
                        break;
                    }
                    let version = space.attempted[*index].fetch_add(1, Ordering::AcqRel) + 1;
                    match client.put(space.keys[*index].clone(), space.value(*index, version)).await {
                        Ok(()) => {
                            space.acked[*index].fetch_max(version, Ordering::AcqRel);
                            report.writes += 1;
                        }
                        Err(error) => report.errors.push(format!("put {:?}: {error}", space.keys[*index])),
                    }
                }
                report
            }));
        }
        let mut workload = HistoryWorkload { space, stop, tasks };
        workload.add_readers(&client, readers, 0);
        workload
    }

    /// `count` more readers through `client` (e.g. one that knows a single node), their random
    /// keys seeded from `seed` on.
    pub fn add_readers(&mut self, client: &Client, count: usize, seed: u64) {
        self.add_readers_with(client, count, seed, ReadConsistency::Linearizable);
    }

    /// `add_readers`, reading with `consistency` (`Follower`: any replica, after a read index
    /// from the leader; held to the same history).
    pub fn add_readers_with(&mut self, client: &Client, count: usize, seed: u64, consistency: ReadConsistency) {
        for reader in 0..count as u64 {
            let (client, space, stop) = (client.clone(), self.space.clone(), self.stop.clone());
            self.tasks.push(tokio::spawn(async move {
                let mut report = Report::default();
                let mut rng = StdRng::seed_from_u64(seed + reader);
                let started = Instant::now();
                for _ in 0..10_000_000u64 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > MAX_RUN {
                        break;
                    }
                    let index = rng.random_range(0..space.keys.len());
                    let floor = space.acked[index].load(Ordering::Acquire);
                    match client.get_with(space.keys[index].clone(), consistency).await {
                        Ok(value) => {
                            report.reads += 1;
                            if let Err(why) = space.check_read(index, floor, value.as_ref()) {
                                report.violations.push(why);
                            }
                        }
                        Err(error) => report.errors.push(format!("get {:?}: {error}", space.keys[index])),
                    }
                }
                report
            }));
        }
    }

    /// `count` readers of bounded staleness (`Client::get_stale` with `bound`), held to what
    /// that promises: a read must return a version no older than one acknowledged `bound`
    /// before it began. Each reader notes a key's acknowledged version, and reads the key at
    /// least `bound` later against that note; reads in between (of random keys) are only
    /// checked against values never written.
    pub fn add_stale_readers(&mut self, client: &Client, count: usize, seed: u64, bound: Duration) {
        for reader in 0..count as u64 {
            let (client, space, stop) = (client.clone(), self.space.clone(), self.stop.clone());
            self.tasks.push(tokio::spawn(async move {
                let mut report = Report::default();
                let mut rng = StdRng::seed_from_u64(seed + reader);
                let mut noted: std::collections::VecDeque<(Instant, usize, u64)> = Default::default();
                let started = Instant::now();
                for _ in 0..10_000_000u64 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > MAX_RUN {
                        break;
                    }
                    let index = rng.random_range(0..space.keys.len());
                    noted.push_back((Instant::now(), index, space.acked[index].load(Ordering::Acquire)));
                    let (index, floor) = match noted.front() {
                        Some(&(at, index, floor)) if at.elapsed() > bound => {
                            noted.pop_front();
                            (index, floor)
                        }
                        _ => (index, 0),
                    };
                    noted.truncate(10_000);
                    match client.get_stale(space.keys[index].clone(), bound).await {
                        Ok(value) => {
                            report.reads += 1;
                            if let Err(why) = space.check_read(index, floor, value.as_ref()) {
                                report.violations.push(format!("a read of bounded staleness ({bound:?}): {why}"));
                            }
                        }
                        Err(error) => report.errors.push(format!("stale get {:?}: {error}", space.keys[index])),
                    }
                }
                report
            }));
        }
    }

    /// `finish`, then holds the run to its promises: no read broke the history, something was
    /// written and read, and every key reads back its last acknowledged version through `client`.
    pub async fn finish_checked(self, client: &Client) -> Report {
        let (report, space) = self.finish().await;
        assert!(report.violations.is_empty(), "history violations: {:?}", report.violations);
        assert!(report.writes > 0 && report.reads > 0, "the workload neither wrote nor read");
        let wrong = space.verify_final(client).await;
        assert!(wrong.is_empty(), "acknowledged writes lost: {wrong:?}");
        report
    }

    /// Stops every task (bounded) and sums what they saw.
    pub async fn finish(self) -> (Report, Arc<KeySpace>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = Report::default();
        for task in self.tasks {
            let outcome = tokio::time::timeout(Duration::from_secs(90), task).await;
            report.absorb(outcome.expect("workload tasks stop").expect("workload task panicked"));
        }
        (report, self.space)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_older_than_acknowledged_or_never_written_are_caught() {
        let space = KeySpace::new(vec![Bytes::from("k1")]);
        space.attempted[0].store(5, Ordering::Release);
        space.acked[0].store(4, Ordering::Release);
        assert!(space.check_read(0, 4, Some(&space.value(0, 4))).is_ok());
        assert!(space.check_read(0, 4, Some(&space.value(0, 5))).is_ok(), "an unacknowledged later write may show");
        assert!(space.check_read(0, 4, Some(&space.value(0, 3))).unwrap_err().contains("stale read"));
        assert!(space.check_read(0, 4, None).unwrap_err().contains("stale read"));
        assert!(space.check_read(0, 0, None).is_ok());
        assert!(space.check_read(0, 4, Some(&space.value(0, 6))).unwrap_err().contains("never written"));
        assert!(space.check_read(0, 0, Some(&Bytes::from("k1@x"))).unwrap_err().contains("no writer wrote"));
    }
}
