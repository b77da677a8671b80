//! What the API server serves, discovered once when the operator starts, so that the same
//! operator works from Kubernetes 1.20 on: which `policy` version PodDisruptionBudgets take, and
//! whether StatefulSets know `persistentVolumeClaimRetentionPolicy` (1.23+; an older server's
//! server-side apply refuses the field outright).

use kube::Client;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerCapabilities {
    pub pdb_version: PdbVersion,
    /// StatefulSets carry `persistentVolumeClaimRetentionPolicy` (`spec.storage.onDelete`).
    /// Without it, volumes are always retained when their pods or StatefulSet go.
    pub claim_retention_policy: bool,
}

impl Default for ServerCapabilities {
    /// A current Kubernetes.
    fn default() -> Self {
        ServerCapabilities { pdb_version: PdbVersion::V1, claim_retention_policy: true }
    }
}

/// Which `policy` version PodDisruptionBudgets are applied as: `policy/v1` since Kubernetes
/// 1.21; `policy/v1beta1` before (removed in 1.25). Same fields for what the operator writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum PdbVersion {
    V1,
    V1Beta1,
}

impl ServerCapabilities {
    /// Asks the API server. What cannot be learned is assumed current (and a refusal then
    /// shows in the status and Events, as any refused apply does).
    pub async fn discover(client: &Client) -> Self {
        let pdb_version = match client.list_api_group_resources("policy/v1").await {
            Ok(list) if list.resources.iter().any(|r| r.name == "poddisruptionbudgets") => PdbVersion::V1,
            Ok(_) => PdbVersion::V1Beta1,
            Err(kube::Error::Api(status)) if status.code == 404 => PdbVersion::V1Beta1,
            Err(_) => PdbVersion::V1,
        };
        let claim_retention_policy = match client.apiserver_version().await {
            Ok(version) => version_at_least(&version.major, &version.minor, 1, 23),
            Err(_) => true,
        };
        ServerCapabilities { pdb_version, claim_retention_policy }
    }
}

/// `major.minor` (as /version spells them: "1", "20+") at least `want_major.want_minor`.
fn version_at_least(major: &str, minor: &str, want_major: u32, want_minor: u32) -> bool {
    let number = |s: &str| s.trim_end_matches('+').parse::<u32>().ok();
    match (number(major), number(minor)) {
        (Some(major), Some(minor)) => (major, minor) >= (want_major, want_minor),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_numbers_with_provider_suffixes() {
        assert!(!version_at_least("1", "20", 1, 23));
        assert!(version_at_least("1", "23", 1, 23));
        assert!(version_at_least("1", "33+", 1, 23), "a managed cluster's minor reads \"33+\"");
        assert!(version_at_least("1", "", 1, 23), "unreadable: assume current");
    }
}
