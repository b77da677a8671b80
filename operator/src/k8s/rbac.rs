//! Test: every Kubernetes API call the operator makes is allowed by the chart's RBAC rules.
//! The calls are the ones the reconcile, platform and leader-election code really sends (through
//! the mock API server), plus the list/watch calls of the controller runtime's watches.

use std::path::Path;

use serde::Deserialize;

use super::fixtures::{Recorded, Reply, cluster, expect, verifier};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
}

/// The rules of a chart template: the plain YAML after `rules:`, up to the next document.
fn chart_rules(template: &str) -> Vec<Rule> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/kvfleet/templates").join(template);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let rules = text.split("\nrules:\n").nth(1).unwrap_or_else(|| panic!("{template} has no rules"));
    let rules = rules.split("\n---").next().unwrap_or_default();
    serde_yaml::from_str(rules).unwrap_or_else(|e| panic!("{template}: the rules are not plain YAML: {e}"))
}

/// (API group, resource or resource/subresource, verb) of a request. A server-side apply is a
/// PATCH, but the API server authorizes one that creates its object as `create`: an apply needs
/// both (`permissions`).
fn permission(call: &Recorded) -> (String, String, String) {
    let parts: Vec<&str> = call.path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("unexpected path {}", call.path),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => panic!("unexpected path {}", call.path),
    };
    let verb = match (call.method.as_str(), named) {
        ("GET", true) => "get",
        ("GET", false) if call.query.contains("watch=true") => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("DELETE", _) => "delete",
        (method, _) => panic!("unexpected method {method}"),
    };
    (group.to_string(), resource, verb.to_string())
}

/// Every permission a request may need: a server-side apply creates its object the first time,
/// which the API server authorizes as `create`.
fn permissions(call: &Recorded) -> Vec<(String, String, String)> {
    let needed = permission(call);
    let apply = call.method == "PATCH" && call.content_type.starts_with("application/apply-patch");
    let mut all = vec![needed.clone()];
    if apply {
        all.push((needed.0, needed.1, "create".into()));
    }
    all
}

fn allowed(rules: &[Rule], (group, resource, verb): &(String, String, String)) -> bool {
    rules.iter().any(|r| r.api_groups.contains(group) && r.resources.contains(resource) && r.verbs.contains(verb))
}

fn call(method: &str, path: &str, query: &str) -> Recorded {
    Recorded {
        method: method.into(),
        path: path.into(),
        query: query.into(),
        content_type: String::new(),
        body: serde_json::Value::Null,
    }
}

