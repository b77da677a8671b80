//! A stand-in kubelet for the test control plane (no container runtime can run here): it
//! registers Nodes and keeps their heartbeats, binds a PersistentVolume (a local directory) to
//! every claim, and runs each Pod the scheduler puts on its Nodes as a real `kvfleet-node`
//! process with the Pod's environment (ConfigMaps and field references resolved), on a loopback
//! address of its own. It reports the Pod Running with that podIP, Ready while the node's
//! `/readyz` answers, stops the process (SIGTERM, then SIGKILL) when the Pod is deleted, and
//! confirms the deletion. Pod DNS names (`<pod>.<subdomain>.<namespace>.svc`) are written to a
//! hosts file; processes see it as /etc/hosts inside a private mount namespace
//! (`in_private_hosts_namespace`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, HostPathVolumeSource, Node, NodeAddress, NodeCondition, NodeStatus, ObjectReference, PersistentVolume,
    PersistentVolumeClaim, PersistentVolumeSpec, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use parking_lot::Mutex;

/// The environment variable that marks a process as already inside the private namespace (its
/// value: the hosts file bound over /etc/hosts).
const NAMESPACE_ENV: &str = "KVFLEET_TEST_HOSTS_FILE";

/// Runs `test` (this test binary's test of that name) again inside a private mount namespace in
/// which `hosts` is /etc/hosts, so that the pods' DNS names resolve for the operator and the
/// nodes the test starts. In the parent: returns the child's exit status. Inside: binds the
/// file and returns None, and the caller runs the test body.
pub fn in_private_hosts_namespace(test: &str, hosts: &Path) -> Option<ExitStatus> {
    if let Some(bound) = std::env::var_os(NAMESPACE_ENV) {
        let status = Command::new("mount").arg("--bind").arg(&bound).arg("/etc/hosts").status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "cannot bind {} over /etc/hosts in the private mount namespace",
            PathBuf::from(bound).display()
        );
        return None;
    }
    std::fs::write(hosts, "127.0.0.1 localhost\n").expect("write the hosts file");
    let exe = std::env::current_exe().expect("the test binary");
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(NAMESPACE_ENV, hosts)
        .status()
        .expect("unshare(1) runs (util-linux; needs CAP_SYS_ADMIN, as root)");
    Some(status)
}

/// The path of the hosts file this process sees as /etc/hosts (inside the namespace).
pub fn hosts_file() -> PathBuf {
    PathBuf::from(std::env::var_os(NAMESPACE_ENV).expect("inside in_private_hosts_namespace"))
}

fn now() -> Time {
    Time(Timestamp::now())
}

