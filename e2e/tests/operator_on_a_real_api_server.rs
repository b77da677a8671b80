//! The operator against a real Kubernetes API server (1.20.2, built by scripts/control-plane.sh):
//! the chart installed by Helm's own library, the operator run as the chart's ServiceAccount
//! (a token bound to it, never as admin), `examples/kvc-minimal.yaml` applied. The operator
//! itself must create every object on its first reconciles, with owner references, write the
//! status and Events, and never be refused (403) or fail (5xx) by the real authorizer and
//! server-side apply; deleting the cluster garbage-collects what it owned.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};
use kvfleet_e2e::control_plane::{ControlPlane, free_port};
use kvfleet_e2e::history::HistoryWorkload;
use kvfleet_operator::k8s::crd::KeyValueCluster;

const OPERATOR_NAMESPACE: &str = "kvfleet-system";
const RELEASE: &str = "kvfleet";
/// The chart's ServiceAccount: its full name for the release "kvfleet".
const SERVICE_ACCOUNT: &str = "kvfleet";
const NAMESPACE: &str = "shop";
const CLUSTER: &str = "demo";

fn operator_user() -> String {
    format!("system:serviceaccount:{OPERATOR_NAMESPACE}:{SERVICE_ACCOUNT}")
}

/// `helm install` (or `helm upgrade`) of the chart, with Helm's own library
/// (scripts/chart_install.py). No operator pod (replicaCount 0): there is no kubelet here, the
/// test runs the operator itself.
fn helm(plane: &ControlPlane, action: &str) {
    let python = std::env::var("KVFLEET_PYTHON").unwrap_or_else(|_| {
        panic!(
            "KVFLEET_PYTHON is not set: run scripts/python-venv.sh (./scripts/test.sh does) and export what it prints"
        )
    });
    let kubeconfig = plane.write_kubeconfig("helm.kubeconfig", "kvfleet-test-admin");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/chart_install.py");
    let output = Command::new(python)
        .arg(script)
        .args([kubeconfig.to_str().unwrap(), OPERATOR_NAMESPACE, RELEASE, r#"{"replicaCount": 0}"#, action])
        .output()
        .expect("the chart installer runs");
    assert!(output.status.success(), "helm {action} failed: {}", String::from_utf8_lossy(&output.stderr));
}

fn install_chart(plane: &ControlPlane) {
    helm(plane, "install");
}

/// The admin key the chart generated (the Deployment takes it from this Secret).
fn admin_key(plane: &ControlPlane) -> String {
    let path = plane.dir.path().join("admin-key");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} is written after the chart is installed", path.display()))
}

async fn save_admin_key(plane: &ControlPlane, admin: &Client) {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), OPERATOR_NAMESPACE);
    let secret = secrets.get(&format!("{RELEASE}-admin-key")).await.expect("the chart's admin key Secret");
    let key = secret.data.and_then(|mut d| d.remove("key")).expect("a key");
    std::fs::write(plane.dir.path().join("admin-key"), key.0).expect("write the admin key");
}

/// A token bound to the chart's ServiceAccount, as a pod of the operator would have.
async fn operator_token(admin: &Client, audience: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), OPERATOR_NAMESPACE);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_string()]),
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = accounts.create_token_request(SERVICE_ACCOUNT, &PostParams::default(), &request).await;
    answer.expect("a token for the chart's ServiceAccount").status.and_then(|s| s.token).expect("a token")
}

/// An operator process, as the chart's ServiceAccount, under its own identity (its pod name),
/// logging to `operator-<identity>.log`.
struct Operator {
    child: Child,
    identity: String,
    metrics_port: u16,
}

impl Operator {
    /// As the chart's Deployment runs it: the admin key from the chart's Secret.
    fn start(plane: &ControlPlane, kubeconfig: &Path, identity: &str) -> Self {
        let log =
            std::fs::File::create(plane.dir.path().join(format!("operator-{identity}.log"))).expect("operator log");
        let metrics_port = free_port();
        let child = Command::new(kvfleet_e2e::binary("kvfleet-operator"))
            .arg("run")
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", OPERATOR_NAMESPACE)
            .env("POD_NAME", identity)
            .env("KVFLEET_ADMIN_KEY", admin_key(plane))
            .env("KVFLEET_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
            .env("KVFLEET_RESHARD_INTERVAL_SECS", "1")
            // Pods the stand-in kubelet runs are Ready within seconds; those it cannot run never are.
            .env("KVFLEET_POD_READY_TIMEOUT_SECS", "15")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("operator log"))
            .stderr(log)
            .spawn()
            .expect("the operator starts");
        Operator { child, identity: identity.to_string(), metrics_port }
    }

    /// Its /metrics page.
    async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await else {
            return String::new();
        };
        let request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        let mut page = String::new();
        if stream.write_all(request).await.is_ok() {
            let _ = stream.read_to_string(&mut page).await;
        }
        page
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args([signal, &pid]).status().expect("kill(1)").success());
    }

    fn log(&self, plane: &ControlPlane) -> String {
        std::fs::read_to_string(plane.dir.path().join(format!("operator-{}.log", self.identity))).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of every operator's log.
fn operator_logs(plane: &ControlPlane) -> String {
    let mut logs = String::new();
    for entry in std::fs::read_dir(plane.dir.path()).expect("the control plane's directory").flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("operator-") && name.ends_with(".log") {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            logs.push_str(&format!("== {name} (newest first)\n{}\n", tail.join("\n")));
        }
    }
    logs
}

