//! `fast` durability for replicated ranges (ZippyDB's Fast-Acknowledge): a write is acknowledged
//! once the leader's log holds it durably, before a majority does; the followers catch up in the
//! background. What the leader acknowledged but a majority does not hold yet is lost if the
//! leader is lost (or deposed) before it replicates: the loss window, measured per write
//! (`kvfleet_fast_ack_unreplicated_seconds`), and counted when it happens
//! (`kvfleet_fast_ack_lost_total`).
//!
//! A write is acknowledged early only when nothing between its proposal and its application can
//! refuse it, and no planned step can depose the leader first: this leader has applied every
//! entry of earlier terms (a split a previous leader proposed is applied), no split or freeze it
//! proposed is pending, the range is not frozen and holds every key of the write, and no
//! leadership transfer or membership change is under way. Reads on the leader wait until it has
//! applied every write it acknowledged before they began (a leader never answers older than its
//! own acknowledgements); follower and stale reads see committed writes only.

use std::collections::HashMap;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

/// The metrics of early acknowledgements.
#[derive(Debug, Clone)]
pub struct FastAckMetrics {
    /// Per write acknowledged early: seconds from its acknowledgement to its application by the
    /// leader (a majority held it by then): how long it could have been lost.
    pub unreplicated: Histogram,
    /// Writes acknowledged early whose entry was replaced by another leader's: lost.
    pub lost: Counter,
}

#[derive(Default)]
pub struct FastAcks {
    metrics: Option<FastAckMetrics>,
    /// Proposals that may be acknowledged once this node's log holds them: (group, index).
    candidates: Vec<(u64, u64)>,
    /// Per group, the highest index acknowledged early and not applied here yet, and the term
    /// this node led in when it acknowledged it.
    ahead: HashMap<u64, (u64, u64)>,
    /// Per early-acknowledged entry (group, index): when, and at which term.
    acked_at: HashMap<(u64, u64), (Instant, u64)>,
}

impl FastAcks {
    /// `metrics`: `Some` in `fast` mode (acknowledge early), `None` in `majority` mode.
    pub fn new(metrics: Option<FastAckMetrics>) -> Self {
        FastAcks { metrics, ..FastAcks::default() }
    }

    pub fn enabled(&self) -> bool {
        self.metrics.is_some()
    }

    /// A write was proposed at `index` of `group` that may be acknowledged early.
    pub fn candidate(&mut self, group: u64, index: u64) {
        if self.enabled() {
            self.candidates.push((group, index));
        }
    }

    /// The candidates, to acknowledge now that the log write that held them is durable.
    pub fn take_candidates(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.candidates)
    }

    /// `index` of `group`, proposed at `term`, was acknowledged.
    pub fn acked(&mut self, group: u64, index: u64, term: u64) {
        let ahead = self.ahead.entry(group).or_insert((index, term));
        *ahead = if ahead.1 == term { (ahead.0.max(index), term) } else { (index, term) };
        self.acked_at.insert((group, index), (Instant::now(), term));
    }

    /// The index `group` must have applied before a read this node serves as its leader in
    /// `term` may answer: the highest acknowledged early in that term, if not applied yet.
    pub fn unapplied(&self, group: u64, term: u64) -> Option<u64> {
        self.ahead.get(&group).filter(|(_, acked_term)| *acked_term == term).map(|(index, _)| *index)
    }

    /// This node no longer leads `group`: reads here no longer wait for what it acknowledged
    /// (a follower's reads see committed writes only; whether those writes were lost is settled
    /// when their indexes apply).
    pub fn stopped_leading(&mut self, group: u64) -> bool {
        self.ahead.remove(&group).is_some()
    }

    /// A snapshot up to `index` was installed for `group`: the early acknowledgements it covers
    /// are settled without being applied one by one (their fate is not known here).
    pub fn snapshot_installed(&mut self, group: u64, index: u64) {
        self.acked_at.retain(|(g, i), _| *g != group || *i > index);
        if self.ahead.get(&group).is_some_and(|(ahead, _)| *ahead <= index) {
            self.ahead.remove(&group);
        }
    }

    /// `group` applied an entry at `index` and `term`: an early acknowledgement of it is settled
    /// (replicated, or lost if another leader's entry took its place). Returns whether every
    /// early acknowledgement of the group is applied now.
    pub fn applied(&mut self, group: u64, index: u64, term: u64) -> bool {
        if let Some((at, acked_term)) = self.acked_at.remove(&(group, index))
            && let Some(metrics) = &self.metrics
        {
            if acked_term == term {
                metrics.unreplicated.observe(at.elapsed().as_secs_f64());
            } else {
                metrics.lost.inc();
                tracing::warn!(
                    range_id = group,
                    index,
                    "a write acknowledged early (fast durability) was lost: another leader's entry took its place"
                );
            }
        }
        match self.ahead.get(&group) {
            Some(&(ahead, _)) if index >= ahead => {
                self.ahead.remove(&group);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// `group` stopped here (removed, merged away): its acknowledgements are nobody's to settle.
    pub fn forget(&mut self, group: u64) {
        self.ahead.remove(&group);
        self.acked_at.retain(|(g, _), _| *g != group);
        self.candidates.retain(|(g, _)| *g != group);
    }
}
