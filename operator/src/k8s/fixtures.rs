//! Test fixtures: KeyValueClusters as the API server would return them.

use kube::api::ObjectMeta;
use kvfleet_planner::MoveReason;
pub use kvfleet_resharding::fleet::NodeState::{Draining, Up};
use kvfleet_resharding::fleet::{FleetMove, FleetNode, FleetView, MoveCause, MovePhase, NodeState};
use serde_json::json;

use super::crd::{KeyValueCluster, KeyValueClusterSpec};

/// A cluster `name` in namespace `ns` with `replicas` pods and every other field defaulted.
pub fn cluster(name: &str, replicas: i32) -> KeyValueCluster {
    let spec: KeyValueClusterSpec =
        serde_json::from_value(json!({ "replicas": replicas })).expect("a minimal spec deserializes");
    let mut kvc = KeyValueCluster::new(name, spec);
    kvc.metadata = ObjectMeta {
        name: Some(name.into()),
        namespace: Some("ns".into()),
        uid: Some(format!("uid-{name}")),
        generation: Some(1),
        resource_version: Some("1".into()),
        ..Default::default()
    };
    kvc
}

/// What a resharding round reported: `(pod, state, ranges)` per pod (as many ranges in the
/// cluster as the pods hold), and `moves` moves in flight.
pub fn fleet_status(pods: &[(&str, NodeState, u32)], moves: usize) -> FleetView {
    FleetView {
        round: 3,
        nodes: pods
            .iter()
            .map(|(name, state, ranges)| FleetNode {
                name: name.to_string(),
                address: format!("{name}:7700"),
                state: state.clone(),
                ranges: *ranges,
                following: 0,
                ops_per_sec: 0.0,
                size_bytes: 0,
                restarts: 0,
            })
            .collect(),
        ranges: pods.iter().map(|p| p.2 as usize).sum(),
        moves: (0..moves as u64).map(|move_id| moving(move_id, "demo-0", "demo-1")).collect(),
        ..Default::default()
    }
}

/// A node that did not answer.
pub fn down(error: &str) -> NodeState {
    NodeState::Down { error: error.into() }
}

/// A move in flight from one pod to another.
pub fn moving(move_id: u64, from: &str, to: &str) -> FleetMove {
    FleetMove {
        move_id,
        range_id: 100 + move_id,
        from: from.into(),
        to: to.into(),
        phase: MovePhase::Moving,
        cause: MoveCause::Planned(MoveReason::Drain),
        started_unix_ms: 0,
    }
}

/// One API call the test expects, in order, and the answer the fake API server gives.
pub struct Expect {
    pub method: &'static str,
    /// The request path without the query string.
    pub path: String,
    pub reply: Reply,
}

pub enum Reply {
    /// 200 with this JSON.
    Json(serde_json::Value),
    /// 200 echoing the request body (as the API server does for an apply that it accepts).
    Echo,
    /// 404 Not Found.
    NotFound,
    /// An API error: status code and message.
    Error(u16, &'static str),
}

fn api_status(code: u16, reason: &str, message: &str) -> serde_json::Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": message})
}

/// A request the operator made.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    /// The request's Content-Type (a server-side apply is `application/apply-patch+yaml`).
    pub content_type: String,
    pub body: serde_json::Value,
}

pub fn expect(method: &'static str, path: impl Into<String>, reply: Reply) -> Expect {
    Expect { method, path: path.into(), reply }
}

/// The ApiServerVerifier pattern (kube-rs/controller-rs): a kube `Client` over tower-test's mock
/// service, and a task that checks each request against `script`, in order, and answers it. The
/// task returns every request, so a test can assert bodies; it fails the test on an unexpected
/// call, and when the operator makes fewer calls than scripted.
pub fn verifier(script: Vec<Expect>) -> (kube::Client, tokio::task::JoinHandle<Vec<Recorded>>) {
    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        for (index, expected) in script.into_iter().enumerate() {
            let next = tokio::time::timeout(std::time::Duration::from_secs(5), handle.next_request()).await;
            let Ok(Some((request, respond))) = next else {
                panic!(
                    "call {index} never came: expected {} {}; calls so far: {seen:#?}",
                    expected.method, expected.path
                )
            };
            let method = request.method().to_string();
            let path = request.uri().path().to_string();
            let query = request.uri().query().unwrap_or_default().to_string();
            let content_type = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let bytes = request.into_body().collect_bytes().await.expect("the request body is readable");
            let body = if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("the request body is JSON")
            };
            assert_eq!((method.as_str(), path.as_str()), (expected.method, expected.path.as_str()), "call {index}");
            let (status, reply) = match expected.reply {
                Reply::Json(value) => (StatusCode::OK, value),
                Reply::Echo => (StatusCode::OK, body.clone()),
                Reply::NotFound => (StatusCode::NOT_FOUND, api_status(404, "NotFound", "not found")),
                Reply::Error(code, message) => {
                    (StatusCode::from_u16(code).expect("a valid status code"), api_status(code, "", message))
                }
            };
            let response =
                Response::builder().status(status).body(Body::from(serde_json::to_vec(&reply).expect("JSON")));
            respond.send_response(response.expect("a valid response"));
            seen.push(Recorded { method, path, query, content_type, body });
        }
        seen
    });
    (kube::Client::new(service, "ns"), task)
}
