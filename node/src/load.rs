//! Per-range load accounting: request and byte rates over a sliding window, a load-weighted key
//! sample (for split keys), and the hottest keys (a space-saving sketch), all in bounded memory.
//!
//! The hot path costs two relaxed atomic adds per request; one request in `SAMPLE_EVERY` also
//! takes a short, per-range lock to feed the key sample and the sketch.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kvfleet_proto::v1::{HotKey, KeySample};
use parking_lot::Mutex;

/// One request in this many feeds the key sample and the hot-key sketch.
pub const SAMPLE_EVERY: u64 = 8;
/// Keys kept in the load-weighted reservoir of each range.
const RESERVOIR_CAPACITY: usize = 128;
/// Counters kept by the space-saving sketch of each range.
const SKETCH_CAPACITY: usize = 32;

/// Rates over the window, per second.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Rates {
    pub reads: f64,
    pub writes: f64,
    pub read_bytes: f64,
    pub write_bytes: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Tick {
    reads: u64,
    writes: u64,
    read_bytes: u64,
    write_bytes: u64,
    elapsed: Duration,
}

/// Load of one range. Shared by the request path (recording) and the reporter (reading).
#[derive(Debug)]
pub struct RangeLoad {
    enabled: bool,
    reads: AtomicU64,
    writes: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    history: Mutex<History>,
    keys: Mutex<KeyStats>,
}

#[derive(Debug)]
struct History {
    ticks: VecDeque<Tick>,
    window_ticks: usize,
}

#[derive(Debug, Default)]
struct KeyStats {
    current: Reservoir,
    previous: Reservoir,
    sketch: SpaceSaving,
    ticks_since_rotation: usize,
}

impl RangeLoad {
    pub fn new(enabled: bool, window_ticks: usize) -> Self {
        RangeLoad {
            enabled,
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            history: Mutex::new(History { ticks: VecDeque::new(), window_ticks: window_ticks.max(1) }),
            keys: Mutex::new(KeyStats::default()),
        }
    }

