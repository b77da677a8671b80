//! The playground: a local fleet (`local`, the Local platform), its resharding loop, the loop's
//! status API, and a live view of nodes, ranges and moves until Ctrl-C. Data stays in the directory, so the
//! next start resumes where this one stopped.

pub mod local;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvfleet_proto::v1::controller_server::ControllerServer;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use kvfleet_resharding::status::{StatusBoard, StatusService};
use kvfleet_resharding::{LoopConfig, ReshardingLoop};

use self::local::{LocalConfig, LocalPlatform};
use crate::error::OperatorError;
use crate::policy::{PolicyArgs, playground_policy};

/// Printed on stdout once everything serves: `control=<addr> nodes=<id>@<addr>,...`.
pub const READY_PREFIX: &str = "kvfleet-operator ready";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum View {
    /// A live view when stdout is a terminal, else a log line per round.
    Auto,
    /// Redraw the status every second.
    Live,
    /// One summary line every 10 seconds.
    Log,
    /// Nothing but the ready line.
    None,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PlaygroundArgs {
    /// Number of storage nodes (1 to 16).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Where node data, logs and the controller state live (kept between runs).
    #[arg(long, default_value = "kvfleet-playground")]
    pub dir: PathBuf,
    /// Node i listens on 127.0.0.1:(base-port + i - 1); 0 = ports picked by the kernel, then kept.
    #[arg(long, default_value_t = 7700)]
    pub base_port: u16,
    /// The controller's status API (`kvctl status --controller <this>`).
    #[arg(long, default_value = "127.0.0.1:7690")]
    pub listen: SocketAddr,
    /// Serve the controller's Prometheus metrics at http://<addr>/metrics.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    #[arg(long, value_enum, default_value = "auto")]
    pub view: View,
    /// Replicas of every range (1, 3 or 5; at most --nodes): each range a Raft group on that many
    /// nodes. Default 3, or 1 with fewer than 3 nodes. Decided when the fleet is created; a fleet
    /// kept in --dir keeps its own.
    #[arg(long)]
    pub replicas: Option<usize>,
    /// What OK means on the nodes: sync (fsynced) or async (in the OS, fsynced in the background).
    #[arg(long, default_value = "sync")]
    pub durability: String,
    /// What OK means for a write to a replicated range: majority (a majority of its replicas
    /// fsynced it) or fast (its leader alone did; lost if the leader is lost before replicating).
    #[arg(long, default_value = "majority")]
    pub replication_durability: String,
    /// Seconds between control rounds.
    #[arg(long, default_value_t = 2.0)]
    pub interval_secs: f64,
    /// The nodes' load window, in seconds (rates are averaged over it).
    #[arg(long, default_value_t = 10)]
    pub load_window_secs: u64,
    /// Seconds a node may not answer before its replicas of replicated ranges are re-created
    /// on other nodes; a node that comes back later drops them.
    #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..))]
    pub replace_down_after_secs: u64,
    /// The kvfleet-node binary (default: next to this one).
    #[arg(long)]
    pub node_binary: Option<PathBuf>,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

pub async fn run(args: PlaygroundArgs) -> Result<(), OperatorError> {
    if !(1..=16).contains(&args.nodes) {
        return Err(OperatorError::Invalid(format!("--nodes must be between 1 and 16, got {}", args.nodes)));
    }
    if !(args.interval_secs > 0.0 && args.interval_secs <= 3600.0) {
        return Err(OperatorError::Invalid(format!(
            "--interval-secs must be in (0, 3600], got {}",
            args.interval_secs
        )));
    }
    let replicas = args.replicas.unwrap_or(if args.nodes >= 3 { 3 } else { 1 });
    if ![1, 3, 5].contains(&replicas) || replicas > args.nodes {
        return Err(OperatorError::Invalid(format!(
            "--replicas must be 1, 3 or 5 and at most --nodes ({}), got {replicas}: a majority of an even count tolerates no more failures than one fewer; --replicas 1 runs single copies",
            args.nodes
        )));
    }
    for (flag, value, allowed) in [
        ("--durability", &args.durability, ["sync", "async"]),
        ("--replication-durability", &args.replication_durability, ["majority", "fast"]),
    ] {
        if !allowed.contains(&value.as_str()) {
            return Err(OperatorError::Invalid(format!(
                "{flag} must be {} or {}, got {value:?}",
                allowed[0], allowed[1]
            )));
        }
    }
    let policy = args.policy.apply(playground_policy()).map_err(OperatorError::Invalid)?;
    std::fs::create_dir_all(&args.dir).map_err(|source| OperatorError::Io {
        what: "creating",
        path: args.dir.clone(),
        source,
    })?;
    let view = match args.view {
        View::Auto if std::io::stdout().is_terminal() => View::Live,
        View::Auto => View::Log,
        other => other,
    };
    init_logging(&args, view)?;

    let node_binary = match &args.node_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("kvfleet-node")))
            .unwrap_or_else(|| PathBuf::from("kvfleet-node")),
    };
    let node_args = vec![
        "--durability".to_string(),
        args.durability.clone(),
        "--replication-durability".to_string(),
        args.replication_durability.clone(),
        "--load-window-secs".to_string(),
        args.load_window_secs.to_string(),
    ];
    let platform = Arc::new(
        LocalPlatform::start(LocalConfig {
            dir: args.dir.clone(),
            nodes: args.nodes,
            base_port: args.base_port,
            node_binary,
            node_args,
        })
        .await?,
    );

    let mut registry = Registry::default();
    let board = StatusBoard::new(&mut registry);
    let config = LoopConfig {
        interval: Duration::from_secs_f64(args.interval_secs),
        policy,
        replication_factor: replicas,
        replace_down_after: Duration::from_secs(args.replace_down_after_secs),
        ..LoopConfig::default()
    };
    let controller = match ReshardingLoop::new(platform.clone(), config, board.clone()).await {
        Ok(controller) => controller,
        Err(error) => {
            platform.stop().await;
            return Err(error.into());
        }
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(source) => {
            platform.stop().await;
            return Err(OperatorError::Io { what: "listening on", path: args.listen.to_string().into(), source });
        }
    };
    let control_address = listener.local_addr().unwrap_or(args.listen);
    let server = tonic::transport::Server::builder()
        .add_service(ControllerServer::new(StatusService { board: board.clone() }))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), wait_until_true(shutdown_rx.clone()));
    let server = tokio::spawn(server);
    if let Some(addr) = args.metrics_listen {
        let registry = Arc::new(registry);
        let shutdown = wait_until_true(shutdown_rx.clone());
        kvfleet_proto::metrics_http::spawn(addr, registry, kvfleet_proto::metrics_http::Readiness::ready(), shutdown);
    }

    let members = kvfleet_resharding::platform::Platform::members(platform.as_ref()).await?;
    let endpoints: Vec<String> = members.iter().map(|m| m.address.clone()).collect();
    let nodes: Vec<String> = members.iter().map(|m| format!("{}@{}", m.node_id, m.address)).collect();
    println!("{READY_PREFIX} control={control_address} nodes={}", nodes.join(","));
    if view != View::None {
        println!(
            "kvfleet playground: {} nodes, data in {}\n  status:  kvctl --endpoints {} status --controller {control_address}\n  load:    kvctl --endpoints {} bench --workload a --distribution zipfian --duration 120\n  Ctrl-C stops everything; the next start resumes from the same directory.",
            members.len(),
            args.dir.display(),
            endpoints.join(","),
            endpoints.join(","),
        );
    }

    let controller = tokio::spawn(controller.run(shutdown_rx.clone()));
    let view_task = tokio::spawn(show(board, view, shutdown_rx.clone()));
    wait_for_signal().await;
    eprintln!("stopping: controller first, then the nodes ...");
    let _ = shutdown_tx.send(true);
    let _ = view_task.await;
    let controller_result = controller.await;
    platform.stop().await;
    let _ = server.await;
    eprintln!("stopped; data kept in {}", args.dir.display());
    match controller_result {
        Ok(result) => result.map_err(OperatorError::from),
        Err(error) => Err(OperatorError::Invalid(format!("the controller task failed: {error}"))),
    }
}

