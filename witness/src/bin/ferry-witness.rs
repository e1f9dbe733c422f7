//! `ferry-witness`: one node of Ferry's witness quorum.
//!
//! ```text
//! ferry-witness --id 1 --listen 127.0.0.1:7201 \
//!     --peer 1=127.0.0.1:7201 --peer 2=127.0.0.1:7202 --peer 3=127.0.0.1:7203 \
//!     --data-dir /var/lib/ferry-witness --tls-dir /etc/ferry/tls \
//!     --site-loss-timeout 10s --skew-margin 1s
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use ferry_witness::node::NodeConfig;
use ferry_witness::rule::RuleConfig;

#[derive(Parser)]
#[command(version, about = "One node of Ferry's witness quorum (raft)")]
struct Args {
    /// This witness's raft id (non-zero).
    #[arg(long)]
    id: u64,
    /// Address to listen on (host:port).
    #[arg(long)]
    listen: String,
    /// A member of the initial quorum, `id=host:port`, repeated; include this one (unless
    /// joining).
    #[arg(long = "peer", value_parser = parse_peer, required = true)]
    peers: Vec<(u64, String)>,
    /// The sled database directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// Directory with ca.crt, tls.crt and tls.key (a mounted kubernetes.io/tls Secret).
    #[arg(long)]
    tls_dir: PathBuf,
    /// How long without a heartbeat before this witness suspects a site.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    site_loss_timeout: Duration,
    /// Clock-skew margin added to every lease expiry.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    skew_margin: Duration,
    /// Join an existing quorum (added by a ChangeMembership call) instead of bootstrapping one.
    #[arg(long)]
    join: bool,
    /// Snapshot and compact the raft log every this many entries.
    #[arg(long, default_value_t = 500)]
    snapshot_every: u64,
}

fn parse_peer(s: &str) -> Result<(u64, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: want id=host:port"))?;
    let id: u64 = id
        .parse()
        .map_err(|_| format!("{s:?}: id must be a number"))?;
    Ok((id, addr.to_string()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let peers: BTreeMap<u64, String> = args.peers.into_iter().collect();
    anyhow::ensure!(
        args.join || peers.contains_key(&args.id),
        "--peer must list this witness (id {}), or pass --join",
        args.id
    );
    let tls = ferry_tls::TlsMaterial::from_dir(&args.tls_dir)
        .with_context(|| format!("reading TLS material from {}", args.tls_dir.display()))?;
    let rule = RuleConfig {
        site_loss_timeout_ms: args.site_loss_timeout.as_millis() as u64,
        skew_margin_ms: args.skew_margin.as_millis() as u64,
        voters: peers.len(),
    };
    let mut cfg = NodeConfig::new(args.id, peers, args.data_dir, rule);
    cfg.snapshot_every = args.snapshot_every;
    cfg.join = args.join;
    cfg.keep_entries = (args.snapshot_every / 5).max(1);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(id = args.id, listen = %args.listen, "witness starting");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    ferry_witness::server::serve(cfg, listener, tls, |_| {}, shutdown)
        .await
        .with_context(|| format!("witness {}", args.id))?;
    Ok(())
}
