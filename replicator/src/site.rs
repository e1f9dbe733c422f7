//! `ferry-replicator serve`: one site's replicator in Kubernetes. It serves the `Replication`
//! service to peers (mutual TLS), the `Mover` service to its mover pods and `/metrics`, and
//! runs a worker per DRPair active at this site.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::cluster::movers::MoverPods;
use crate::cluster::pairs::{self, SiteContext, SiteObserver};
use crate::cluster::replicas::KubeReplicas;
use crate::delta::HashStore;
use crate::destination::{Destination, Journal};
use crate::metrics::Metrics;
use crate::mover::MoverHub;
use crate::tls::TlsMaterial;
use ferry_runtime::{Component, PairStatus};

/// Arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// This site's name (its Site object).
    #[arg(long, env = "FERRY_SITE")]
    pub site: String,
    /// Address to bind; the pod's IP in the lab, where pods of a site share one.
    #[arg(long, env = "POD_IP", default_value = "0.0.0.0")]
    pub bind_ip: IpAddr,
    /// Replication port (mutual TLS, for peers).
    #[arg(long, default_value_t = 7443)]
    pub port: u16,
    /// Mover port (for this site's mover pods).
    #[arg(long, default_value_t = 7444)]
    pub mover_port: u16,
    /// Metrics port (`/metrics`, `/healthz`).
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Directory with `ca.crt`, `tls.crt`, `tls.key` (the mounted TLS Secret).
    #[arg(long, default_value = "/etc/ferry/tls")]
    pub tls_dir: PathBuf,
    /// Directory for the journal and hash store (a PVC).
    #[arg(long, default_value = "/var/lib/ferry")]
    pub state_dir: PathBuf,
    /// Image for mover pods (normally this pod's own image).
    #[arg(
        long,
        env = "FERRY_MOVER_IMAGE",
        default_value = "ghcr.io/ferry-dr/ferry-replicator:0.1.0"
    )]
    pub mover_image: String,
    /// Committed generations kept per pair at this site when it is a destination.
    #[arg(long, default_value_t = 3)]
    pub retain: usize,
}

/// Runs the site replicator until SIGTERM.
///
/// # Errors
/// When the TLS material, the state directory, the API server or a port is unusable.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster)")?;
    let tls = TlsMaterial::from_dir(&args.tls_dir)?;
    let metrics = Arc::new(Metrics::new());
    let hub = MoverHub::new();
    let attach_ip = if args.bind_ip.is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        args.bind_ip
    };
    let movers = MoverPods::new(
        client.clone(),
        hub.clone(),
        args.mover_image.clone(),
        format!("http://{}", SocketAddr::new(attach_ip, args.mover_port)),
    );
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let journal = Journal::open(&args.state_dir.join("journal"))?;
    let hashes = HashStore::open(args.state_dir.join("hashes"))?;
    let status = PairStatus::new(client.clone(), &args.site, Component::Replicator);
    let destination = Destination::new(
        journal,
        Arc::new(KubeReplicas::new(
            client.clone(),
            movers.clone(),
            status.clone(),
        )),
        Arc::new(SiteObserver {
            site: args.site.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
        }),
        args.retain,
    )
    .with_hashes(hashes.clone());
    let bind = |port| SocketAddr::new(args.bind_ip, port);
    let replication = tokio::net::TcpListener::bind(bind(args.port))
        .await
        .with_context(|| format!("binding {}", bind(args.port)))?;
    let mover_listener = tokio::net::TcpListener::bind(bind(args.mover_port))
        .await
        .with_context(|| format!("binding {}", bind(args.mover_port)))?;
    let metrics_listener = tokio::net::TcpListener::bind(bind(args.metrics_port))
        .await
        .with_context(|| format!("binding {}", bind(args.metrics_port)))?;
    tracing::info!(site = %args.site, replication = %bind(args.port), "replicator serving");
    let ctx = SiteContext {
        site: args.site.clone(),
        sites: crate::cluster::sites::SiteCache::watch(client.clone()),
        client,
        movers,
        hashes,
        tls: tls.clone(),
        status,
        metrics: metrics.clone(),
    };
    let shutdown = ferry_runtime::shutdown_signal();
    tokio::select! {
        r = crate::transport::serve_replication(replication, &tls, destination, std::future::pending()) => r.context("replication server")?,
        r = crate::transport::serve_movers(mover_listener, hub, std::future::pending()) => r.context("mover server")?,
        r = crate::metrics::serve_listener(metrics_listener, metrics, std::future::pending()) => r.context("metrics server")?,
        () = pairs::run(ctx) => {}
        () = shutdown => tracing::info!("shutting down"),
    }
    Ok(())
}
