//! What a benchmark does: YCSB-style operation mixes, key distributions, and self-verifying
//! values (each value names its key and version, so a read can check it got the right bytes).

use clap::ValueEnum;
use rand::Rng;
use rand_distr::{Distribution as _, Zipf};
use serde::Serialize;

/// YCSB's core workloads plus a write-only load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Workload {
    /// 50% reads, 50% updates.
    A,
    /// 95% reads, 5% updates.
    B,
    /// Reads only.
    C,
    /// Updates only.
    W,
}

impl Workload {
    pub fn read_fraction(self) -> f64 {
        match self {
            Workload::A => 0.5,
            Workload::B => 0.95,
            Workload::C => 1.0,
            Workload::W => 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Distribution {
    Uniform,
    /// Zipfian over record ranks (YCSB's constant 0.99); low ranks are hot and, because keys are
    /// numbered by rank, hot keys sit together in the key space (a hotspot, not scattered).
    Zipfian,
}

pub const ZIPFIAN_THETA: f64 = 0.99;

/// Picks record numbers in `0..records` under a distribution.
pub enum KeyChooser {
    Uniform { records: u64 },
    Zipfian(Zipf<f64>),
}

impl KeyChooser {
    pub fn new(distribution: Distribution, records: u64) -> Result<Self, String> {
        if records == 0 {
            return Err("--records must be at least 1".into());
        }
        Ok(match distribution {
            Distribution::Uniform => KeyChooser::Uniform { records },
            Distribution::Zipfian => KeyChooser::Zipfian(
                Zipf::new(records as f64, ZIPFIAN_THETA).map_err(|e| format!("zipfian over {records} records: {e}"))?,
            ),
        })
    }

    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        match self {
            KeyChooser::Uniform { records } => rng.random_range(0..*records),
            // Zipf yields ranks 1..=n.
            KeyChooser::Zipfian(zipf) => zipf.sample(rng) as u64 - 1,
        }
    }
}

pub fn record_key(prefix: &str, record: u64) -> Vec<u8> {
    format!("{prefix}{record:012}").into_bytes()
}

const HEADER: usize = 16;

fn fingerprint(key: &[u8]) -> u64 {
    // FNV-1a: stable across runs and machines, unlike the std hasher.
    key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn filler_byte(seed: u64, index: usize) -> u8 {
    (seed.rotate_left((index % 64) as u32) as u8) ^ (index as u8)
}

/// A value of `size` bytes (at least 16) that records its key and version.
pub fn make_value(key: &[u8], version: u64, size: usize) -> Vec<u8> {
    let size = size.max(HEADER);
    let print = fingerprint(key);
    let mut value = Vec::with_capacity(size);
    value.extend_from_slice(&print.to_le_bytes());
    value.extend_from_slice(&version.to_le_bytes());
    let seed = print ^ version;
    value.extend((HEADER..size).map(|i| filler_byte(seed, i)));
    value
}

/// Checks a value read for `key` was written by `make_value` for that key; returns its version.
pub fn verify_value(key: &[u8], value: &[u8]) -> Result<u64, String> {
    if value.len() < HEADER {
        return Err(format!("value of {} bytes is shorter than the 16-byte header", value.len()));
    }
    let print = u64::from_le_bytes(value[..8].try_into().map_err(|_| "short header")?);
    let version = u64::from_le_bytes(value[8..16].try_into().map_err(|_| "short header")?);
    if print != fingerprint(key) {
        return Err("value belongs to another key".into());
    }
    let seed = print ^ version;
    if let Some(i) = (HEADER..value.len()).find(|&i| value[i] != filler_byte(seed, i)) {
        return Err(format!("value corrupt at byte {i}"));
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn values_verify_for_their_key_only() {
        let value = make_value(b"user1", 7, 100);
        assert_eq!(value.len(), 100);
        assert_eq!(verify_value(b"user1", &value), Ok(7));
        assert!(verify_value(b"user2", &value).is_err());
        let mut corrupt = value.clone();
        corrupt[50] ^= 1;
        assert!(verify_value(b"user1", &corrupt).is_err());
    }

    #[test]
    fn zipfian_favours_low_ranks() {
        let chooser = KeyChooser::new(Distribution::Zipfian, 10_000).unwrap();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let draws: Vec<u64> = (0..10_000).map(|_| chooser.next(&mut rng)).collect();
        assert!(draws.iter().all(|&r| r < 10_000));
        let top_ten = draws.iter().filter(|&&r| r < 10).count();
        // With theta 0.99 over 10k records the 10 hottest take roughly 30% of accesses.
        assert!(top_ten > 2_000, "{top_ten}");
    }
}
