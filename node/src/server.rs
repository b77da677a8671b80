//! Wiring: binds the listeners, opens the node, serves the data, admin, health and reflection
//! services plus metrics, ticks load accounting, and shuts down gracefully on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfleet_proto::v1::admin_server::AdminServer;
use kvfleet_proto::v1::kv_server::KvServer;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::config::NodeConfig;
use crate::error::NodeError;
use crate::metrics::NodeMetrics;
use crate::node::Node;
use crate::service::{AdminService, KvService};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds with SO_REUSEADDR so a restarted node gets its port back at once.
fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    let bind_error = |source| ServeError::Bind { addr, source };
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(addr).map_err(bind_error)?;
    socket.listen(1024).map_err(bind_error)
}

/// Streams a client may reset before the node accepted them, per connection (see `run`).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 4096;

pub async fn run(mut config: NodeConfig) -> Result<(), ServeError> {
    config.validate().map_err(ServeError::Config)?;
    let listener = bind(config.listen)?;
    // With port 0 the kernel picks the port; advertise the real one.
    config.listen = listener.local_addr().map_err(|source| ServeError::Bind { addr: config.listen, source })?;

    let mut registry = Registry::default();
    let node_metrics = NodeMetrics::new(&mut registry);
    let node = Arc::new(Node::open(config.clone(), node_metrics).await?);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // /readyz (Kubernetes' readiness probe): set once the gRPC server starts, cleared on SIGTERM.
    let readiness = kvfleet_proto::metrics_http::Readiness::default();
    if let Some(addr) = config.metrics_listen {
        let registry = Arc::new(registry);
        let shutdown = wait_until_true(shutdown_rx.clone());
        kvfleet_proto::metrics_http::spawn(addr, registry, readiness.clone(), shutdown);
    }
    tokio::spawn(tick_load(node.clone(), shutdown_rx.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<KvServer<KvService>>().await;
    health.set_serving::<AdminServer<AdminService>>().await;
    tokio::spawn(wait_for_signal(shutdown_tx, health.clone(), readiness.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kvfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let max_message = config.max_message_bytes();
    let kv = KvServer::new(KvService::new(node.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let admin = match config.admin_listen {
        None => AdminServer::new(AdminService::new(node.clone())),
        Some(admin_listen) => {
            spawn_admin_listener(admin_listen, node.clone(), shutdown_rx.clone())?;
            AdminServer::new(AdminService::reads_only(node.clone(), admin_listen))
        }
    };
    let raft = kvfleet_proto::v1::raft_transport_server::RaftTransportServer::new(
        crate::replica::transport::RaftTransportService::new(
            node.replication.clone(),
            node.admin_token.clone(),
            shutdown_rx.clone(),
        ),
    )
    .max_decoding_message_size(crate::replica::transport::MAX_BATCH_BYTES * 2)
    .max_encoding_message_size(crate::replica::transport::MAX_BATCH_BYTES * 2);
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    tracing::info!(
        node_id = %config.node_id,
        listen = %config.listen,
        advertise = %node.address,
        durability = ?config.durability,
        ranges = node.owned_ranges().len(),
        "serving"
    );
    readiness.set(true);
    println!("{} node_id={} address={}", kvfleet_proto::NODE_READY_PREFIX, config.node_id, node.address);

    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let mut drained = shutdown_rx.clone();
    let server = Server::builder()
        // h2 answers more than this many streams reset before the server accepted them with a
        // GOAWAY that fails every stream on the connection (its rapid-reset guard; the default
        // is 20). A node paused for a few seconds (GC-free, but a stalled disk or a SIGSTOP)
        // resumes to a backlog of ordinary client timeouts: that must not cost the connection.
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
        .layer(crate::unknown_method::ExplainUnimplementedLayer)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(kv)
        .add_service(admin)
        .add_service(raft)
        .serve_with_incoming_shutdown(incoming, wait_until_true(shutdown_rx));
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        () = async {
            let _ = drained.wait_for(|stop| *stop).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!(?grace, "in-flight requests did not finish within the grace period"),
    }
    let started = Instant::now();
    node.shutdown()?;
    tracing::info!(took = ?started.elapsed(), "stopped: writes flushed and WAL fsynced");
    Ok(())
}

/// The admin port (`--admin-listen`): every admin call, for the operator alone once a
/// NetworkPolicy says so. Stops with the node.
fn spawn_admin_listener(addr: SocketAddr, node: Arc<Node>, shutdown: watch::Receiver<bool>) -> Result<(), ServeError> {
    let listener = bind(addr)?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let admin = AdminServer::new(AdminService::new(node));
    tokio::spawn(async move {
        let served = Server::builder()
            .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
            .layer(crate::unknown_method::ExplainUnimplementedLayer)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, wait_until_true(shutdown))
            .await;
        if let Err(error) = served {
            tracing::error!(%error, %addr, "the admin port stopped");
        }
    });
    tracing::info!(%addr, "admin changes served on their own port");
    Ok(())
}

/// On SIGTERM/SIGINT: report NOT_SERVING and not ready (so probes and balancers stop sending),
/// then start the graceful stop.
async fn wait_for_signal(
    shutdown: watch::Sender<bool>,
    health: tonic_health::server::HealthReporter,
    readiness: kvfleet_proto::metrics_http::Readiness,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; the node stops only when killed");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    readiness.set(false);
    health.set_not_serving::<KvServer<KvService>>().await;
    health.set_not_serving::<AdminServer<AdminService>>().await;
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    let _ = shutdown.send(true);
}

async fn wait_until_true(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}

/// Closes a load-accounting tick on every range about once a second.
async fn tick_load(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let now = Instant::now();
        node.tick_load(now - last);
        last = now;
    }
}