struct RunningPod {
    uid: String,
    ip: String,
    metrics_port: u16,
    child: Child,
    ready: bool,
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Kubelet {
    client: Client,
    namespace: String,
    nodes: Vec<String>,
    dir: PathBuf,
    pods: Mutex<HashMap<String, RunningPod>>,
    /// Pod name -> loopback address, stable across restarts of the pod.
    addresses: Mutex<BTreeMap<String, String>>,
    /// Pod name -> DNS names.
    names: Mutex<BTreeMap<String, Vec<String>>>,
    node_binary: PathBuf,
}

impl Kubelet {
    /// Registers `nodes` Nodes and starts serving the Pods of `namespace` scheduled onto them.
    /// Everything stops when the returned handle is dropped.
    pub async fn start(client: Client, namespace: &str, nodes: usize, dir: &Path) -> KubeletHandle {
        let kubelet = Arc::new(Kubelet {
            client,
            namespace: namespace.to_string(),
            nodes: (0..nodes).map(|i| format!("test-node-{i}")).collect(),
            dir: dir.to_path_buf(),
            pods: Mutex::new(HashMap::new()),
            addresses: Mutex::new(BTreeMap::new()),
            names: Mutex::new(BTreeMap::new()),
            node_binary: crate::binary("kvfleet-node"),
        });
        for node in &kubelet.nodes {
            kubelet.register(node).await;
        }
        let task = tokio::spawn({
            let kubelet = kubelet.clone();
            async move {
                let mut tick = 0u64;
                loop {
                    if tick.is_multiple_of(20) {
                        kubelet.heartbeat().await;
                    }
                    kubelet.bind_claims().await;
                    kubelet.sync_pods().await;
                    tick += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        KubeletHandle { kubelet, task }
    }

    async fn register(&self, name: &str) {
        let capacity = BTreeMap::from([
            ("cpu".to_string(), Quantity("16".into())),
            ("memory".to_string(), Quantity("64Gi".into())),
            ("pods".to_string(), Quantity("110".into())),
            ("ephemeral-storage".to_string(), Quantity("100Gi".into())),
        ]);
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([("kubernetes.io/hostname".to_string(), name.to_string())])),
                ..Default::default()
            },
            spec: None,
            status: Some(NodeStatus {
                capacity: Some(capacity.clone()),
                allocatable: Some(capacity),
                conditions: Some(vec![ready_condition()]),
                addresses: Some(vec![NodeAddress { address: "127.0.0.1".into(), type_: "InternalIP".into() }]),
                ..Default::default()
            }),
        };
        let nodes: Api<Node> = Api::all(self.client.clone());
        nodes.create(&PostParams::default(), &node).await.expect("register a Node");
    }

    /// Node status and Lease renewals (the node lifecycle controller evicts after 40 s without).
    async fn heartbeat(&self) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        for name in &self.nodes {
            let status = serde_json::json!({ "status": { "conditions": [ready_condition()] } });
            let _ = nodes.patch_status(name, &PatchParams::default(), &Patch::Strategic(&status)).await;
            let lease = Lease {
                metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(name.clone()),
                    lease_duration_seconds: Some(40),
                    renew_time: Some(MicroTime(Timestamp::now())),
                    ..Default::default()
                }),
            };
            let apply = PatchParams::apply("kvfleet-test-kubelet").force();
            let _ = leases
                .patch(
                    name,
                    &apply,
                    &Patch::Apply(&kvfleet_operator::k8s::build::typed_json(&lease).expect("a Lease as JSON")),
                )
                .await;
        }
    }

    /// A PersistentVolume (a local directory) pre-bound to every claim without one.
    async fn bind_claims(&self) {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &self.namespace);
        let volumes: Api<PersistentVolume> = Api::all(self.client.clone());
        let Ok(list) = claims.list(&ListParams::default()).await else { return };
        for claim in list.items {
            let spec = claim.spec.clone().unwrap_or_default();
            if spec.volume_name.is_some() {
                continue;
            }
            let name = format!("pv-{}-{}", self.namespace, claim.name_any());
            let path = self.volume_dir(&claim.name_any());
            std::fs::create_dir_all(&path).expect("create a volume directory");
            let size = spec
                .resources
                .and_then(|r| r.requests)
                .and_then(|r| r.get("storage").cloned())
                .unwrap_or(Quantity("1Gi".into()));
            let volume = PersistentVolume {
                metadata: ObjectMeta { name: Some(name), ..Default::default() },
                spec: Some(PersistentVolumeSpec {
                    capacity: Some(BTreeMap::from([("storage".to_string(), size)])),
                    access_modes: spec.access_modes.clone(),
                    host_path: Some(HostPathVolumeSource { path: path.display().to_string(), type_: None }),
                    claim_ref: Some(ObjectReference {
                        namespace: Some(self.namespace.clone()),
                        name: Some(claim.name_any()),
                        uid: claim.uid(),
                        ..Default::default()
                    }),
                    persistent_volume_reclaim_policy: Some("Retain".into()),
                    storage_class_name: spec.storage_class_name.clone(),
                    ..Default::default()
                }),
                status: None,
            };
            // Already created (the claim is binding): fine.
            let _ = volumes.create(&PostParams::default(), &volume).await;
        }
    }

    fn volume_dir(&self, claim: &str) -> PathBuf {
        self.dir.join("volumes").join(&self.namespace).join(claim)
    }

    fn address_of(&self, pod: &str) -> String {
        let mut addresses = self.addresses.lock();
        let next = addresses.len() + 1;
        // A subnet of 127/8 per process: kubelets of tests running at once never share an address
        // (their pods are named alike; a shared address would mix two clusters up).
        let pid = std::process::id();
        let subnet = format!("127.{}.{}", 1 + (pid >> 8) % 254, pid % 256);
        addresses.entry(pod.to_string()).or_insert_with(|| format!("{subnet}.{next}")).clone()
    }

    /// Rewrites the hosts file in place (a bind mount follows the inode, not the name).
    fn write_hosts(&self) {
        let addresses = self.addresses.lock().clone();
        let names = self.names.lock().clone();
        let mut text = String::from("127.0.0.1 localhost\n");
        for (pod, ip) in &addresses {
            for name in names.get(pod).into_iter().flatten() {
                text.push_str(&format!("{ip} {name}\n"));
            }
        }
        std::fs::write(hosts_file(), text).expect("rewrite the hosts file");
    }

    async fn sync_pods(&self) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let Ok(list) = pods.list(&ListParams::default()).await else { return };
        let mut seen = Vec::new();
        for pod in list.items {
            let name = pod.name_any();
            let uid = pod.uid().unwrap_or_default();
            let on_our_node =
                pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some_and(|n| self.nodes.contains(n));
            if !on_our_node {
                continue;
            }
            if pod.metadata.deletion_timestamp.is_some() {
                self.stop(&name).await;
                let force = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
                let _ = pods.delete(&name, &force).await;
                continue;
            }
            seen.push(name.clone());
            let stale = self.pods.lock().get(&name).is_some_and(|p| p.uid != uid);
            if stale {
                self.stop(&name).await;
            }
            let running = self.pods.lock().contains_key(&name);
            if !running {
                match self.run(&pod).await {
                    Ok(started) => {
                        self.pods.lock().insert(name.clone(), started);
                    }
                    Err(why) => {
                        eprintln!("stand-in kubelet: cannot run pod {name}: {why}");
                        continue;
                    }
                }
            }
            self.report(&pods, &pod).await;
        }
        let gone: Vec<String> = self.pods.lock().keys().filter(|n| !seen.contains(n)).cloned().collect();
        for name in gone {
            self.stop(&name).await;
        }
    }

    /// Starts the pod's node process with its resolved environment.
    async fn run(&self, pod: &Pod) -> Result<RunningPod, String> {
        let name = pod.name_any();
        let spec = pod.spec.as_ref().ok_or("no spec")?;
        let container = spec.containers.first().ok_or("no container")?;
        let ip = self.address_of(&name);
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for source in container.env_from.iter().flatten() {
            if let Some(reference) = &source.config_map_ref {
                let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
                let map = maps.get(&reference.name).await.map_err(|e| format!("ConfigMap {}: {e}", reference.name))?;
                env.extend(map.data.unwrap_or_default());
            }
        }
        for var in container.env.iter().flatten() {
            let value = if let Some(value) = &var.value {
                expand(value, &env)
            } else if let Some(selector) = var.value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()) {
                let secrets: Api<k8s_openapi::api::core::v1::Secret> =
                    Api::namespaced(self.client.clone(), &self.namespace);
                let secret =
                    secrets.get_opt(&selector.name).await.map_err(|e| format!("Secret {}: {e}", selector.name))?;
                match secret.and_then(|s| s.data).and_then(|mut d| d.remove(&selector.key)) {
                    Some(bytes) => String::from_utf8(bytes.0).map_err(|e| format!("Secret {}: {e}", selector.name))?,
                    None if selector.optional == Some(true) => continue,
                    None => return Err(format!("Secret {} has no key {}", selector.name, selector.key)),
                }
            } else if let Some(field) = var.value_from.as_ref().and_then(|f| f.field_ref.as_ref()) {
                match field.field_path.as_str() {
                    "metadata.name" => name.clone(),
                    "metadata.namespace" => self.namespace.clone(),
                    "status.podIP" => ip.clone(),
                    other => return Err(format!("unsupported field reference {other}")),
                }
            } else {
                continue;
            };
            env.insert(var.name.clone(), value);
        }
        // The pod's own network: its loopback address instead of 0.0.0.0.
        for key in ["KVFLEET_LISTEN", "KVFLEET_METRICS_LISTEN", "KVFLEET_ADMIN_LISTEN"] {
            if let Some(value) = env.get_mut(key) {
                *value = value.replace("0.0.0.0", &ip);
            }
        }
        let metrics_port = env
            .get("KVFLEET_METRICS_LISTEN")
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .ok_or("no metrics port")?;
        let claim = spec
            .volumes
            .iter()
            .flatten()
            .find_map(|v| v.persistent_volume_claim.as_ref().map(|c| c.claim_name.clone()))
            .ok_or("no volume claim")?;
        env.insert("KVFLEET_DATA_DIR".into(), self.volume_dir(&claim).join("node").display().to_string());
        let subdomain = spec.subdomain.clone().unwrap_or_default();
        let fqdn = format!("{name}.{subdomain}.{}.svc", self.namespace);
        self.names.lock().insert(name.clone(), vec![fqdn.clone(), format!("{fqdn}.cluster.local")]);
        self.write_hosts();
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
        let child = Command::new(&self.node_binary)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn kvfleet-node: {e}"))?;
        Ok(RunningPod { uid: pod.uid().unwrap_or_default(), ip, metrics_port, child, ready: false })
    }

    /// Pod status: Running with its IP; Ready while /readyz answers 200.
    async fn report(&self, pods: &Api<Pod>, pod: &Pod) {
        let name = pod.name_any();
        let (ip, port, was_ready) = {
            let mut running = self.pods.lock();
            let Some(process) = running.get_mut(&name) else { return };
            if let Ok(Some(status)) = process.child.try_wait() {
                eprintln!("stand-in kubelet: pod {name}'s process exited ({status}); restarting it");
                running.remove(&name);
                return;
            }
            (process.ip.clone(), process.metrics_port, process.ready)
        };
        let ready = http_ok(&ip, port, "/readyz").await;
        let reported_ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
        if ready == was_ready && reported_ip.as_deref() == Some(ip.as_str()) {
            return;
        }
        if let Some(process) = self.pods.lock().get_mut(&name) {
            process.ready = ready;
        }
        let condition = |type_: &str| PodCondition {
            type_: type_.into(),
            status: if ready { "True" } else { "False" }.into(),
            last_transition_time: Some(now()),
            ..Default::default()
        };
        let status = PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.clone()),
            host_ip: Some("127.0.0.1".into()),
            start_time: Some(now()),
            conditions: Some(vec![
                PodCondition { type_: "PodScheduled".into(), status: "True".into(), ..Default::default() },
                condition("Initialized"),
                condition("ContainersReady"),
                condition("Ready"),
            ]),
            ..Default::default()
        };
        let patch = serde_json::json!({ "status": status });
        if let Err(error) = pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            eprintln!("stand-in kubelet: status of pod {name}: {error}");
        }
    }

    /// SIGTERM, up to 30 s for the graceful stop, then SIGKILL.
    async fn stop(&self, name: &str) {
        let Some(mut process) = self.pods.lock().remove(name) else { return };
        let pid = process.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..300 {
            if process.child.try_wait().ok().flatten().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = process.child.kill();
    }

    /// The node process of `pod`, if it runs: its pid (for fault injection).
    pub fn pid(&self, pod: &str) -> Option<u32> {
        self.pods.lock().get(pod).map(|p| p.child.id())
    }
}

pub struct KubeletHandle {
    pub kubelet: Arc<Kubelet>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubeletHandle {
    fn drop(&mut self) {
        self.task.abort();
        self.kubelet.pods.lock().clear();
    }
}

fn ready_condition() -> NodeCondition {
    NodeCondition {
        type_: "Ready".into(),
        status: "True".into(),
        reason: Some("KubeletReady".into()),
        message: Some("kvfleet's stand-in kubelet".into()),
        last_heartbeat_time: Some(now()),
        last_transition_time: Some(now()),
    }
}

/// `$(VAR)` references to variables defined before, as Kubernetes expands them.
fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = value.to_string();
    for (key, replacement) in env {
        out = out.replace(&format!("$({key})"), replacement);
    }
    out
}

/// GET http://ip:port/path answered 200 (a minimal HTTP/1.1 exchange, bounded).
async fn http_ok(ip: &str, port: u16, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 16];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), exchange).await.ok().flatten().unwrap_or(false)
}
