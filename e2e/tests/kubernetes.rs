//! The Kubernetes suite, for a real cluster (kind): install the chart, apply a KeyValueCluster,
//! wait for Ready, write through the client Service, scale 3 -> 5 -> 3 while writing, roll a
//! spec change with a DrainFirst update while writing, and check every acknowledged write reads
//! back with its last value; then clean up.
//!
//! Needs KUBECONFIG (or ~/.kube/config), `kubectl` and `helm` on PATH, and the images loaded
//! into the cluster: `scripts/e2e-kind.sh` does all of it. Plain `cargo test` skips it and
//! prints why ("ignored, needs a Kubernetes cluster").

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvfleet_proto::v1::kv_client::KvClient;
use kvfleet_proto::v1::{GetRequest, PutRequest, RequestHeader};

const NAMESPACE: &str = "kvfleet-e2e";
const CLUSTER: &str = "e2e";

fn cluster_configured() -> bool {
    let kubeconfig = std::env::var_os("KUBECONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".kube/config")));
    kubeconfig.is_some_and(|path| path.exists())
}

/// Runs a command, bounded; returns stdout or panics with its stderr.
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} could not start (is it on PATH?): {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn kubectl(args: &[&str]) -> String {
    let mut all = vec!["-n", NAMESPACE];
    all.extend_from_slice(args);
    run("kubectl", &all)
}

fn jsonpath(path: &str) -> String {
    kubectl(&["get", "kvc", CLUSTER, "-o", &format!("jsonpath={path}")])
}

/// Polls every 3 s until `pending` answers None, bounded; on timeout, panics with its last
/// answer (what is still pending) and `kubectl describe`.
fn poll_until(limit: Duration, mut pending: impl FnMut() -> Option<String>) {
    let started = Instant::now();
    loop {
        let Some(state) = pending() else { return };
        assert!(started.elapsed() < limit, "after {limit:?}: {state}\n{}", kubectl(&["describe", "kvc", CLUSTER]));
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// Waits until the cluster reports `phase` with `ready` pods serving ranges.
fn wait_for(phase: &str, ready: i32, statefulset_replicas: i32, limit: Duration) {
    poll_until(limit, || {
        let now = (jsonpath("{.status.phase}"), jsonpath("{.status.readyReplicas}"), jsonpath("{.status.replicas}"));
        let done = now.0 == phase && now.1 == ready.to_string() && now.2 == statefulset_replicas.to_string();
        (!done).then(|| format!("the cluster is {now:?}, not ({phase}, {ready} ready, {statefulset_replicas} pods)"))
    });
}

/// Waits until every pod of the StatefulSet runs its update revision and no pod is named for
/// draining.
fn wait_for_update(limit: Duration) {
    poll_until(limit, || {
        let sts =
            kubectl(&["get", "statefulset", CLUSTER, "-o", "jsonpath={.status.updatedReplicas}/{.status.replicas}"]);
        let draining = jsonpath("{.status.rollout.drainingPod}");
        let done = sts.split_once('/').is_some_and(|(updated, all)| updated == all) && draining.is_empty();
        (!done).then(|| format!("the update is at {sts} pods, draining {draining:?}"))
    });
}

struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::env::var_os("KVFLEET_E2E_KEEP").is_some() {
            eprintln!("KVFLEET_E2E_KEEP set: leaving namespace {NAMESPACE} in place");
            return;
        }
        let _ = Command::new("kubectl").args(["delete", "namespace", NAMESPACE, "--wait=false"]).status();
        let _ = Command::new("helm").args(["uninstall", "kvfleet-e2e", "-n", NAMESPACE]).status();
    }
}

/// Writes `count` keys (each to its own last value), returning what was acknowledged.
async fn write_round(
    client: &mut KvClient<tonic::transport::Channel>,
    round: u32,
    count: u32,
    acked: &mut HashMap<Vec<u8>, Vec<u8>>,
) {
    let header = Some(RequestHeader { allow_forward: true, ..Default::default() });
    for i in 0..count {
        let key = format!("e2e-key-{i:05}").into_bytes();
        let value = format!("round-{round}-{i}").into_bytes();
        let request = PutRequest { header, key: key.clone().into(), value: value.clone().into() };
        // A write that fails (a range mid-move answers UNAVAILABLE) is simply not acknowledged.
        if client.put(request).await.is_ok() {
            acked.insert(key, value);
        }
    }
}

async fn assert_acked_readable(client: &mut KvClient<tonic::transport::Channel>, acked: &HashMap<Vec<u8>, Vec<u8>>) {
    let header = Some(RequestHeader { allow_forward: true, ..Default::default() });
    for (key, value) in acked {
        let mut last_error = None;
        for _ in 0..20 {
            match client.get(GetRequest { header, key: key.clone().into(), consistency: 0, max_staleness_ms: 0 }).await
            {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    assert!(reply.found, "acknowledged key {} is gone", String::from_utf8_lossy(key));
                    assert_eq!(&reply.value[..], &value[..], "stale value for {}", String::from_utf8_lossy(key));
                    last_error = None;
                    break;
                }
                Err(status) => {
                    last_error = Some(status);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        assert!(last_error.is_none(), "reading {}: {last_error:?}", String::from_utf8_lossy(key));
    }
}

// Ignored by default, so `cargo test` lists it as skipped with the reason; scripts/e2e-kind.sh
// runs it with --include-ignored.
/// `kubectl port-forward` to the client Service, and a data client through it (the pod it lands
/// on forwards each request to the key's owner: `allow_forward`).
async fn connect_through_port_forward() -> (std::process::Child, KvClient<tonic::transport::Channel>) {
    let forward = Command::new("kubectl")
        .args(["-n", NAMESPACE, "port-forward", &format!("svc/{CLUSTER}"), "17700:7700"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl port-forward starts");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let client = KvClient::connect("http://127.0.0.1:17700").await.expect("port-forward to the client Service");
    (forward, client)
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (kind): run scripts/e2e-kind.sh"]
async fn helm_install_apply_write_scale_out_and_in() {
    assert!(
        cluster_configured(),
        "no KUBECONFIG and no ~/.kube/config: run scripts/e2e-kind.sh on a machine with docker, kind, kubectl and helm"
    );
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/kvfleet");
    let operator_image =
        std::env::var("KVFLEET_OPERATOR_IMAGE").unwrap_or("ghcr.io/kvfleet/kvfleet-operator:0.1.0".into());
    let node_image = std::env::var("KVFLEET_NODE_IMAGE").unwrap_or("ghcr.io/kvfleet/kvfleet-node:0.1.0".into());
    let (repository, tag) = operator_image.rsplit_once(':').expect("KVFLEET_OPERATOR_IMAGE is repository:tag");
    let _cleanup = Cleanup;
    let repo_arg = format!("image.repository={repository}");
    let tag_arg = format!("image.tag={tag}");
    run(
        "helm",
        &[
            "upgrade",
            "--install",
            "kvfleet-e2e",
            chart,
            "-n",
            NAMESPACE,
            "--create-namespace",
            "--wait",
            "--timeout",
            "5m",
            "--set",
            &repo_arg,
            "--set",
            &tag_arg,
            "--set",
            "image.pullPolicy=IfNotPresent",
            "--set",
            "reshardIntervalSeconds=2",
        ],
    );
    let manifest = format!(
        "apiVersion: kvfleet.io/v1alpha1\nkind: KeyValueCluster\nmetadata: {{name: {CLUSTER}}}\nspec:\n  replicas: 3\n  \
         image: {node_image}\n  storage: {{size: 1Gi}}\n  scheduling: {{podAntiAffinity: none}}\n  \
         sharding: {{splitQps: 200, splitSustainSeconds: 5, moveCooldownSeconds: 10}}\n"
    );
    let path = std::env::temp_dir().join("kvfleet-e2e-kvc.yaml");
    std::fs::write(&path, manifest).expect("writing the manifest");
    kubectl(&["apply", "-f", path.to_str().expect("utf-8 temp path")]);
    wait_for("Running", 3, 3, Duration::from_secs(300));

    let (mut forward, mut client) = connect_through_port_forward().await;
    let mut acked = HashMap::new();
    write_round(&mut client, 1, 2000, &mut acked).await;
    assert!(acked.len() > 1900, "only {} of 2000 writes acknowledged", acked.len());

    kubectl(&["patch", "kvc", CLUSTER, "--type=merge", "-p", r#"{"spec":{"replicas":5}}"#]);
    write_round(&mut client, 2, 2000, &mut acked).await;
    wait_for("Running", 5, 5, Duration::from_secs(300));
    assert_acked_readable(&mut client, &acked).await;

    kubectl(&["patch", "kvc", CLUSTER, "--type=merge", "-p", r#"{"spec":{"replicas":3}}"#]);
    write_round(&mut client, 3, 2000, &mut acked).await;
    wait_for("Running", 3, 3, Duration::from_secs(600));
    // The port-forward may have pointed at a pod that went away: reconnect.
    let _ = forward.kill();
    let _ = forward.wait();
    let (mut forward, mut client) = connect_through_port_forward().await;
    assert_acked_readable(&mut client, &acked).await;

    // A spec change (durability) rolled one pod at a time, each drained before it restarts.
    let update = r#"{"spec":{"updateStrategy":{"type":"DrainFirst"},"durability":"async"}}"#;
    kubectl(&["patch", "kvc", CLUSTER, "--type=merge", "-p", update]);
    write_round(&mut client, 4, 2000, &mut acked).await;
    wait_for_update(Duration::from_secs(900));
    wait_for("Running", 3, 3, Duration::from_secs(300));
    let _ = forward.kill();
    let _ = forward.wait();
    let (mut forward, mut client) = connect_through_port_forward().await;
    assert_acked_readable(&mut client, &acked).await;
    let ranges: u32 = jsonpath("{.status.ranges}").parse().expect("status.ranges is a number");
    assert!(ranges >= 1);
    let _ = forward.kill();
    let _ = forward.wait();
}