/// Polls `check` every 500 ms until it answers None; panics with its last answer after `within`.
async fn wait_until(plane: &ControlPlane, within: Duration, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let started = Instant::now();
    loop {
        let Err(pending) = check().await else { return };
        if started.elapsed() > within {
            panic!(
                "after {within:?}: {pending}\nrefused: {:?}\n{}",
                plane.refused_requests(&operator_user()),
                operator_logs(plane)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A `wait_until` check's answer from what is still missing (`None`: nothing, done).
fn pending(missing: Option<String>) -> Result<(), String> {
    missing.map_or(Ok(()), Err)
}

fn owned_by_cluster(meta: &ObjectMeta) -> bool {
    meta.owner_references.iter().flatten().any(|o| o.kind == "KeyValueCluster" && o.name == CLUSTER)
}

/// The control plane with the chart installed and the operator running as its ServiceAccount,
/// and the test namespace created.
struct Installed {
    plane: ControlPlane,
    admin: Client,
    operator: Operator,
}

async fn install() -> Installed {
    let plane = ControlPlane::start(&operator_user());
    let admin = plane.admin().await;
    install_chart(&plane);
    save_admin_key(&plane, &admin).await;
    let token = operator_token(&admin, plane.audience()).await;
    let kubeconfig = plane.write_kubeconfig("operator.kubeconfig", &token);
    let operator = Operator::start(&plane, &kubeconfig, "kvfleet-operator-0");
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let meta = ObjectMeta { name: Some(NAMESPACE.into()), ..Default::default() };
    namespaces
        .create(&PostParams::default(), &Namespace { metadata: meta, ..Default::default() })
        .await
        .expect("namespace");
    Installed { plane, admin, operator }
}

fn example() -> KeyValueCluster {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kvc-minimal.yaml");
    serde_yaml::from_str(&std::fs::read_to_string(path).expect("read the example")).expect("the example parses")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_creates_everything_as_its_service_account() {
    let Installed { plane, admin, operator } = install().await;
    let cluster = example();
    let clusters: Api<KeyValueCluster> = Api::namespaced(admin.clone(), NAMESPACE);
    clusters.create(&PostParams::default(), &cluster).await.expect("apply the example");

    let statefulsets: Api<StatefulSet> = Api::namespaced(admin.clone(), NAMESPACE);
    let services: Api<Service> = Api::namespaced(admin.clone(), NAMESPACE);
    let configmaps: Api<ConfigMap> = Api::namespaced(admin.clone(), NAMESPACE);
    let events: Api<Event> = Api::namespaced(admin.clone(), NAMESPACE);
    // 1.20 serves PodDisruptionBudgets as policy/v1beta1 only.
    let pdb_v1beta1 = ApiResource {
        group: "policy".into(),
        version: "v1beta1".into(),
        api_version: "policy/v1beta1".into(),
        kind: "PodDisruptionBudget".into(),
        plural: "poddisruptionbudgets".into(),
    };
    let budgets: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NAMESPACE, &pdb_v1beta1);
    let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> = Api::namespaced(admin.clone(), NAMESPACE);
    wait_until(&plane, Duration::from_secs(90), async || {
        let sts = statefulsets.get_opt(CLUSTER).await.map_err(|e| e.to_string())?;
        let sts = sts.ok_or("no StatefulSet yet")?;
        if !owned_by_cluster(&sts.metadata) {
            return Err("the StatefulSet is not owned by the cluster".into());
        }
        let services = services.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items;
        let owned_services = services.iter().filter(|s| owned_by_cluster(&s.metadata)).count();
        if owned_services < 2 {
            return Err(format!("{owned_services} of 2 Services"));
        }
        let configmaps = configmaps.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items;
        if !configmaps.iter().any(|c| owned_by_cluster(&c.metadata)) {
            return Err("no ConfigMap".into());
        }
        let pdbs = budgets.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items;
        if !pdbs.iter().any(|p| owned_by_cluster(&p.metadata)) {
            return Err("no PodDisruptionBudget (policy/v1beta1 on 1.20)".into());
        }
        let policy = policies.get_opt(CLUSTER).await.map_err(|e| e.to_string())?;
        if !policy.as_ref().is_some_and(|p| owned_by_cluster(&p.metadata)) {
            return Err("no NetworkPolicy for the nodes' admin port".into());
        }
        let status = clusters.get(CLUSTER).await.map_err(|e| e.to_string())?.status;
        if status.as_ref().and_then(|s| s.phase.as_ref()).is_none() {
            return Err("no status phase".into());
        }
        let events = events.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items;
        if !events.iter().any(|e| e.reason.as_deref() == Some("Created")) {
            return Err("no Created event".into());
        }
        Ok(())
    })
    .await;
    let refused = plane.refused_requests(&operator_user());
    assert!(refused.is_empty(), "the real API server refused the operator: {refused:#?}");

    // No kubelet runs here: the pods never become Ready. Past the bound, the status and a
    // Warning event say which pods and why, in the scheduler's words.
    wait_until(&plane, Duration::from_secs(90), async || {
        let status = clusters.get(CLUSTER).await.map_err(|e| e.to_string())?.status.ok_or("no status")?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready").ok_or("no Ready condition")?;
        let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").ok_or("no Degraded condition")?;
        if ready.reason != "PodsNotReady"
            || !ready.message.contains("demo-0: Unschedulable")
            || degraded.status != "True"
        {
            return Err(format!(
                "Ready: {} {}; Degraded: {} {}",
                ready.reason, ready.message, degraded.status, degraded.message
            ));
        }
        let events = events.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items;
        let warned =
            events.iter().any(|e| e.reason.as_deref() == Some("PodsNotReady") && e.type_.as_deref() == Some("Warning"));
        pending((!warned).then(|| "no PodsNotReady Warning event".to_string()))
    })
    .await;

    // What the API server refuses shows in the status and as a Warning event, with its message:
    // here a namespace quota of one StatefulSet (no schema can foresee one) refuses a second
    // cluster's.
    use k8s_openapi::api::core::v1::ResourceQuota;
    let quotas: Api<ResourceQuota> = Api::namespaced(admin.clone(), NAMESPACE);
    let quota: ResourceQuota = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "one-statefulset" },
        "spec": { "hard": { "count/statefulsets.apps": "1" } }
    }))
    .expect("a quota");
    quotas.create(&PostParams::default(), &quota).await.expect("create the quota");
    wait_until(&plane, Duration::from_secs(60), async || {
        let quota = quotas.get("one-statefulset").await.map_err(|e| e.to_string())?;
        let counted =
            quota.status.and_then(|s| s.used).is_some_and(|used| used.contains_key("count/statefulsets.apps"));
        pending((!counted).then(|| "the quota controller has not counted the StatefulSets yet".to_string()))
    })
    .await;
    let mut bad = example();
    bad.metadata.name = Some("bad".into());
    clusters.create(&PostParams::default(), &bad).await.expect("apply the second cluster");
    wait_until(&plane, Duration::from_secs(60), async || {
        let status = clusters.get("bad").await.map_err(|e| e.to_string())?.status.ok_or("no status")?;
        let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").ok_or("no Degraded condition")?;
        if degraded.status != "True" || degraded.reason != "ApiRefused" {
            return Err(format!("Degraded is {} / {}", degraded.status, degraded.reason));
        }
        if !degraded.message.contains("one-statefulset") {
            return Err(format!("the condition does not carry the API's message: {}", degraded.message));
        }
        let events = events.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items;
        let warned =
            events.iter().any(|e| e.reason.as_deref() == Some("ApiRefused") && e.type_.as_deref() == Some("Warning"));
        pending((!warned).then(|| "no ApiRefused Warning event".to_string()))
    })
    .await;
    quotas.delete("one-statefulset", &DeleteParams::default()).await.expect("delete the quota");
    clusters.delete("bad", &DeleteParams::default()).await.expect("delete the bad cluster");

    let series = format!("cluster=\"{NAMESPACE}/{CLUSTER}\"");
    wait_until(&plane, Duration::from_secs(30), async || {
        let page = operator.metrics().await;
        pending((!page.contains(&series)).then(|| format!("the cluster's resharding loop reports no metrics:\n{page}")))
    })
    .await;
    clusters.delete(CLUSTER, &DeleteParams::default()).await.expect("delete the cluster");
    wait_until(&plane, Duration::from_secs(90), async || {
        let left = statefulsets.get_opt(CLUSTER).await.map_err(|e| e.to_string())?;
        pending(left.map(|_| "the StatefulSet is still there after its cluster was deleted".to_string()))
    })
    .await;
    wait_until(&plane, Duration::from_secs(30), async || {
        let page = operator.metrics().await;
        pending(page.contains(&series).then(|| format!("the deleted cluster's series are still on /metrics:\n{page}")))
    })
    .await;

    // `helm upgrade` brings an outdated CRD to the chart's (Helm never upgrades crds/; the chart
    // templates it): here, one as an older release had it, without a printer column.
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let name = "keyvalueclusters.kvfleet.io";
    let columns = |crd: &CustomResourceDefinition| {
        crd.spec.versions[0].additional_printer_columns.iter().flatten().map(|c| c.name.clone()).collect::<Vec<_>>()
    };
    let mut outdated = crds.get(name).await.expect("the chart installed the CRD");
    let current = columns(&outdated);
    assert!(current.contains(&"Ranges".to_string()), "{current:?}");
    outdated.spec.versions[0].additional_printer_columns.as_mut().expect("columns").retain(|c| c.name != "Ranges");
    crds.replace(name, &PostParams::default(), &outdated).await.expect("make the CRD outdated");
    helm(&plane, "upgrade");
    let upgraded = crds.get(name).await.expect("the CRD");
    assert_eq!(columns(&upgraded), current, "helm upgrade did not bring the CRD up to date");
    let keep = upgraded.metadata.annotations.unwrap_or_default().get("helm.sh/resource-policy").cloned();
    assert_eq!(keep.as_deref(), Some("keep"), "helm uninstall must not delete the CRD (and every cluster)");
}

