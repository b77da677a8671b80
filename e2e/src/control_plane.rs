//! A real Kubernetes control plane on loopback for the tests: Debian's etcd, and the
//! kube-apiserver, kube-controller-manager and kube-scheduler that `scripts/control-plane.sh`
//! builds (1.20.2). Token authentication, RBAC authorization, the usual admission plugins,
//! service-account tokens (TokenRequest), an audit log of every request. Everything it starts
//! is killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// The token of the control plane's administrator (group system:masters).
const ADMIN_TOKEN: &str = "kvfleet-test-admin";
/// The controller-manager's and the scheduler's token (system:masters too: with
/// --use-service-account-credentials=false every controller runs as this user).
const COMPONENTS_TOKEN: &str = "kvfleet-test-components";
const AUDIENCE: &str = "https://kubernetes.default.svc";

/// Where the control plane's binaries are: `KVFLEET_K8S_BIN`, else the default of
/// `scripts/control-plane.sh`. Panics with the way to build them if they are missing.
pub fn binaries() -> PathBuf {
    let dir = std::env::var_os("KVFLEET_K8S_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache/kvfleet-k8s/v1.20.2/bin")
    });
    assert!(
        dir.join("kube-apiserver").exists(),
        "no kube-apiserver in {}: run scripts/control-plane.sh (./scripts/test.sh does) or set KVFLEET_K8S_BIN",
        dir.display()
    );
    dir
}

