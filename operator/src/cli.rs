//! The command line: `kvfleet-operator run` (the Kubernetes operator), `playground` (a local
//! fleet with its resharding loop), `crd`, `render`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::error::OperatorError;
use crate::playground::PlaygroundArgs;

#[derive(Debug, Parser)]
#[command(name = "kvfleet-operator", version, about = "kvfleet's controller and local playground")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process; boxing the playground's flags would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local fleet of kvfleet-node processes with the resharding controller and a live view.
    Playground(PlaygroundArgs),
    /// Run the Kubernetes operator (in a cluster: reconciles KeyValueClusters and reshards them).
    Run(crate::k8s::operator::OperatorArgs),
    /// Print the KeyValueCluster CustomResourceDefinition (YAML), as crds/ ships it.
    Crd {
        /// As the Helm chart's template (templates/crd.yaml), which `helm upgrade` keeps current.
        #[arg(long)]
        helm_template: bool,
    },
    /// Print the objects the operator would apply for a KeyValueCluster manifest (YAML), without
    /// a cluster: to review them, or to validate them against the Kubernetes schemas.
    Render {
        /// A KeyValueCluster manifest (YAML).
        file: PathBuf,
    },
}

pub async fn run(cli: Cli) -> Result<(), OperatorError> {
    match cli.command {
        Command::Playground(args) => crate::playground::run(args).await,
        Command::Run(args) => {
            init_json_logging();
            crate::k8s::operator::run(args).await
        }
        Command::Render { file } => {
            let text = std::fs::read_to_string(&file).map_err(|source| OperatorError::Io {
                what: "reading",
                path: file.clone(),
                source,
            })?;
            let yaml =
                crate::k8s::render(&text).map_err(|e| OperatorError::Invalid(format!("{}: {e}", file.display())))?;
            print!("{yaml}");
            Ok(())
        }
        Command::Crd { helm_template } => {
            let yaml = if helm_template { crate::k8s::crd_helm_template() } else { crate::k8s::crd_yaml() };
            let yaml = yaml.map_err(|e| OperatorError::Invalid(format!("rendering the CRD: {e}")))?;
            print!("{yaml}");
            Ok(())
        }
    }
}

/// In a cluster, logs are JSON lines on stdout (level from RUST_LOG, default info).
fn init_json_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().json().with_env_filter(filter).init();
}