/// Runs `body` where pods can run: inside a private mount namespace whose /etc/hosts resolves
/// the pods' DNS names (the test re-executes itself there), on a 2-thread runtime.
fn with_pods(test: &str, body: impl AsyncFnOnce()) {
    let dir = tempfile::tempdir().unwrap();
    if let Some(status) = kvfleet_e2e::kubelet::in_private_hosts_namespace(test, &dir.path().join("hosts")) {
        assert!(status.success(), "the test failed inside its mount namespace: {status}");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(body());
}

/// A client of the first `pods` pods, and a read/write history workload on `keys` keys.
fn history_workload(pods: usize, keys: usize, writers: usize) -> (kvfleet_client::Client, HistoryWorkload) {
    let mut config = kvfleet_client::ClientConfig::new(pod_addresses(pods));
    config.deadline = Duration::from_secs(60);
    let client = kvfleet_client::Client::new(config).expect("a client");
    let keys = (0..keys).map(|i| bytes::Bytes::from(format!("user{i:04}"))).collect();
    let workload = HistoryWorkload::start(client.clone(), keys, writers, 2);
    (client, workload)
}

/// Ends the workload; fails on a history violation, a lost or stale acknowledged write, fewer
/// than `min_writes` writes, or any request the API server refused the operator.
async fn history_held(
    plane: &ControlPlane,
    workload: HistoryWorkload,
    client: &kvfleet_client::Client,
    min_writes: u64,
) -> kvfleet_e2e::history::Report {
    let (report, space) = workload.finish().await;
    assert!(
        report.violations.is_empty(),
        "history violated: {:?}",
        &report.violations[..report.violations.len().min(5)]
    );
    let wrong = space.verify_final(client).await;
    assert!(wrong.is_empty(), "acknowledged writes lost or stale: {:?}", &wrong[..wrong.len().min(5)]);
    assert!(report.writes > min_writes, "too little load: {report:?}");
    let refused = plane.refused_requests(&operator_user());
    assert!(refused.is_empty(), "the real API server refused the operator: {refused:#?}");
    report
}

/// The uids of the test namespace's pods, sorted.
async fn pod_uids(admin: &Client) -> Vec<String> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), NAMESPACE);
    let listed = pods.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    let mut uids: Vec<String> = listed.iter().filter_map(|p| p.uid()).collect();
    uids.sort();
    uids
}