    pub fn record_read(&self, key: &[u8], bytes: usize) {
        if !self.enabled {
            return;
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.maybe_sample(key);
    }

    pub fn record_write(&self, key: &[u8], bytes: usize) {
        if !self.enabled {
            return;
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.write_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.maybe_sample(key);
    }

    fn maybe_sample(&self, key: &[u8]) {
        if !sampled() {
            return;
        }
        let mut keys = self.keys.lock();
        keys.current.offer(key);
        keys.sketch.offer(key);
    }

    /// Closes the current tick (called about once a second): moves the counters into the window,
    /// decays the sketch, and rotates the reservoir once per window.
    pub fn tick(&self, elapsed: Duration) {
        let tick = Tick {
            reads: self.reads.swap(0, Ordering::Relaxed),
            writes: self.writes.swap(0, Ordering::Relaxed),
            read_bytes: self.read_bytes.swap(0, Ordering::Relaxed),
            write_bytes: self.write_bytes.swap(0, Ordering::Relaxed),
            elapsed,
        };
        let window_ticks = {
            let mut history = self.history.lock();
            history.ticks.push_back(tick);
            while history.ticks.len() > history.window_ticks {
                history.ticks.pop_front();
            }
            history.window_ticks
        };
        let mut keys = self.keys.lock();
        keys.sketch.decay(1.0 - 1.0 / window_ticks as f64);
        keys.ticks_since_rotation += 1;
        if keys.ticks_since_rotation >= window_ticks {
            keys.previous = std::mem::take(&mut keys.current);
            keys.ticks_since_rotation = 0;
        }
    }

    pub fn rates(&self) -> Rates {
        let history = self.history.lock();
        let seconds: f64 = history.ticks.iter().map(|t| t.elapsed.as_secs_f64()).sum();
        if seconds <= 0.0 {
            return Rates::default();
        }
        let sum = |f: fn(&Tick) -> u64| history.ticks.iter().map(f).sum::<u64>() as f64 / seconds;
        Rates {
            reads: sum(|t| t.reads),
            writes: sum(|t| t.writes),
            read_bytes: sum(|t| t.read_bytes),
            write_bytes: sum(|t| t.write_bytes),
        }
    }

    /// Up to `limit` keys, each standing for a share of the window's operations.
    pub fn key_samples(&self, limit: usize) -> Vec<KeySample> {
        let keys = self.keys.lock();
        let mut samples = Vec::new();
        for reservoir in [&keys.previous, &keys.current] {
            if reservoir.keys.is_empty() {
                continue;
            }
            let weight = (reservoir.seen * SAMPLE_EVERY) as f64 / reservoir.keys.len() as f64;
            samples.extend(reservoir.keys.iter().map(|k| KeySample { key: k.clone(), weight }));
        }
        if samples.len() > limit {
            // Keep an even spread rather than the first `limit`.
            // Each kept sample then stands for `stride` of the original ones.
            let stride = samples.len() as f64 / limit as f64;
            samples = (0..limit)
                .map(|i| {
                    let sample = &samples[(i as f64 * stride) as usize];
                    KeySample { key: sample.key.clone(), weight: sample.weight * stride }
                })
                .collect();
        }
        samples.sort_by(|a, b| a.key.cmp(&b.key));
        samples
    }

    /// The hottest keys, estimated ops/s over the window, hottest first.
    pub fn hot_keys(&self, limit: usize) -> Vec<HotKey> {
        let window_seconds = {
            let history = self.history.lock();
            history.window_ticks as f64
        };
        let keys = self.keys.lock();
        let scale = SAMPLE_EVERY as f64 / window_seconds;
        let mut hot: Vec<HotKey> = keys
            .sketch
            .counters
            .iter()
            .map(|c| HotKey { key: c.key.clone(), ops_per_sec: c.count * scale, error_ops_per_sec: c.error * scale })
            .collect();
        hot.sort_by(|a, b| b.ops_per_sec.total_cmp(&a.ops_per_sec));
        hot.truncate(limit);
        hot
    }
}

/// Uniform reservoir (Algorithm R) over the sampled operations: a key appears in proportion to
/// the operations on it.
#[derive(Debug, Default)]
struct Reservoir {
    keys: Vec<Bytes>,
    seen: u64,
}

impl Reservoir {
    fn offer(&mut self, key: &[u8]) {
        self.seen += 1;
        if self.keys.len() < RESERVOIR_CAPACITY {
            self.keys.push(Bytes::copy_from_slice(key));
        } else {
            let slot = next_random() % self.seen;
            if (slot as usize) < RESERVOIR_CAPACITY {
                self.keys[slot as usize] = Bytes::copy_from_slice(key);
            }
        }
    }
}

#[derive(Debug)]
struct Counter {
    key: Bytes,
    count: f64,
    error: f64,
}

/// Metwally et al.'s space-saving sketch: the `SKETCH_CAPACITY` heaviest keys with counts that
/// overestimate by at most `error`. Counts decay each tick so the sketch follows current load.
#[derive(Debug, Default)]
struct SpaceSaving {
    counters: Vec<Counter>,
}

impl SpaceSaving {
    fn offer(&mut self, key: &[u8]) {
        if let Some(counter) = self.counters.iter_mut().find(|c| c.key.as_ref() == key) {
            counter.count += 1.0;
            return;
        }
        if self.counters.len() < SKETCH_CAPACITY {
            self.counters.push(Counter { key: Bytes::copy_from_slice(key), count: 1.0, error: 0.0 });
            return;
        }
        if let Some(min) = self.counters.iter_mut().min_by(|a, b| a.count.total_cmp(&b.count)) {
            *min = Counter { key: Bytes::copy_from_slice(key), count: min.count + 1.0, error: min.count };
        }
    }

    fn decay(&mut self, factor: f64) {
        for counter in &mut self.counters {
            counter.count *= factor;
            counter.error *= factor;
        }
        self.counters.retain(|c| c.count >= 0.5);
    }
}

thread_local! {
    static RNG_STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let stack_address = &0u8 as *const u8 as u64;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    (stack_address ^ nanos) | 1
}

/// xorshift64*: a few instructions, good enough to pick which requests are sampled.
fn next_random() -> u64 {
    RNG_STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

fn sampled() -> bool {
    next_random().is_multiple_of(SAMPLE_EVERY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_cover_the_window_only() {
        let load = RangeLoad::new(true, 2);
        for _ in 0..100 {
            load.record_write(b"k", 10);
        }
        load.tick(Duration::from_secs(1));
        assert_eq!(load.rates().writes, 100.0);
        assert_eq!(load.rates().write_bytes, 1000.0);
        load.tick(Duration::from_secs(1));
        assert_eq!(load.rates().writes, 50.0);
        load.tick(Duration::from_secs(1));
        load.tick(Duration::from_secs(1));
        assert_eq!(load.rates().writes, 0.0);
    }

    #[test]
    fn disabled_accounting_records_nothing() {
        let load = RangeLoad::new(false, 10);
        load.record_read(b"k", 10);
        load.tick(Duration::from_secs(1));
        assert_eq!(load.rates(), Rates::default());
        assert!(load.hot_keys(10).is_empty());
    }

    #[test]
    fn a_dominant_key_tops_the_hot_list() {
        let load = RangeLoad::new(true, 10);
        for i in 0..200_000u32 {
            if i % 2 == 0 {
                load.record_read(b"hot", 1);
            } else {
                load.record_read(format!("cold{i}").as_bytes(), 1);
            }
        }
        let hot = load.hot_keys(3);
        assert_eq!(hot[0].key.as_ref(), b"hot");
        // 100k reads of "hot" within a 10 s window: 10k/s, estimated from a 1-in-8 sample.
        assert!((hot[0].ops_per_sec - 10_000.0).abs() < 1_500.0, "{}", hot[0].ops_per_sec);
    }

    #[test]
    fn key_samples_follow_load_and_are_bounded() {
        // Sampling is random: the share is averaged over independent ranges (one 64-key sample
        // alone strays from 0.75 by more than 0.15 about once in a hundred runs).
        let mut shares = Vec::new();
        let mut total_weight = 0.0;
        for _ in 0..8 {
            let load = RangeLoad::new(true, 10);
            for i in 0..80_000u32 {
                let key = if i % 4 == 0 { b"a-light".to_vec() } else { format!("z-heavy{}", i % 50).into_bytes() };
                load.record_write(&key, 1);
            }
            let samples = load.key_samples(64);
            assert!(samples.len() <= 64);
            let heavy = samples.iter().filter(|s| s.key.starts_with(b"z-heavy")).count() as f64;
            shares.push(heavy / samples.len() as f64);
            total_weight += samples.iter().map(|s| s.weight).sum::<f64>();
        }
        let share = shares.iter().sum::<f64>() / shares.len() as f64;
        assert!((0.65..0.85).contains(&share), "heavy share {share} (runs: {shares:?})");
        assert!(total_weight > 0.0);
    }
}
