//! The `kvctl` binary: parse the command line and run it.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = kvfleet_client::cli::Cli::parse();
    match kvfleet_client::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kvctl: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