/// The pods' DNS names (`demo-0.demo-nodes.shop.svc:7700`): the client's seeds.
fn pod_addresses(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{CLUSTER}-{i}.{CLUSTER}-nodes.{NAMESPACE}.svc:7700")).collect()
}

async fn wait_for_phase(plane: &ControlPlane, clusters: &Api<KeyValueCluster>, ready: i32, within: Duration) {
    wait_until(plane, within, async || {
        let status = clusters.get(CLUSTER).await.map_err(|e| e.to_string())?.status.ok_or("no status")?;
        let running = status.phase == Some(kvfleet_operator::k8s::crd::Phase::Running);
        if running && status.ready_replicas == ready && status.replicas == ready {
            return Ok(());
        }
        // Where each pod is: scheduled onto which node, in which phase (a pod never scheduled
        // points at the scheduler or the volume claims, not the operator).
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(clusters.clone().into_client(), NAMESPACE);
        let pods: Vec<String> = pods
            .list(&ListParams::default())
            .await
            .map(|list| {
                list.items
                    .iter()
                    .map(|p| {
                        let node =
                            p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_else(|| "unscheduled".into());
                        let phase = p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                        format!("{} on {node} {phase}", p.name_any())
                    })
                    .collect()
            })
            .unwrap_or_default();
        Err(format!(
            "phase {:?}, {}/{} ready, {} ranges; conditions {:?}; pods {pods:?}",
            status.phase,
            status.ready_replicas,
            status.replicas,
            status.ranges,
            status.conditions.iter().map(|c| format!("{}={} {}", c.type_, c.status, c.message)).collect::<Vec<_>>()
        ))
    })
    .await;
}

