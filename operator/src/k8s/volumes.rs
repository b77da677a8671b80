//! Growing the pods' volumes when spec.storage.size grows. Pure: the reconciler executes it.
//! A StatefulSet's volumeClaimTemplates cannot change, so a resize is two steps: patch each
//! pod's PersistentVolumeClaim (the storage class must allow expansion), then delete the
//! StatefulSet with orphan propagation (its pods and volumes stay) and create it again with the
//! new template, which adopts the running pods without restarting them.

use k8s_openapi::api::apps::v1::StatefulSet;

use super::build::Names;

#[derive(Debug, Clone, PartialEq)]
pub enum Resize {
    /// The volumes have the size the spec asks for.
    Unchanged,
    Grow {
        from: String,
        to: String,
    },
    /// Refused: a volume never shrinks (CEL refuses this at the API server; a CRD installed
    /// before that rule could let it through).
    Shrink {
        from: String,
        to: String,
    },
    /// A size is not a quantity this operator understands: left alone.
    Unknown {
        from: String,
        to: String,
    },
}

/// The storage request of the StatefulSet's volume claim template.
pub fn template_size(statefulset: &StatefulSet) -> Option<String> {
    let claim = statefulset.spec.volume_claim_templates.as_ref()?.first()?;
    let requests = claim.spec.as_ref()?.resources.as_ref()?.requests.as_ref()?;
    requests.get("storage").map(|q| q.0.clone())
}

pub fn decide(statefulset: &StatefulSet, wanted: &str) -> Resize {
    let Some(from) = template_size(statefulset) else { return Resize::Unchanged };
    let to = wanted.to_string();
    match (quantity_bytes(&from), quantity_bytes(&to)) {
        (Some(a), Some(b)) if a == b => Resize::Unchanged,
        (Some(a), Some(b)) if b > a => Resize::Grow { from, to },
        (Some(_), Some(_)) => Resize::Shrink { from, to },
        _ if from == to => Resize::Unchanged,
        _ => Resize::Unknown { from, to },
    }
}

/// The PersistentVolumeClaim the StatefulSet made for pod `ordinal` (`<template>-<pod>`).
pub fn claim_name(names: &Names, ordinal: i32) -> String {
    format!("{}-{}", super::build::DATA_VOLUME, names.pod(ordinal))
}

/// Bytes in a Kubernetes quantity (`10Gi`, `500M`, `1.5Ti`, `1e9`, and the milli-units an API
/// server stores a fractional size in: `1.1Gi` comes back as `1181116006400m`); None if it is
/// not one.
pub fn quantity_bytes(quantity: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 15] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
        ("m", 1e-3),
        ("u", 1e-6),
        ("n", 1e-9),
    ];
    let quantity = quantity.trim();
    let (number, scale) = SUFFIXES
        .iter()
        .find_map(|(suffix, scale)| quantity.strip_suffix(suffix).map(|n| (n, *scale)))
        .unwrap_or((quantity, 1.0));
    let value: f64 = number.parse().ok()?;
    // Whole bytes: `1.1Gi` and its milli-unit spelling must compare equal despite rounding.
    (value.is_finite() && value >= 0.0).then_some((value * scale).round())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::build::statefulset;
    use crate::k8s::fixtures::cluster;

    fn sized(size: &str) -> StatefulSet {
        let mut kvc = cluster("demo", 3);
        kvc.spec.storage.size = size.into();
        statefulset(&kvc, 3).unwrap()
    }

    #[test]
    fn quantities_compare_across_units() {
        assert_eq!(quantity_bytes("10Gi"), Some(10.0 * 1073741824.0));
        assert_eq!(quantity_bytes("1.5Ti"), Some(1.5 * 1099511627776.0));
        assert_eq!(quantity_bytes("500M"), Some(5e8));
        assert_eq!(quantity_bytes("1e9"), Some(1e9));
        assert_eq!(quantity_bytes("1181116006400m"), Some(1181116006.0), "1.1Gi as an API server stores it");
        assert_eq!(quantity_bytes("lots"), None);
        assert_eq!(quantity_bytes("-1Gi"), None);
    }

    #[test]
    fn only_growth_resizes() {
        assert_eq!(decide(&sized("10Gi"), "10Gi"), Resize::Unchanged);
        assert_eq!(decide(&sized("10Gi"), "10240Mi"), Resize::Unchanged, "the same size in other units");
        assert_eq!(decide(&sized("1181116006400m"), "1.1Gi"), Resize::Unchanged, "milli-units, as stored");
        assert_eq!(decide(&sized("10Gi"), "20Gi"), Resize::Grow { from: "10Gi".into(), to: "20Gi".into() });
        assert_eq!(decide(&sized("10Gi"), "5Gi"), Resize::Shrink { from: "10Gi".into(), to: "5Gi".into() });
        assert_eq!(decide(&sized("10Gi"), "huge"), Resize::Unknown { from: "10Gi".into(), to: "huge".into() });
    }

    #[test]
    fn claims_are_named_as_the_statefulset_names_them() {
        let names = Names::of(&cluster("demo", 3)).unwrap();
        assert_eq!(claim_name(&names, 2), "data-demo-2");
    }
}