/// A loopback port for a process to listen on, free now. Taken below the kernel's ephemeral range
/// (32768 on), so that no outgoing connection of any process takes it as its local port before
/// the listener binds it, and never handed out twice in this test process.
pub fn free_port() -> u16 {
    use rand::Rng as _;
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let port = rng.random_range(20_000..32_000);
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    assert!(output.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
}

/// A CA, the API server's serving certificate (127.0.0.1), and the service-account key pair.
fn make_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=kvfleet-test-ca",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=kube-apiserver",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    openssl(dir, &["genrsa", "-out", "sa.key", "2048"]);
    openssl(dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

/// Every request of `user` at RequestResponse level (bodies included), nothing of the rest.
fn audit_policy(user: &str) -> String {
    format!(
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: RequestResponse\n  users: [\"{user}\"]\n- level: None\n"
    )
}

pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    /// https://127.0.0.1:<port>
    pub server: String,
    processes: Vec<(&'static str, Child)>,
}

impl ControlPlane {
    /// Starts etcd, the API server, the controller-manager and the scheduler, and waits until
    /// the API server is ready. `audited_user` is logged at RequestResponse level in
    /// `audit.log` (the operator's ServiceAccount, typically).
    pub fn start(audited_user: &str) -> Self {
        let bin = binaries();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path();
        make_certificates(path);
        std::fs::write(
            path.join("tokens.csv"),
            format!(
                "{ADMIN_TOKEN},kvfleet-test-admin,1,\"system:masters\"\n{COMPONENTS_TOKEN},kvfleet-test-components,2,\"system:masters\"\n"
            ),
        )
        .expect("write tokens.csv");
        std::fs::write(path.join("audit-policy.yaml"), audit_policy(audited_user)).expect("write the audit policy");
        let mut plane = ControlPlane { server: String::new(), processes: Vec::new(), dir };
        let path = plane.dir.path().to_path_buf();

        let (etcd_client, etcd_peer) = (free_port(), free_port());
        plane.launch(
            "etcd",
            Command::new("etcd")
                .args(["--data-dir", path.join("etcd").to_str().unwrap()])
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{etcd_client}")])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{etcd_client}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{etcd_peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{etcd_peer}")])
                .args(["--initial-cluster", &format!("default=http://127.0.0.1:{etcd_peer}")]),
        );

        let port = free_port();
        plane.server = format!("https://127.0.0.1:{port}");
        let file = |name: &str| path.join(name).display().to_string();
        plane.launch(
            "kube-apiserver",
            Command::new(bin.join("kube-apiserver"))
                .args(["--etcd-servers", &format!("http://127.0.0.1:{etcd_client}")])
                .args(["--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1"])
                .args(["--secure-port", &port.to_string()])
                .args(["--tls-cert-file", &file("server.crt"), "--tls-private-key-file", &file("server.key")])
                .args(["--client-ca-file", &file("ca.crt")])
                .args(["--token-auth-file", &file("tokens.csv")])
                .args(["--authorization-mode", "RBAC"])
                .args(["--service-account-key-file", &file("sa.pub")])
                .args(["--service-account-signing-key-file", &file("sa.key")])
                .args(["--service-account-issuer", AUDIENCE, "--api-audiences", AUDIENCE])
                .args(["--service-cluster-ip-range", "10.96.0.0/16"])
                .args([
                    "--enable-admission-plugins",
                    "NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds,\
                 MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota",
                ])
                .arg("--allow-privileged=true")
                .args(["--audit-policy-file", &file("audit-policy.yaml"), "--audit-log-path", &file("audit.log")])
                .args(["--v", "1"]),
        );
        plane.wait_ready(Duration::from_secs(90));

        plane.write_kubeconfig("components.kubeconfig", COMPONENTS_TOKEN);
        plane.launch(
            "kube-controller-manager",
            Command::new(bin.join("kube-controller-manager"))
                .args(["--kubeconfig", &file("components.kubeconfig")])
                .args(["--controllers", "*", "--use-service-account-credentials=false", "--leader-elect=false"])
                .args(["--service-account-private-key-file", &file("sa.key"), "--root-ca-file", &file("ca.crt")])
                .args(["--cluster-signing-cert-file", &file("ca.crt"), "--cluster-signing-key-file", &file("ca.key")])
                .args(["--bind-address", "127.0.0.1", "--secure-port", &free_port().to_string(), "--port", "0"]),
        );
        plane.launch(
            "kube-scheduler",
            Command::new(bin.join("kube-scheduler"))
                .args(["--kubeconfig", &file("components.kubeconfig"), "--leader-elect=false"])
                .args(["--bind-address", "127.0.0.1", "--secure-port", &free_port().to_string(), "--port", "0"]),
        );
        plane
    }

    /// Starts a component, its stderr in `<name>.log` in the control plane's directory.
    fn launch(&mut self, name: &'static str, command: &mut Command) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("create a log file");
        let child = command.stdout(Stdio::null()).stderr(log).spawn().unwrap_or_else(|e| {
            panic!("cannot start {name}: {e} (scripts/control-plane.sh builds the Kubernetes binaries, etcd comes from Debian)")
        });
        self.processes.push((name, child));
    }

    fn wait_ready(&mut self, within: Duration) {
        let started = Instant::now();
        let ca = self.dir.path().join("ca.crt");
        while started.elapsed() < within {
            let exited = self
                .processes
                .iter_mut()
                .find_map(|(name, child)| child.try_wait().ok().flatten().map(|status| (*name, status)));
            if let Some((name, status)) = exited {
                panic!("{name} exited ({status}) while the control plane started:\n{}", self.log_tail(name));
            }
            // Ready, and bootstrapped: the `default` namespace exists.
            let ready = ["/readyz", "/api/v1/namespaces/default"].iter().all(|path| {
                Command::new("curl")
                    .args(["--silent", "--fail", "--max-time", "2", "--cacert", ca.to_str().unwrap()])
                    .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
                    .arg(format!("{}{path}", self.server))
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
            if ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("kube-apiserver not ready within {within:?}:\n{}", self.log_tail("kube-apiserver"));
    }

    /// The last lines of a component's log.
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The audit log (JSON lines).
    pub fn audit_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default()
    }

    /// Requests by `user` that the API server answered with `403` or a 5xx, from the audit log:
    /// "VERB URI -> CODE: message".
    /// A read answered 5xx with no message is one its client abandoned (it exited, or its
    /// connection was stalled on purpose): the server failed nothing, and it is left out.
    pub fn refused_requests(&self, user: &str) -> Vec<String> {
        let abandoned = |event: &serde_json::Value| {
            matches!(event["verb"].as_str(), Some("get" | "list" | "watch"))
                && event["responseStatus"]["code"].as_u64().is_some_and(|code| code >= 500)
                && event["responseStatus"]["message"].as_str().unwrap_or("").is_empty()
        };
        self.audit_log()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["stage"] == "ResponseComplete" && event["user"]["username"] == user)
            .filter(|event| !abandoned(event))
            .filter(|event| event["responseStatus"]["code"].as_u64().is_some_and(|code| code == 403 || code >= 500))
            .map(|event| {
                format!(
                    "{} {} -> {}: {}",
                    event["verb"].as_str().unwrap_or(""),
                    event["requestURI"].as_str().unwrap_or(""),
                    event["responseStatus"]["code"],
                    event["responseStatus"]["message"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    /// Requests by `user` received in `[from, to)` (RFC 3339 UTC timestamps compare as text),
    /// counted by "verb resource" (e.g. "get statefulsets", "update leases").
    pub fn requests_between(&self, user: &str, from: &str, to: &str) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for event in self.audit_log().lines().filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok()) {
            let received = event["requestReceivedTimestamp"].as_str().unwrap_or("");
            if event["stage"] != "ResponseComplete" || event["user"]["username"] != user {
                continue;
            }
            if received < from || received >= to {
                continue;
            }
            let resource = event["objectRef"]["resource"].as_str().unwrap_or("?");
            let sub = event["objectRef"]["subresource"].as_str().map(|s| format!("/{s}")).unwrap_or_default();
            *counts.entry(format!("{} {resource}{sub}", event["verb"].as_str().unwrap_or("?"))).or_insert(0) += 1;
        }
        counts
    }

    /// Changes (create, update, patch, delete) whose User-Agent contains `agent`, from the audit
    /// log: "VERB URI -> CODE". The operator names its replica in its User-Agent.
    pub fn writes_by_agent(&self, agent: &str) -> Vec<String> {
        self.audit_log()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["stage"] == "ResponseComplete")
            .filter(|event| event["userAgent"].as_str().is_some_and(|a| a.contains(agent)))
            .filter(|event| matches!(event["verb"].as_str(), Some("create" | "update" | "patch" | "delete")))
            .map(|event| {
                format!(
                    "{} {} -> {}",
                    event["verb"].as_str().unwrap_or(""),
                    event["requestURI"].as_str().unwrap_or(""),
                    event["responseStatus"]["code"]
                )
            })
            .collect()
    }

    /// Writes a kubeconfig for `token` into the control plane's directory; returns its path.
    pub fn write_kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        self.write_kubeconfig_via(name, token, &self.server)
    }

    /// A kubeconfig for `token` that reaches the API server at `server` (a `StallingProxy`).
    pub fn write_kubeconfig_via(&self, name: &str, token: &str, server: &str) -> PathBuf {
        let ca = self.dir.path().join("ca.crt");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
             users:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: user\n\
             current-context: test\n",
            server,
            ca.display()
        );
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write a kubeconfig");
        path
    }

    pub async fn client_for(&self, kubeconfig: &Path) -> Client {
        let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("read the kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("a client configuration");
        Client::try_from(config).expect("a client")
    }

    /// A client acting as the administrator.
    pub async fn admin(&self) -> Client {
        let path = self.write_kubeconfig("admin.kubeconfig", ADMIN_TOKEN);
        self.client_for(&path).await
    }

    /// The audience service-account tokens are issued for.
    pub fn audience(&self) -> &'static str {
        AUDIENCE
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for (_, child) in self.processes.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            // Keep the logs of a failed run for a look.
            let kept = self.dir.path().with_extension("kept");
            let _ = std::fs::rename(self.dir.path(), &kept);
            eprintln!("control plane logs kept in {}", kept.display());
        }
    }
}

/// A TCP proxy in front of the API server that can stop forwarding (both ways, on every
/// connection, without closing any): what a client sees of a stalled network or API server.
pub struct StallingProxy {
    pub url: String,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    pub async fn start(server: &str) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let upstream = server.trim_start_matches("https://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a proxy port");
        let url = format!("https://{}", listener.local_addr().expect("its address"));
        let stalled = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                let flag = flag.clone();
                tokio::spawn(async move {
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let pump = |mut from: tokio::net::tcp::OwnedReadHalf,
                                mut to: tokio::net::tcp::OwnedWriteHalf,
                                flag: std::sync::Arc<AtomicBool>| async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buffer = vec![0u8; 64 * 1024];
                        loop {
                            while flag.load(Ordering::Relaxed) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            let Ok(read) = from.read(&mut buffer).await else { return };
                            if read == 0 {
                                return;
                            }
                            // Bytes read just before a stall are held back until it ends.
                            while flag.load(Ordering::Relaxed) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            if to.write_all(&buffer[..read]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::join!(pump(client_read, server_write, flag.clone()), pump(server_read, client_write, flag));
                });
            }
        });
        StallingProxy { url, stalled, task }
    }

    pub fn stall(&self, stalled: bool) {
        self.stalled.store(stalled, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