/// The cluster for real: pods run as node processes (the stand-in kubelet), the operator brings
/// the cluster to Running with every range replicated on three pods, and a scale 3 -> 5 -> 3
/// under a read/write load (replicas moved onto the new pods, then drained off them) loses no
/// acknowledged write and never serves a stale read.
#[test]
fn a_cluster_runs_and_scales_without_losing_a_write() {
    with_pods("a_cluster_runs_and_scales_without_losing_a_write", async || {
        let Installed { plane, admin, operator: _operator } = install().await;
        let _kubelet = kvfleet_e2e::kubelet::Kubelet::start(admin.clone(), NAMESPACE, 5, plane.dir.path()).await;
        let clusters: Api<KeyValueCluster> = Api::namespaced(admin.clone(), NAMESPACE);
        // Quick resharding, so that ranges split and spread within seconds of load.
        let mut cluster = example();
        cluster.spec.sharding = serde_json::from_value(serde_json::json!({
            "splitQps": 100, "splitSustainSeconds": 5, "moveCooldownSeconds": 10, "maxConcurrentMoves": 2
        }))
        .expect("a sharding spec");
        clusters.create(&PostParams::default(), &cluster).await.expect("apply the example");
        wait_for_phase(&plane, &clusters, 3, Duration::from_secs(180)).await;

        // Only the operator (and the cluster's own pods) may administer the nodes.
        let pod = &pod_addresses(1)[0];
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{pod}")).unwrap().connect().await.unwrap();
        let mut stranger = kvfleet_proto::v1::admin_client::AdminClient::new(channel);
        let refused =
            stranger.bootstrap(kvfleet_proto::v1::BootstrapRequest::default()).await.expect_err("no admin token");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
        assert!(refused.message().contains("admin token"), "{}", refused.message());
        // Even with the cluster's token, changes go to the admin port (which the cluster's
        // NetworkPolicy opens to the operator alone), not the data port.
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), NAMESPACE);
        let secret = secrets.get(&format!("{CLUSTER}-admin-token")).await.expect("the cluster's admin token Secret");
        let token = secret.data.and_then(|mut d| d.remove("token")).expect("a token").0;
        let mut request = tonic::Request::new(kvfleet_proto::v1::BootstrapRequest::default());
        let bearer = format!("Bearer {}", String::from_utf8(token).expect("ASCII"));
        request.metadata_mut().insert("authorization", bearer.parse().expect("a header"));
        let refused = stranger.bootstrap(request).await.expect_err("not on the data port");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
        assert!(refused.message().contains("admin port (7701)"), "{}", refused.message());

        let (client, workload) = history_workload(5, 200, 4);
        tokio::time::sleep(Duration::from_secs(3)).await;

        let scale = |replicas: i32| serde_json::json!({ "spec": { "replicas": replicas } });
        let patch = kube::api::Patch::Merge(scale(5));
        clusters.patch(CLUSTER, &kube::api::PatchParams::default(), &patch).await.expect("scale out");
        wait_for_phase(&plane, &clusters, 5, Duration::from_secs(180)).await;
        // The new pods take ranges (the load spreads), so that the scale-in has to drain them.
        wait_until(&plane, Duration::from_secs(120), async || {
            let status = clusters.get(CLUSTER).await.map_err(|e| e.to_string())?.status.ok_or("no status")?;
            let new_pods: u32 =
                status.pods.iter().filter(|p| p.name.ends_with("-3") || p.name.ends_with("-4")).map(|p| p.ranges).sum();
            pending((new_pods == 0).then(|| format!("the new pods hold no range yet: {:?}", status.pods)))
        })
        .await;
        let patch = kube::api::Patch::Merge(scale(3));
        clusters.patch(CLUSTER, &kube::api::PatchParams::default(), &patch).await.expect("scale in");
        wait_for_phase(&plane, &clusters, 3, Duration::from_secs(300)).await;
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), NAMESPACE);
        wait_until(&plane, Duration::from_secs(60), async || {
            let listed = pods.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
            let names: Vec<String> = listed.items.iter().map(|p| p.name_any()).collect();
            pending((names.len() != 3).then(|| format!("pods after the scale-in: {names:?}")))
        })
        .await;
        let ranges = clusters.get(CLUSTER).await.expect("the cluster").status.expect("a status").ranges;
        assert!(ranges >= 2, "the load split the key space: {ranges} ranges");
        // Replicated (spec.replication.factor defaults to 3): every range has a replica on each
        // of the three pods left, and none is short of one.
        wait_until(&plane, Duration::from_secs(60), async || {
            let status = clusters.get(CLUSTER).await.map_err(|e| e.to_string())?.status.ok_or("no status")?;
            let complete = status.under_replicated_ranges == 0
                && status.pods.len() == 3
                && status.pods.iter().all(|p| p.ranges == status.ranges);
            let pods: Vec<(String, u32)> = status.pods.iter().map(|p| (p.name.clone(), p.ranges)).collect();
            pending((!complete).then(|| {
                format!(
                    "{} ranges, {} under-replicated, replicas per pod {pods:?}",
                    status.ranges, status.under_replicated_ranges
                )
            }))
        })
        .await;

        let report = history_held(&plane, workload, &client, 100).await;

        // Idle: what the operator asks of the API server in a minute of a 3-pod cluster doing
        // nothing (resharding rounds every second here; every 5 s by default).
        tokio::time::sleep(Duration::from_secs(15)).await;
        let stamp = || k8s_openapi::jiff::Timestamp::now().to_string();
        let from = stamp();
        tokio::time::sleep(Duration::from_secs(60)).await;
        let idle = plane.requests_between(&operator_user(), &from, &stamp());
        println!("an idle 3-pod cluster, API requests in one minute: {idle:?}");
        let writes: usize = idle
            .iter()
            .filter(|(call, _)| !call.starts_with("get ") && !call.starts_with("list ") && !call.starts_with("watch "))
            .filter(|(call, _)| !call.ends_with(" leases"))
            .map(|(_, count)| count)
            .sum();
        assert!(writes <= 8, "an idle cluster should not be written to (a re-apply every 5 minutes at most): {idle:?}");
        println!(
            "3 -> 5 -> 3: {} writes, {} reads, {} client errors",
            report.writes,
            report.reads,
            report.errors.len()
        );
    });
}