/// With a live view on stdout, logs go to `<dir>/controller.log` so they do not scroll it away.
fn init_logging(args: &PlaygroundArgs, view: View) -> Result<(), OperatorError> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if view == View::Live {
        let path = args.dir.join("controller.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| OperatorError::Io { what: "opening", path: path.clone(), source })?;
        logs.with_ansi(false).with_writer(std::sync::Mutex::new(file)).init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).init();
    }
    Ok(())
}

async fn show(board: StatusBoard, view: View, mut shutdown: watch::Receiver<bool>) {
    let every = match view {
        View::Live => Duration::from_secs(1),
        View::Log => Duration::from_secs(10),
        View::Auto | View::None => return,
    };
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let status = board.snapshot();
        if view == View::Live {
            // Clear the screen and home the cursor, then redraw.
            print!("\x1b[2J\x1b[H{}", kvfleet_view::render(&status));
            println!("Ctrl-C to stop");
        } else {
            if status.round == 0 {
                continue;
            }
            let ops: f64 = status.nodes.iter().map(|n| n.ops_per_sec).sum::<f64>() + 0.0;
            let per_node: Vec<String> =
                status.nodes.iter().map(|n| format!("{}={}r/{:.0}ops", n.node_id, n.ranges, n.ops_per_sec)).collect();
            println!(
                "round {}: {} ranges, {ops:.0} ops/s, {} moves in flight; {}",
                status.round,
                status.ranges.len(),
                status.moves.len(),
                per_node.join(" ")
            );
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the playground by killing it");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn wait_until_true(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}