/// The resharding loop's platform calls: members, load and save the state (conditional on the
/// resourceVersion read, skipped when unchanged, superseded on a conflict).
async fn platform_calls() -> Vec<Recorded> {
    use crate::k8s::build::Names;
    use crate::k8s::platform::{KubernetesPlatform, state_config_map};
    use kvfleet_resharding::leadership::Leadership;
    use kvfleet_resharding::platform::{Platform, PlatformError};
    use kvfleet_resharding::state::ReshardingState;
    let kvc = cluster("demo", 3);
    let names = Names::of(&kvc).unwrap();
    let kvc_json = serde_json::to_value(&kvc).unwrap();
    let kvc_path = "/apis/kvfleet.io/v1alpha1/namespaces/ns/keyvalueclusters/demo";
    let state_path = "/api/v1/namespaces/ns/configmaps/demo-controller-state";
    let stored = |state: &ReshardingState, version: &str| {
        let mut map = state_config_map(&kvc, &names, serde_json::to_string(state).unwrap()).unwrap();
        map.metadata.resource_version = Some(version.into());
        serde_json::to_value(map).unwrap()
    };
    let resumed = ReshardingState { next_range_id: 3, ..Default::default() };
    let (client, server) = verifier(vec![
        expect("GET", kvc_path, Reply::Json(kvc_json.clone())),
        expect("GET", "/apis/apps/v1/namespaces/ns/statefulsets/demo", Reply::NotFound),
        expect("GET", kvc_path, Reply::Json(kvc_json.clone())),
        expect("GET", state_path, Reply::Json(stored(&resumed, "5"))),
        expect("PUT", state_path, Reply::Echo),
        // The same state again: not written. Then someone else wrote in between:
        expect("PUT", state_path, Reply::Error(409, "the object has been modified")),
        // A first start: the ConfigMap is created (and the creation fails if another did it).
        expect("GET", kvc_path, Reply::Json(kvc_json)),
        expect("GET", state_path, Reply::NotFound),
        expect("POST", "/api/v1/namespaces/ns/configmaps", Reply::Echo),
        expect("GET", kvc_path, Reply::NotFound),
    ]);
    let platform = KubernetesPlatform::new(client, names.clone(), Leadership::unconditional());
    assert!(platform.members().await.unwrap().is_empty(), "no StatefulSet yet: no members");
    assert_eq!(platform.load_state().await.unwrap(), Some(resumed));
    let state = ReshardingState { next_range_id: 9, ..Default::default() };
    platform.save_state(&state).await.unwrap();
    platform.save_state(&state).await.unwrap();
    let changed = ReshardingState { next_range_id: 10, ..Default::default() };
    let superseded = platform.save_state(&changed).await.unwrap_err();
    assert!(matches!(superseded, PlatformError::Superseded(_)), "{superseded}");
    assert_eq!(platform.load_state().await.unwrap(), None);
    platform.save_state(&changed).await.unwrap();
    let gone = platform.members().await.unwrap_err();
    assert!(matches!(gone, PlatformError::Gone(_)), "{gone}");
    let calls = server.await.expect("every scripted call came, in order");
    let saved = &calls[4].body;
    assert_eq!(saved["metadata"]["resourceVersion"], "5", "a save is conditional on the version read");
    assert_eq!(saved["metadata"]["ownerReferences"][0]["name"], "demo", "the state goes with the cluster");
    let json: serde_json::Value = serde_json::from_str(saved["data"]["state.json"].as_str().unwrap()).unwrap();
    assert_eq!(json["nextRangeId"], 9);
    assert!(calls[8].body["metadata"]["resourceVersion"].is_null(), "a creation has no precondition");
    calls
}

/// A cluster deleted and re-created under the same name does not inherit the old one's state.
#[tokio::test]
async fn a_recreated_cluster_does_not_inherit_the_old_state() {
    use crate::k8s::build::Names;
    use crate::k8s::platform::{KubernetesPlatform, state_config_map};
    use kvfleet_resharding::leadership::Leadership;
    use kvfleet_resharding::platform::Platform;
    use kvfleet_resharding::state::ReshardingState;
    let old = cluster("demo", 3);
    let mut new = cluster("demo", 3);
    new.metadata.uid = Some("uid-demo-recreated".into());
    let names = Names::of(&new).unwrap();
    let state = ReshardingState { next_range_id: 40, ..Default::default() };
    let mut map = state_config_map(&old, &names, serde_json::to_string(&state).unwrap()).unwrap();
    map.metadata.resource_version = Some("8".into());
    let state_path = "/api/v1/namespaces/ns/configmaps/demo-controller-state";
    let (client, server) = verifier(vec![
        expect(
            "GET",
            "/apis/kvfleet.io/v1alpha1/namespaces/ns/keyvalueclusters/demo",
            Reply::Json(serde_json::to_value(&new).unwrap()),
        ),
        expect("GET", state_path, Reply::Json(serde_json::to_value(map).unwrap())),
        expect("PUT", state_path, Reply::Echo),
    ]);
    let platform = KubernetesPlatform::new(client, names, Leadership::unconditional());
    assert_eq!(platform.load_state().await.unwrap(), None, "the old cluster's state is not resumed");
    platform.save_state(&ReshardingState::default()).await.unwrap();
    let calls = server.await.expect("every scripted call came, in order");
    assert_eq!(calls[2].body["metadata"]["ownerReferences"][0]["uid"], "uid-demo-recreated");
}