async fn wait_for_exit(operator: &mut Operator, within: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = operator.child.try_wait().expect("wait") {
            return Some(status);
        }
        if started.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader Lease as the API server has it: (holder, epoch = transitions + 1).
async fn lease_holder(admin: &Client) -> Option<(String, u64)> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin.clone(), OPERATOR_NAMESPACE);
    let spec = leases.get_opt("kvfleet-operator").await.ok()??.spec?;
    Some((spec.holder_identity?, spec.lease_transitions.unwrap_or(0) as u64 + 1))
}

/// Waits until `identity` holds the leader Lease.
async fn wait_for_holder(plane: &ControlPlane, admin: &Client, identity: &str, within: Duration) {
    wait_until(plane, within, async || {
        let holder = lease_holder(admin).await;
        pending((holder.as_ref().map(|h| h.0.as_str()) != Some(identity)).then(|| format!("lease: {holder:?}")))
    })
    .await;
}

/// The highest operator epoch each pod's node has seen.
async fn node_epochs(count: usize) -> Vec<u64> {
    let mut epochs = Vec::new();
    for address in pod_addresses(count) {
        let answer = async {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{address}")).ok()?.connect().await.ok()?;
            let mut admin = kvfleet_proto::v1::admin_client::AdminClient::new(channel);
            let listed = admin.list_ranges(kvfleet_proto::v1::ListRangesRequest {}).await.ok()?;
            Some(listed.into_inner().operator_epoch)
        };
        epochs.push(tokio::time::timeout(Duration::from_secs(5), answer).await.ok().flatten().unwrap_or(0));
    }
    epochs
}

