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
    /// A witness of the quorum, `host:port`; repeat for each (3 or 5). Without any, no leases,
    /// no automatic failover.
    #[arg(long = "witness", env = "FERRY_WITNESSES", value_delimiter = ',')]
    witnesses: Vec<String>,
    /// Directory with ca.crt, tls.crt and tls.key for mutual TLS to the witnesses.
    #[arg(long, env = "FERRY_WITNESS_TLS_DIR", default_value = "/etc/ferry/tls")]
    witness_tls_dir: std::path::PathBuf,
    /// Lease duration per pair held at the witnesses (an empty value means the default).
    #[arg(long, env = "FERRY_LEASE", default_value = "10s", value_parser = parse_lease)]
    lease: std::time::Duration,
}

fn parse_lease(s: &str) -> Result<std::time::Duration, humantime::DurationError> {
    humantime::parse_duration(if s.trim().is_empty() { "10s" } else { s })
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
        // An empty `witnesses` key (no quorum at this site) reads as one empty entry.
        let witnesses: Vec<String> = cli
            .witnesses
            .iter()
            .filter(|w| !w.trim().is_empty())
            .cloned()
            .collect();
        let quorum = if witnesses.is_empty() {
            None
        } else {
            let tls = match ferry_tls::TlsMaterial::from_dir(&cli.witness_tls_dir) {
                Ok(tls) => tls,
                Err(e) => {
                    eprintln!("ferry-controller: witness TLS material: {e}");
                    return 1;
                }
            };
            match ferry_witness_client::QuorumClient::new(&witnesses, &tls) {
                Ok(client) => Some(crate::quorum::Quorum {
                    client,
                    lease: cli.lease,
                }),
                Err(e) => {
                    eprintln!("ferry-controller: --witness: {}", e.message());
                    return 1;
                }
            }
        };
        let ctx = Arc::new(crate::migration::Context {
            site: cli.site,
            client,
            quorum: quorum.clone(),
        });
        let agent = {
            let ctx = ctx.clone();
            async move {
                match quorum {
                    Some(q) => crate::quorum::run(ctx, q).await,
                    None => std::future::pending().await,
                }
            }
        };
        tokio::select! {
            () = crate::drill::run(ctx.clone()) => 0,
            () = crate::drill::run_schedule(ctx.clone()) => 0,
            () = crate::migration::run(ctx) => 0,
            () = agent => 0,
            () = ferry_runtime::shutdown_signal() => 0,
        }
    })
}
