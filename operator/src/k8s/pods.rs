//! Why storage pods are not ready, in the words of whoever knows: the scheduler (PodScheduled
//! False: no node fits, claims unbound), the kubelet (a container waiting: image pull, crash
//! loop, bad config), or only the readiness probe. Pure: pods in, findings out.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

/// A pod not Ready for longer than the bound, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckPod {
    pub name: String,
    pub why: String,
}

impl std::fmt::Display for StuckPod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.why)
    }
}

/// The pods (not terminating) that are not Ready `after` their creation, with their reasons.
pub fn stuck(pods: &[Pod], now: Timestamp, after: Duration) -> Vec<StuckPod> {
    let mut stuck: Vec<StuckPod> = pods
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter(|pod| !condition_true(pod, "Ready"))
        .filter(|pod| {
            let created = pod.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0);
            now.duration_since(created).as_secs_f64() >= after.as_secs_f64()
        })
        .map(|pod| StuckPod { name: pod.name_any(), why: why_not_ready(pod) })
        .collect();
    stuck.sort_by(|a, b| a.name.cmp(&b.name));
    stuck
}

fn condition_true(pod: &Pod, type_: &str) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.into_iter().flatten().any(|c| c.type_ == type_ && c.status == "True")
}

fn why_not_ready(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let conditions = status.and_then(|s| s.conditions.as_ref()).into_iter().flatten();
    if let Some(unscheduled) = conditions.clone().find(|c| c.type_ == "PodScheduled" && c.status == "False") {
        let reason = unscheduled.reason.as_deref().unwrap_or("not scheduled");
        return format!("{reason}: {}", unscheduled.message.as_deref().unwrap_or("the scheduler placed it nowhere"));
    }
    if conditions.clone().all(|c| c.type_ != "PodScheduled")
        && pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none()
    {
        return "not scheduled yet (no scheduler has looked at it)".into();
    }
    let containers = status.and_then(|s| s.container_statuses.as_ref()).into_iter().flatten();
    for container in containers.clone() {
        if let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = waiting.reason.as_deref().unwrap_or("waiting");
            return match waiting.message.as_deref() {
                Some(message) => format!("{reason}: {message}"),
                None => reason.to_string(),
            };
        }
    }
    if let Some(restarted) = containers.clone().find(|c| c.restart_count > 0) {
        let last = restarted.last_state.as_ref().and_then(|s| s.terminated.as_ref());
        let exit = last.map_or(String::new(), |t| {
            format!("; last exit code {} ({})", t.exit_code, t.reason.as_deref().unwrap_or("terminated"))
        });
        return format!("restarted {} times{exit}", restarted.restart_count);
    }
    match status.and_then(|s| s.phase.as_deref()) {
        Some("Running") => "running, but its readiness probe (/readyz) fails".into(),
        Some(phase) => format!("phase {phase}"),
        None => "no status from a kubelet yet".into(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, created: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "creationTimestamp": created},
            "spec": {"containers": [{"name": "node"}]},
            "status": status,
        }))
        .unwrap()
    }

    const BOUND: Duration = Duration::from_secs(120);

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn pods_not_ready_past_the_bound_are_named_with_the_reason_of_whoever_knows() {
        let pods = [
            pod("demo-0", "2026-01-01T00:00:00Z", json!({"conditions": [{"type": "Ready", "status": "True"}]})),
            pod(
                "demo-1",
                "2026-01-01T00:00:00Z",
                json!({"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 node(s) didn't match node selector."}]}),
            ),
            pod(
                "demo-2",
                "2026-01-01T00:00:00Z",
                json!({"phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [{"name": "node", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}}]}),
            ),
            pod("demo-3", "2026-01-01T00:09:00Z", json!({"phase": "Pending"})),
        ];
        let found = stuck(&pods, at("2026-01-01T00:10:00Z"), BOUND);
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "demo-1: Unschedulable: 0/3 nodes are available: 3 node(s) didn't match node selector.",
                "demo-2: ImagePullBackOff: Back-off pulling image \"x\"",
            ],
            "demo-0 is ready, demo-3 is still within the bound"
        );
    }

    #[test]
    fn a_crash_loop_and_a_failing_probe_are_told_apart() {
        let crashing = pod(
            "demo-0",
            "2026-01-01T00:00:00Z",
            json!({"phase": "Running",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "node", "image": "x", "imageID": "", "ready": false, "restartCount": 4,
                "state": {"running": {}}, "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}),
        );
        let unready = pod(
            "demo-1",
            "2026-01-01T00:00:00Z",
            json!({"phase": "Running",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}]}),
        );
        let found = stuck(&[crashing, unready], at("2026-01-01T01:00:00Z"), BOUND);
        assert_eq!(found[0].why, "restarted 4 times; last exit code 1 (Error)");
        assert_eq!(found[1].why, "running, but its readiness probe (/readyz) fails");
    }
}