/// Two operator replicas: only the Lease holder acts. SIGKILL the leader: the standby takes over
/// within the lease and drives the cluster. SIGSTOP the new leader past its lease: a third
/// replica takes over and fences every node with its newer epoch; the stalled one, resumed,
/// makes no write at all and exits. Stall the third one's API connection: it stops before a
/// fourth can take over. Under a read/write load throughout: nothing acknowledged is lost, no
/// read goes back in time.
#[test]
fn only_the_leader_acts_and_a_stalled_leader_is_fenced_off() {
    with_pods("only_the_leader_acts_and_a_stalled_leader_is_fenced_off", async || {
        let Installed { plane, admin, operator: first } = install().await;
        let kubeconfig = plane.dir.path().join("operator.kubeconfig");
        wait_for_holder(&plane, &admin, "kvfleet-operator-0", Duration::from_secs(30)).await;
        let second = Operator::start(&plane, &kubeconfig, "kvfleet-operator-1");
        let _kubelet = kvfleet_e2e::kubelet::Kubelet::start(admin.clone(), NAMESPACE, 4, plane.dir.path()).await;
        let clusters: Api<KeyValueCluster> = Api::namespaced(admin.clone(), NAMESPACE);
        clusters.create(&PostParams::default(), &example()).await.expect("apply the example");
        wait_for_phase(&plane, &clusters, 3, Duration::from_secs(180)).await;

        let (client, workload) = history_workload(4, 100, 3);

        // Only the leader acted: the standby wrote nothing (the audit log names each replica).
        assert!(!plane.writes_by_agent("(kvfleet-operator-0)").is_empty(), "the leader built the cluster");
        let standby_writes = plane.writes_by_agent("(kvfleet-operator-1)");
        assert!(standby_writes.is_empty(), "the standby acted: {standby_writes:?}");
        assert!(second.log(&plane).contains("standing by"), "{}", second.log(&plane));

        // SIGKILL the leader: the standby takes over within the lease and drives the cluster.
        first.signal("-KILL");
        let killed = Instant::now();
        wait_for_holder(&plane, &admin, "kvfleet-operator-1", Duration::from_secs(30)).await;
        let takeover = killed.elapsed();
        assert!(takeover >= Duration::from_secs(14), "taken over after {takeover:?}, before the lease could expire");
        let patch = kube::api::Patch::Merge(serde_json::json!({ "spec": { "replicas": 4 } }));
        clusters.patch(CLUSTER, &kube::api::PatchParams::default(), &patch).await.expect("scale out");
        wait_for_phase(&plane, &clusters, 4, Duration::from_secs(180)).await;
        let (_, second_epoch) = lease_holder(&admin).await.expect("a lease");

        // SIGSTOP the new leader: it cannot renew, and a third replica takes over. The third
        // reaches the API server through a proxy, stalled below.
        let proxy = kvfleet_e2e::control_plane::StallingProxy::start(&plane.server).await;
        let token = operator_token(&admin, plane.audience()).await;
        let proxied = plane.write_kubeconfig_via("operator-proxied.kubeconfig", &token, &proxy.url);
        let mut third = Operator::start(&plane, &proxied, "kvfleet-operator-2");
        tokio::time::sleep(Duration::from_secs(3)).await;
        second.signal("-STOP");
        wait_for_holder(&plane, &admin, "kvfleet-operator-2", Duration::from_secs(40)).await;
        let (_, third_epoch) = lease_holder(&admin).await.expect("a lease");
        assert!(third_epoch > second_epoch, "a takeover starts a newer epoch: {second_epoch} -> {third_epoch}");
        // The new leader's first round fences every node.
        wait_until(&plane, Duration::from_secs(30), async || {
            let epochs = node_epochs(4).await;
            pending(
                epochs.iter().any(|e| *e != third_epoch).then(|| format!("node epochs {epochs:?}, want {third_epoch}")),
            )
        })
        .await;

        // Resumed, the stalled replica writes nothing and exits.
        let before = plane.writes_by_agent("(kvfleet-operator-1)");
        second.signal("-CONT");
        let mut second = second;
        let exited = wait_for_exit(&mut second, Duration::from_secs(20)).await;
        assert!(
            exited.is_some_and(|s| !s.success()),
            "the deposed replica must exit: {exited:?}\n{}",
            second.log(&plane)
        );
        let after = plane.writes_by_agent("(kvfleet-operator-1)");
        assert_eq!(after, before, "the deposed replica wrote after it was resumed");
        // It finds its term over by its own clock, or the lease taken: either way it steps down.
        let log = second.log(&plane);
        assert!(log.contains("lost the lease") || log.contains("could not renew the lease in time"), "{log}");

        // Stall the leader's API connection (it keeps running and reaching the nodes): it must
        // stop before a standby can take over.
        let fourth = Operator::start(&plane, &kubeconfig, "kvfleet-operator-3");
        tokio::time::sleep(Duration::from_secs(3)).await;
        proxy.stall(true);
        let stalled = Instant::now();
        let exited = wait_for_exit(&mut third, Duration::from_secs(30)).await;
        let stopped_after = stalled.elapsed();
        assert!(exited.is_some(), "a leader cut off from the API server must stop\n{}", third.log(&plane));
        assert!(third.log(&plane).contains("could not renew the lease in time"), "{}", third.log(&plane));
        wait_for_holder(&plane, &admin, "kvfleet-operator-3", Duration::from_secs(40)).await;
        let taken_over_after = stalled.elapsed();
        assert!(
            stopped_after < taken_over_after,
            "the cut-off leader stopped {stopped_after:?} after the stall, the standby took over after {taken_over_after:?}"
        );

        // The fourth replica drives the cluster: scale back to 3.
        let patch = kube::api::Patch::Merge(serde_json::json!({ "spec": { "replicas": 3 } }));
        clusters.patch(CLUSTER, &kube::api::PatchParams::default(), &patch).await.expect("scale in");
        wait_for_phase(&plane, &clusters, 3, Duration::from_secs(300)).await;
        assert!(!plane.writes_by_agent("(kvfleet-operator-3)").is_empty(), "the new leader acts");

        history_held(&plane, workload, &client, 50).await;
        drop(fourth);
        println!(
            "takeover after SIGKILL: {takeover:?}; epochs {second_epoch} -> {third_epoch}; API stalled: the leader \
             stopped after {stopped_after:?}, the standby took over after {taken_over_after:?}"
        );
    });
}

/// A DrainFirst update for real: a spec change that restarts every pod (here the durability,
/// which is in the node configuration the pod template carries a hash of). The operator drains
/// each pod before deleting it, the StatefulSet controller recreates it at the new revision, one
/// pod at a time, under a read/write load that loses nothing and never reads back in time.
#[test]
fn a_drain_first_update_restarts_every_pod_without_losing_a_write() {
    with_pods("a_drain_first_update_restarts_every_pod_without_losing_a_write", async || {
        let Installed { plane, admin, operator: _operator } = install().await;
        let _kubelet = kvfleet_e2e::kubelet::Kubelet::start(admin.clone(), NAMESPACE, 3, plane.dir.path()).await;
        let clusters: Api<KeyValueCluster> = Api::namespaced(admin.clone(), NAMESPACE);
        let mut cluster = example();
        cluster.spec.update_strategy = serde_json::from_value(serde_json::json!({"type": "DrainFirst"})).unwrap();
        cluster.spec.sharding = serde_json::from_value(serde_json::json!({"moveCooldownSeconds": 0})).unwrap();
        clusters.create(&PostParams::default(), &cluster).await.expect("apply the cluster");
        wait_for_phase(&plane, &clusters, 3, Duration::from_secs(180)).await;
        let before = pod_uids(&admin).await;
        assert_eq!(before.len(), 3);

        let (client, workload) = history_workload(3, 100, 3);
        tokio::time::sleep(Duration::from_secs(3)).await;

        let statefulsets: Api<StatefulSet> = Api::namespaced(admin.clone(), NAMESPACE);
        let revision = |sts: StatefulSet| sts.status.and_then(|s| s.update_revision);
        let old_revision = revision(statefulsets.get(CLUSTER).await.expect("the StatefulSet"));
        let patch = kube::api::Patch::Merge(serde_json::json!({ "spec": { "durability": "async" } }));
        clusters.patch(CLUSTER, &kube::api::PatchParams::default(), &patch).await.expect("change the durability");
        wait_until(&plane, Duration::from_secs(420), async || {
            let status = statefulsets.get(CLUSTER).await.map_err(|e| e.to_string())?.status.ok_or("no status")?;
            // (1.20 never moves currentRevision forward under OnDelete: updated pods are counted.)
            let done = status.update_revision.is_some()
                && status.update_revision != old_revision
                && status.updated_replicas == Some(3)
                && status.ready_replicas == Some(3);
            pending((!done).then(|| format!("StatefulSet status {status:?}")))
        })
        .await;
        wait_for_phase(&plane, &clusters, 3, Duration::from_secs(120)).await;
        let after = pod_uids(&admin).await;
        assert!(after.iter().all(|uid| !before.contains(uid)), "every pod was replaced: {before:?} -> {after:?}");

        let report = history_held(&plane, workload, &client, 50).await;
        println!(
            "DrainFirst update of 3 pods: {} writes, {} reads, {} client errors",
            report.writes,
            report.reads,
            report.errors.len()
        );
    });
}

