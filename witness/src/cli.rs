//! The `ferry-witness` command line: [`Args`] and [`run`], shared by the binary and by the
//! lab, which runs witnesses in-process beside its fault-injecting links.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

use crate::node::NodeConfig;
use crate::rule::RuleConfig;

/// One node of Ferry's witness quorum (raft).
#[derive(Clone, Debug, Parser)]
#[command(name = "ferry-witness", version, about)]
pub struct Args {
    /// This witness's raft id (non-zero).
    #[arg(long)]
    pub id: u64,
    /// Address to listen on (host:port).
    #[arg(long)]
    pub listen: String,
    /// A member of the initial quorum, `id=host:port`, repeated; include this one (unless
    /// joining).
    #[arg(long = "peer", value_parser = parse_peer, required = true)]
    pub peers: Vec<(u64, String)>,
    /// The sled database directory.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Directory with ca.crt, tls.crt and tls.key (a mounted kubernetes.io/tls Secret).
    #[arg(long)]
    pub tls_dir: PathBuf,
    /// How long without a heartbeat before this witness suspects a site.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub site_loss_timeout: Duration,
    /// Clock-skew margin added to every lease expiry.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub skew_margin: Duration,
    /// Join an existing quorum (added by a ChangeMembership call) instead of bootstrapping one.
    #[arg(long)]
    pub join: bool,
    /// Snapshot and compact the raft log every this many entries.
    #[arg(long, default_value_t = 500)]
    pub snapshot_every: u64,
    /// Shifts this witness's wall clock (`+2s`, `-1500ms`): clock skew for fault-injection
    /// tests; leave unset in production.
    #[arg(long, value_parser = crate::clock::parse_offset_ms, allow_hyphen_values = true)]
    pub clock_offset: Option<i64>,
}

/// Parses `id=host:port`.
///
/// # Errors
/// A message naming the malformed value.
pub fn parse_peer(s: &str) -> Result<(u64, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: want id=host:port"))?;
    let id: u64 = id
        .parse()
        .map_err(|_| format!("{s:?}: id must be a number"))?;
    Ok((id, addr.to_string()))
}

/// Runs the witness `args` describes until `shutdown` resolves.
///
/// # Errors
/// When the peers do not list this witness (and it is not joining), the TLS material cannot
/// be read, the address cannot be bound, or the node fails.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
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
    if let Some(offset_ms) = args.clock_offset {
        tracing::warn!(offset_ms, "witness clock shifted (--clock-offset)");
        cfg.clock = crate::clock::SystemClock::with_offset_ms(offset_ms).shared();
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(id = args.id, listen = %args.listen, "witness starting");
    crate::server::serve(cfg, listener, tls, |_| {}, shutdown)
        .await
        .with_context(|| format!("witness {}", args.id))?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
