//! The `kvctl` binary: parse the command line and run it. `cli` holds the commands, `bench` the
//! load generator.

mod bench;
mod cli;

use clap::Parser;

/// mimalloc instead of glibc malloc: the gRPC path allocates per request, and profiles showed
/// glibc's malloc/free at about 15% of CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kvctl: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
