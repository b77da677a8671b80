//! Per-cluster admin tokens. The operator holds one key (the chart keeps it in a Secret of the
//! operator's namespace); each cluster's token is HMAC-SHA256(key, namespace/name/uid), so the
//! operator never reads a Secret back: it derives the token, writes it into a Secret owned by the
//! cluster (which the node pods take it from), and sends it on its own admin calls. A cluster
//! re-created under the same name gets a new token.

use kvfleet_proto::admin_auth::AdminToken;

use super::crd::KeyValueCluster;

/// The shortest key the operator accepts (bytes).
pub const MIN_KEY_BYTES: usize = 32;

#[derive(Clone)]
pub struct AdminKey(ring::hmac::Key);

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKey(..)")
    }
}

impl AdminKey {
    pub fn new(key: &str) -> Result<Self, String> {
        let key = key.trim();
        if key.len() < MIN_KEY_BYTES {
            return Err(format!("the admin key has {} bytes; it needs at least {MIN_KEY_BYTES}", key.len()));
        }
        Ok(AdminKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes())))
    }

    /// The cluster's admin token (64 hex characters); None without a uid (not from the API).
    pub fn token_for(&self, kvc: &KeyValueCluster) -> Option<String> {
        let namespace = kvc.metadata.namespace.as_deref()?;
        let name = kvc.metadata.name.as_deref()?;
        let uid = kvc.metadata.uid.as_deref()?;
        let message = format!("kvfleet admin token v1\0{namespace}\0{name}\0{uid}");
        let tag = ring::hmac::sign(&self.0, message.as_bytes());
        Some(tag.as_ref().iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn admin_token(&self, kvc: &KeyValueCluster) -> AdminToken {
        self.token_for(kvc).and_then(|token| AdminToken::new(&token).ok()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::fixtures::cluster;

    #[test]
    fn each_cluster_gets_its_own_stable_token() {
        let key = AdminKey::new("an operator key of at least 32 bytes!").unwrap();
        let demo = cluster("demo", 3);
        let token = key.token_for(&demo).unwrap();
        assert_eq!(token.len(), 64);
        assert_eq!(key.token_for(&demo).unwrap(), token, "stable across reconciles and restarts");
        let mut recreated = demo.clone();
        recreated.metadata.uid = Some("another-uid".into());
        assert_ne!(key.token_for(&recreated).unwrap(), token, "a re-created cluster gets a new token");
        assert_ne!(key.token_for(&cluster("other", 3)).unwrap(), token);
        let other_key = AdminKey::new("another operator key of 32 bytes or more").unwrap();
        assert_ne!(other_key.token_for(&demo).unwrap(), token);
        assert!(key.admin_token(&demo).is_set());
        assert!(AdminKey::new("short").unwrap_err().contains("at least 32"));
    }
}
