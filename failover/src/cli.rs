//! The `ferry-controller` command line; `main_with_args` lets the lab's multi-call binary run
//! it in-process.

use std::sync::Arc;

use clap::Parser;

/// Ferry's failover controller.
#[derive(Debug, Parser)]
#[command(name = "ferry-controller", version, about)]
struct Cli {
    /// This site's name (its Site object).
    #[arg(long, env = "FERRY_SITE")]
    site: String,
}

/// Runs the command line `args` (the first is the program name); returns the exit code.
pub fn main_with_args(args: Vec<String>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ferry-controller: starting the runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async move {
        let client = match kube::Client::try_default().await {
            Ok(client) => client,
            Err(e) => {
                eprintln!("ferry-controller: connecting to the Kubernetes API: {e}");
                return 1;
            }
        };
        let ctx = Arc::new(crate::migration::Context {
            site: cli.site,
            client,
        });
        tokio::select! {
            () = crate::migration::run(ctx) => 0,
            () = ferry_replicator::cli::shutdown_signal() => 0,
        }
    })
}
