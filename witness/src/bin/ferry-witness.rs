//! `ferry-witness`: one node of Ferry's witness quorum.
//!
//! ```text
//! ferry-witness --id 1 --listen 127.0.0.1:7201 \
//!     --peer 1=127.0.0.1:7201 --peer 2=127.0.0.1:7202 --peer 3=127.0.0.1:7203 \
//!     --data-dir /var/lib/ferry-witness --tls-dir /etc/ferry/tls \
//!     --site-loss-timeout 10s --skew-margin 1s
//! ```

use clap::Parser;
use ferry_witness::cli::{run, shutdown_signal, Args};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    run(Args::parse(), shutdown_signal()).await
}
