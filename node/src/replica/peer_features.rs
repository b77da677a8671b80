//! What each peer node last said it can do (the features its version has, sent with every batch
//! of Raft messages), remembered on disk across restarts. A step that changes what the Raft log
//! holds for every replica, and that an earlier version would take for an empty entry (undoing a
//! merge's freeze), may skip a silent node only if that node was last heard with the feature:
//! a node that comes back must apply what it missed as the others did.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use parking_lot::RwLock;
use rocksdb::DB;

use crate::storage::CF_META;

const KEY_PREFIX: &[u8] = b"peer-features/";

/// What a peer was last heard to support.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSupport {
    /// It sent Raft messages with the feature.
    Has,
    /// It sent Raft messages without it (an earlier version).
    Lacks,
    /// Nothing from it ever reached this node.
    NeverHeard,
}

/// Every peer's features by Raft id, as last heard; kept in the meta column family.
#[derive(Clone)]
pub struct PeerFeatures {
    db: Arc<DB>,
    heard: Arc<RwLock<HashMap<u64, BTreeSet<String>>>>,
}

impl PeerFeatures {
    /// The features remembered from earlier runs.
    pub fn load(db: Arc<DB>) -> Result<Self, String> {
        let cf = db.cf_handle(CF_META).ok_or("the meta column family is missing")?;
        let mut heard = HashMap::new();
        for item in db.prefix_iterator_cf(cf, KEY_PREFIX) {
            let (key, value) = item.map_err(|e| format!("reading the peers' features: {e}"))?;
            if !key.starts_with(KEY_PREFIX) {
                break;
            }
            let raft_id = key[KEY_PREFIX.len()..]
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| format!("a peer-features key of {} bytes", key.len()))?;
            let features = std::str::from_utf8(&value)
                .map_err(|_| format!("the features of peer {raft_id} are not UTF-8"))?
                .split('\n')
                .filter(|f| !f.is_empty())
                .map(str::to_string)
                .collect();
            heard.insert(raft_id, features);
        }
        Ok(PeerFeatures { db, heard: Arc::new(RwLock::new(heard)) })
    }

    /// Records that peer `raft_id` sent `features` (none: an earlier version); written to disk
    /// only when they differ from what was known.
    pub fn heard(&self, raft_id: u64, features: &[String]) {
        // Stored newline-separated: a name that is empty or holds a newline (never one of ours)
        // would read back as other names after a restart, so it is not remembered at all.
        let names = || features.iter().map(String::as_str).filter(|f| !f.is_empty() && !f.contains('\n'));
        // Every batch carries them: the usual case, nothing new, allocates nothing.
        let known = |stored: &BTreeSet<String>| {
            names().all(|f| stored.contains(f)) && stored.iter().all(|s| names().any(|f| f == s))
        };
        if self.heard.read().get(&raft_id).is_some_and(known) {
            return;
        }
        // One writer at a time: what is on disk and in memory stay the same.
        let mut heard = self.heard.write();
        if heard.get(&raft_id).is_some_and(known) {
            return;
        }
        let features: BTreeSet<String> = names().map(str::to_string).collect();
        let value = features.iter().cloned().collect::<Vec<_>>().join("\n");
        let stored = self.db.cf_handle(CF_META).map(|cf| {
            let mut key = KEY_PREFIX.to_vec();
            key.extend_from_slice(&raft_id.to_be_bytes());
            self.db.put_cf(cf, key, value.as_bytes())
        });
        match stored {
            Some(Ok(())) => {
                tracing::info!(peer = raft_id, features = ?features, "a peer's features");
                heard.insert(raft_id, features);
            }
            // Not remembered: the next batch from the peer tries again.
            Some(Err(error)) => tracing::warn!(peer = raft_id, %error, "the peer's features not stored"),
            None => tracing::warn!(peer = raft_id, "the meta column family is missing"),
        }
    }

    /// Whether peer `raft_id` was last heard with `feature`.
    pub fn support(&self, raft_id: u64, feature: &str) -> PeerSupport {
        match self.heard.read().get(&raft_id) {
            Some(features) if features.contains(feature) => PeerSupport::Has,
            Some(_) => PeerSupport::Lacks,
            None => PeerSupport::NeverHeard,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> Arc<DB> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        Arc::new(DB::open_cf(&options, dir, [CF_META]).expect("a RocksDB"))
    }

    #[test]
    fn what_a_peer_said_last_is_remembered_across_a_restart() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let features = PeerFeatures::load(open(dir.path())).expect("loaded");
        assert_eq!(features.support(7, "merge-abort"), PeerSupport::NeverHeard);
        features.heard(7, &["merge-abort".to_string()]);
        features.heard(9, &[]);
        features.heard(11, &["merge-abort".to_string()]);
        // Downgraded: what it says last counts.
        features.heard(11, &[]);
        assert_eq!(features.support(7, "merge-abort"), PeerSupport::Has);
        assert_eq!(features.support(9, "merge-abort"), PeerSupport::Lacks);
        drop(features);

        let reopened = PeerFeatures::load(open(dir.path())).expect("loaded again");
        assert_eq!(reopened.support(7, "merge-abort"), PeerSupport::Has);
        assert_eq!(reopened.support(7, "something-else"), PeerSupport::Lacks);
        assert_eq!(reopened.support(9, "merge-abort"), PeerSupport::Lacks);
        assert_eq!(reopened.support(11, "merge-abort"), PeerSupport::Lacks);
        assert_eq!(reopened.support(13, "merge-abort"), PeerSupport::NeverHeard);
    }

    #[test]
    fn a_name_that_would_read_back_as_others_is_not_remembered() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let features = PeerFeatures::load(open(dir.path())).expect("loaded");
        features.heard(7, &["other\nmerge-abort".to_string(), String::new()]);
        assert_eq!(features.support(7, "merge-abort"), PeerSupport::Lacks);
        assert_eq!(features.support(7, ""), PeerSupport::Lacks);
        drop(features);

        let reopened = PeerFeatures::load(open(dir.path())).expect("loaded again");
        assert_eq!(reopened.support(7, "merge-abort"), PeerSupport::Lacks, "the same answer after a restart");
        assert_eq!(reopened.support(7, "other"), PeerSupport::Lacks);
    }
}