/// Leader election: create the Lease, then renew it.
async fn leader_calls() -> Vec<Recorded> {
    use crate::k8s::leader::{LeaseConfig, Observer, try_hold};
    let path = "/apis/coordination.k8s.io/v1/namespaces/kvfleet-system/leases/kvfleet-operator";
    let config = LeaseConfig::new("kvfleet-system".into(), "kvfleet-operator".into(), "operator-0".into());
    let held = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "kvfleet-operator", "namespace": "kvfleet-system", "resourceVersion": "7"},
        "spec": {"holderIdentity": "operator-0", "leaseDurationSeconds": 15, "renewTime": "2026-01-01T00:00:00.000000Z"}
    });
    let (client, server) = verifier(vec![
        expect("GET", path, Reply::NotFound),
        expect("POST", "/apis/coordination.k8s.io/v1/namespaces/kvfleet-system/leases", Reply::Echo),
        expect("GET", path, Reply::Json(held)),
        expect("PUT", path, Reply::Echo),
    ]);
    let api = kube::Api::namespaced(client, "kvfleet-system");
    let mut observer = Observer::default();
    assert_eq!(try_hold(&api, &config, &mut observer, 0).await.unwrap(), Some(1), "creates the lease");
    assert_eq!(try_hold(&api, &config, &mut observer, 0).await.unwrap(), Some(1), "renews its own lease");
    let calls = server.await.expect("every scripted call came, in order");
    assert_eq!(calls[3].body["metadata"]["resourceVersion"], "7", "renewal is conditional on what was read");
    calls
}

/// The controller runtime lists and watches the clusters and the objects it owns
/// (`k8s::operator::run`).
fn watch_calls() -> Vec<Recorded> {
    [
        "/apis/kvfleet.io/v1alpha1/keyvalueclusters",
        "/apis/apps/v1/statefulsets",
        "/api/v1/services",
        "/api/v1/configmaps",
        "/apis/policy/v1/poddisruptionbudgets",
    ]
    .into_iter()
    .flat_map(|path| [call("GET", path, ""), call("GET", path, "watch=true")])
    .collect()
}

/// Fails on the first call `rules` (the chart's `role`) does not grant; returns how many it checked.
fn assert_granted(rules: &[Rule], role: &str, calls: &[Recorded]) -> usize {
    for call in calls {
        for needed in permissions(call) {
            assert!(
                allowed(rules, &needed),
                "{} {}?{} needs {needed:?}, which the {role} does not grant",
                call.method,
                call.path,
                call.query
            );
        }
    }
    calls.len()
}

#[tokio::test]
async fn every_api_call_is_allowed_by_the_charts_rbac() {
    let cluster_rules = chart_rules("clusterrole.yaml");
    let leader_rules = chart_rules("role.yaml");
    let mut calls = super::reconcile::tests::all_reconcile_calls().await;
    calls.extend(platform_calls().await);
    calls.extend(watch_calls());
    let checked = assert_granted(&cluster_rules, "ClusterRole", &calls)
        + assert_granted(&leader_rules, "leader Role", &leader_calls().await);
    assert!(checked > 30, "only {checked} calls checked");
}

#[test]
fn the_rbac_check_refuses_what_the_rules_do_not_grant() {
    let rules = chart_rules("clusterrole.yaml");
    let delete_service = permission(&call("DELETE", "/api/v1/namespaces/ns/services/demo", ""));
    assert_eq!(delete_service, ("".into(), "services".into(), "delete".into()));
    assert!(!allowed(&rules, &delete_service), "the operator never deletes a Service (garbage collection does)");
    let delete_pvc = permission(&call("DELETE", "/api/v1/namespaces/ns/persistentvolumeclaims/data-demo-0", ""));
    assert!(!allowed(&rules, &delete_pvc), "the operator never deletes a volume");
    let secrets = permission(&call("GET", "/api/v1/namespaces/ns/secrets/x", ""));
    assert!(!allowed(&rules, &secrets), "the operator reads no secrets");
    let status = permission(&call("PATCH", "/apis/kvfleet.io/v1alpha1/namespaces/ns/keyvalueclusters/demo/status", ""));
    assert!(allowed(&rules, &status));
    // An apply of a new object is a create to the API server's authorizer.
    let apply = Recorded {
        content_type: "application/apply-patch+yaml".into(),
        ..call("PATCH", "/api/v1/namespaces/ns/secrets/x", "fieldManager=kvfleet-operator&force=true")
    };
    let needed: Vec<String> = permissions(&apply).into_iter().map(|p| p.2).collect();
    assert_eq!(needed, ["patch", "create"]);
}
