//! The `ferry-replicator` command line. `main_with_args` is public so that a multi-call binary
//! (the lab's image catalog) can run it in-process with the same arguments as the image.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::destination::{Destination, Journal, LocalReplicas, NoObserver};
use crate::tls::TlsMaterial;

/// Ferry's replicator.
#[derive(Debug, Parser)]
#[command(name = "ferry-replicator", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run as a site's replicator in Kubernetes: ship the pairs active here, receive the others.
    Serve(crate::site::ServeArgs),
    /// Run a standalone destination that keeps replicas in local directories (no Kubernetes):
    /// for tests and for DR targets that are plain servers.
    Receive {
        /// Address to serve `Replication` on; port 0 picks one (printed as `listening on ADDR`).
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: String,
        /// Directory holding `ca.crt`, `tls.crt` and `tls.key`.
        #[arg(long)]
        tls_dir: PathBuf,
        /// Directory for the journal.
        #[arg(long)]
        state_dir: PathBuf,
        /// Directory for the replicas.
        #[arg(long)]
        replicas_dir: PathBuf,
        /// Committed generations kept per pair.
        #[arg(long, default_value_t = 3)]
        retain: usize,
    },
    /// Run as a mover pod: dial the replicator and serve one volume.
    Mover {
        /// The replicator's mover address, e.g. `http://127.0.1.1:7444`.
        #[arg(long, env = "FERRY_MOVER_ATTACH")]
        attach: String,
        /// The job token the replicator expects.
        #[arg(long, env = "FERRY_MOVER_TOKEN")]
        token: String,
        /// The mounted volume: a directory (Filesystem) or a device/image file (Block).
        #[arg(long, env = "FERRY_MOVER_ROOT", default_value = "/data")]
        root: PathBuf,
    },
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
            eprintln!("ferry-replicator: starting the runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ferry-replicator: {e:#}");
            1
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    use anyhow::Context;
    match command {
        Command::Serve(args) => crate::site::serve(args).await,
        Command::Receive {
            listen,
            tls_dir,
            state_dir,
            replicas_dir,
            retain,
        } => {
            let tls = TlsMaterial::from_dir(&tls_dir)?;
            let journal = Journal::open(&state_dir.join("journal"))?;
            let destination = Destination::new(
                journal,
                Arc::new(LocalReplicas::new(replicas_dir)),
                Arc::new(NoObserver),
                retain,
            );
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            println!("listening on {}", listener.local_addr()?);
            crate::transport::serve_replication(
                listener,
                &tls,
                destination,
                ferry_runtime::shutdown_signal(),
            )
            .await?;
            Ok(())
        }
        Command::Mover {
            attach,
            token,
            root,
        } => {
            crate::mover::attach_and_serve(&attach, &token, root).await?;
            Ok(())
        }
    }
}