/// Volume growth for real: with a storage class that allows expansion, growing
/// `spec.storage.size` grows every pod's claim, then replaces the StatefulSet (orphaned, created
/// again with the new claim template), and no pod restarts; under a read/write load.
#[test]
fn growing_the_volumes_replaces_the_statefulset_without_restarting_a_pod() {
    with_pods("growing_the_volumes_replaces_the_statefulset_without_restarting_a_pod", async || {
        let Installed { plane, admin, operator: _operator } = install().await;
        use k8s_openapi::api::storage::v1::StorageClass;
        let classes: Api<StorageClass> = Api::all(admin.clone());
        let class = StorageClass {
            metadata: ObjectMeta { name: Some("expandable".into()), ..Default::default() },
            provisioner: "kvfleet.test/stand-in-kubelet".into(),
            allow_volume_expansion: Some(true),
            ..Default::default()
        };
        classes.create(&PostParams::default(), &class).await.expect("a storage class that allows expansion");
        let _kubelet = kvfleet_e2e::kubelet::Kubelet::start(admin.clone(), NAMESPACE, 3, plane.dir.path()).await;
        let clusters: Api<KeyValueCluster> = Api::namespaced(admin.clone(), NAMESPACE);
        let mut cluster = example();
        cluster.spec.storage.size = "1Gi".into();
        cluster.spec.storage.storage_class_name = Some("expandable".into());
        clusters.create(&PostParams::default(), &cluster).await.expect("apply the cluster");
        wait_for_phase(&plane, &clusters, 3, Duration::from_secs(180)).await;
        let before = pod_uids(&admin).await;
        let statefulsets: Api<StatefulSet> = Api::namespaced(admin.clone(), NAMESPACE);
        let old_uid = statefulsets.get(CLUSTER).await.expect("the StatefulSet").uid();

        let (client, workload) = history_workload(3, 100, 3);
        tokio::time::sleep(Duration::from_secs(2)).await;

        let patch = kube::api::Patch::Merge(serde_json::json!({ "spec": { "storage": { "size": "2Gi" } } }));
        clusters.patch(CLUSTER, &kube::api::PatchParams::default(), &patch).await.expect("grow the volumes");
        let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> = Api::namespaced(admin.clone(), NAMESPACE);
        wait_until(&plane, Duration::from_secs(120), async || {
            let sts = statefulsets.get_opt(CLUSTER).await.map_err(|e| e.to_string())?;
            let sts = sts.ok_or("no StatefulSet (being replaced)")?;
            if sts.uid() == old_uid {
                return Err("the StatefulSet was not replaced yet".into());
            }
            let asked = |sts: &StatefulSet| {
                let template = sts.spec.volume_claim_templates.as_ref()?.first()?.clone();
                Some(template.spec?.resources?.requests?.get("storage")?.0.clone())
            };
            let size = asked(&sts).ok_or("the new StatefulSet's claim template asks no storage size")?;
            if size != "2Gi" {
                return Err(format!("the claim template asks {size}"));
            }
            let listed = claims.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items;
            let sizes: Vec<String> = listed
                .iter()
                .filter_map(|c| {
                    c.spec.as_ref()?.resources.as_ref()?.requests.as_ref()?.get("storage").map(|q| q.0.clone())
                })
                .collect();
            pending((sizes.len() != 3 || sizes.iter().any(|s| s != "2Gi")).then(|| format!("claims ask {sizes:?}")))
        })
        .await;
        wait_for_phase(&plane, &clusters, 3, Duration::from_secs(120)).await;
        assert_eq!(pod_uids(&admin).await, before, "no pod restarted");

        let report = history_held(&plane, workload, &client, 0).await;
        println!(
            "volumes grown 1Gi -> 2Gi: {} writes, {} client errors, no pod restarted",
            report.writes,
            report.errors.len()
        );
    });
}
