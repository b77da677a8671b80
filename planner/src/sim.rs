//! A deterministic cluster simulator for the planner's tests and benchmarks: records numbered
//! `0..records` (keys are their big-endian bytes), a load share per record, ranges owned by
//! nodes. Each round it reports load as nodes would, asks the planner, and applies every action
//! at once. No processes, no clocks: time is the round counter times `round_secs`.

use crate::model::*;
use crate::{Plan, Planner};

pub fn record_key(record: u64) -> Key {
    record.to_be_bytes().to_vec()
}

/// How many record keys sort before `key`.
fn rank(key: &[u8], records: u64) -> u64 {
    if key.is_empty() {
        return 0;
    }
    let mut padded = [0u8; 8];
    let head = key.len().min(8);
    padded[..head].copy_from_slice(&key[..head]);
    let value = u64::from_be_bytes(padded);
    let rank = if key.len() > 8 { value.saturating_add(1) } else { value };
    rank.min(records)
}

/// A bare range for unit tests: no load, no samples.
pub fn range_view(id: RangeId, start: &[u8], end: &[u8], owner: u32) -> RangeView {
    RangeView {
        id,
        start: start.to_vec(),
        end: end.to_vec(),
        owner: NodeId(owner),
        replicas: Vec::new(),
        load: Load::default(),
        follower_reads: Vec::new(),
        lost: Vec::new(),
        missing_voters: 0,
        size_bytes: 0,
        samples: Vec::new(),
        hot_keys: Vec::new(),
        size_middle_key: None,
        split_at: None,
        moved_at: None,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimRange {
    pub id: RangeId,
    pub start: Key,
    pub end: Key,
    pub owner: NodeId,
    pub split_at: Option<u64>,
    pub moved_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoveRecord {
    pub at: u64,
    pub range: RangeId,
    pub from: NodeId,
    pub to: NodeId,
}

#[derive(Debug, Clone)]
pub struct Simulator {
    pub nodes: Vec<NodeView>,
    pub ranges: Vec<SimRange>,
    pub total_ops: f64,
    pub bytes_per_record: u64,
    pub now: u64,
    pub round_secs: u64,
    pub moves: Vec<MoveRecord>,
    pub actions: Vec<(u64, Action)>,
    records: u64,
    /// prefix[i] = load share of records 0..i.
    prefix: Vec<f64>,
    /// The heaviest records, heaviest first (what a hot-key sketch would find).
    heavy: Vec<(u64, f64)>,
    next_id: RangeId,
}

impl Simulator {
    /// `shares[i]` is record i's share of `total_ops` (normalised here). One range covering the
    /// key space starts on node 0.
    pub fn new(nodes: usize, shares: &[f64], total_ops: f64) -> Self {
        let sum: f64 = shares.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        let mut prefix = Vec::with_capacity(shares.len() + 1);
        prefix.push(0.0);
        for share in shares {
            prefix.push(prefix.last().copied().unwrap_or(0.0) + share / sum);
        }
        let mut heavy: Vec<(u64, f64)> = shares.iter().enumerate().map(|(i, s)| (i as u64, s / sum)).collect();
        heavy.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        heavy.truncate(256);
        Simulator {
            nodes: (0..nodes)
                .map(|i| NodeView {
                    id: NodeId(i as u32),
                    name: format!("n{}", i + 1),
                    schedulable: true,
                    draining: false,
                    restarting: false,
                    departed: false,
                })
                .collect(),
            ranges: vec![SimRange {
                id: 1,
                start: Vec::new(),
                end: Vec::new(),
                owner: NodeId(0),
                split_at: None,
                moved_at: None,
            }],
            total_ops,
            bytes_per_record: 1024,
            now: 0,
            round_secs: 10,
            moves: Vec::new(),
            actions: Vec::new(),
            records: shares.len() as u64,
            prefix,
            heavy,
            next_id: 2,
        }
    }

    /// Zipfian shares over `records` ranks (rank 0 hottest), exponent `theta`.
    pub fn zipf_shares(records: usize, theta: f64) -> Vec<f64> {
        (1..=records).map(|rank| 1.0 / (rank as f64).powf(theta)).collect()
    }

    /// Replaces the ranges with `count` equal ranges spread round-robin over the nodes.
    pub fn spread_evenly(&mut self, count: u64) {
        let step = self.records / count;
        self.ranges = (0..count)
            .map(|i| SimRange {
                id: i + 1,
                start: if i == 0 { Vec::new() } else { record_key(i * step) },
                end: if i + 1 == count { Vec::new() } else { record_key((i + 1) * step) },
                owner: NodeId((i % self.nodes.len() as u64) as u32),
                split_at: None,
                moved_at: None,
            })
            .collect();
        self.next_id = count + 1;
    }

    fn bounds(&self, range: &SimRange) -> (u64, u64) {
        let high = if range.end.is_empty() { self.records } else { rank(&range.end, self.records) };
        (rank(&range.start, self.records), high)
    }

    /// What the nodes would report for one range.
    pub fn range_view(&self, range: &SimRange) -> RangeView {
        let (low, high) = self.bounds(range);
        let share = self.prefix[high as usize] - self.prefix[low as usize];
        let ops = share * self.total_ops;
        let mut samples = Vec::new();
        if share > 0.0 && high > low {
            const SAMPLES: usize = 64;
            for j in 0..SAMPLES {
                let target = self.prefix[low as usize] + share * (j as f64 + 0.5) / SAMPLES as f64;
                let index = self.prefix.partition_point(|&p| p <= target).saturating_sub(1) as u64;
                samples.push((record_key(index.clamp(low, high - 1)), ops / SAMPLES as f64));
            }
        }
        let hot_keys = self
            .heavy
            .iter()
            .filter(|(record, _)| (low..high).contains(record))
            .take(8)
            .map(|(record, s)| (record_key(*record), s * self.total_ops))
            .collect();
        RangeView {
            id: range.id,
            start: range.start.clone(),
            end: range.end.clone(),
            owner: range.owner,
            replicas: Vec::new(),
            load: Load { reads: ops, ..Load::default() },
            follower_reads: Vec::new(),
            lost: Vec::new(),
            missing_voters: 0,
            size_bytes: (high - low) * self.bytes_per_record,
            samples,
            hot_keys,
            size_middle_key: (high - low >= 2).then(|| record_key(low + (high - low) / 2)),
            split_at: range.split_at,
            moved_at: range.moved_at,
        }
    }

    pub fn view(&self) -> ClusterView {
        ClusterView {
            nodes: self.nodes.clone(),
            ranges: self.ranges.iter().map(|r| self.range_view(r)).collect(),
            in_flight: Vec::new(),
        }
    }

    /// Ops/s per node.
    pub fn node_loads(&self) -> Vec<f64> {
        let mut loads = vec![0.0; self.nodes.len()];
        for range in &self.ranges {
            let (low, high) = self.bounds(range);
            loads[range.owner.0 as usize] += (self.prefix[high as usize] - self.prefix[low as usize]) * self.total_ops;
        }
        loads
    }

    /// Busiest node's load over the mean of schedulable nodes.
    pub fn max_over_mean(&self) -> f64 {
        let loads = self.node_loads();
        let live: Vec<f64> =
            loads.iter().zip(&self.nodes).filter(|(_, n)| n.schedulable && !n.draining).map(|(l, _)| *l).collect();
        let mean = live.iter().sum::<f64>() / live.len().max(1) as f64;
        let max = loads.iter().copied().fold(0.0, f64::max);
        if mean > 0.0 { max / mean } else { 1.0 }
    }

    /// Advances the clock one round, plans, and applies every action.
    pub fn step(&mut self, planner: &mut Planner) -> Plan {
        self.now += self.round_secs;
        let plan = planner.plan(&self.view(), self.now);
        for action in &plan.actions {
            self.apply(action);
        }
        plan
    }

    pub fn apply(&mut self, action: &Action) {
        self.actions.push((self.now, action.clone()));
        match action {
            Action::Split { range, key, .. } => {
                let Some(index) = self.ranges.iter().position(|r| r.id == *range) else { return };
                let old = self.ranges.remove(index);
                let (left, right) = (self.next_id, self.next_id + 1);
                self.next_id += 2;
                let half = |id, start: &Key, end: &Key| SimRange {
                    id,
                    start: start.clone(),
                    end: end.clone(),
                    owner: old.owner,
                    split_at: Some(self.now),
                    moved_at: old.moved_at,
                };
                self.ranges.insert(index, half(right, key, &old.end));
                self.ranges.insert(index, half(left, &old.start, key));
            }
            Action::Move { range, from, to, .. } | Action::TransferLeader { range, from, to, .. } => {
                if let Some(r) = self.ranges.iter_mut().find(|r| r.id == *range) {
                    r.owner = *to;
                    r.moved_at = Some(self.now);
                    self.moves.push(MoveRecord { at: self.now, range: *range, from: *from, to: *to });
                }
            }
            Action::Merge { left, right, .. } => {
                let (Some(l), Some(r)) =
                    (self.ranges.iter().position(|x| x.id == *left), self.ranges.iter().position(|x| x.id == *right))
                else {
                    return;
                };
                let end = self.ranges[r].end.clone();
                let id = self.next_id;
                self.next_id += 1;
                self.ranges[l].end = end;
                self.ranges[l].id = id;
                self.ranges[l].split_at = None;
                self.ranges.remove(r);
            }
        }
    }
}
