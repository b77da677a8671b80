//! The `kvfleet-node` binary: parse the configuration, set up logging, serve.

use clap::Parser;

/// mimalloc instead of glibc malloc: the gRPC path allocates per request, and profiles showed
/// glibc's malloc/free at about 15% of CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use kvfleet_node::config::{LogFormat, NodeConfig};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = NodeConfig::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    match kvfleet_node::server::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "kvfleet-node failed");
            eprintln!("kvfleet-node: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
