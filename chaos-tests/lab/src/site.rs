//! One running site in this process: its API server, its kubeconfig and its node.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Config;

use crate::apiserver::{store::WATCH_WINDOW, ApiServer, ApiServerConfig};
use crate::node::{self, catalog::Catalog, timeline::Timeline, volumes::VolumeUsers, NodeContext};
use crate::sites::SiteLayout;

/// A running site: API server plus node controllers.
pub struct SiteRuntime {
    /// The API server.
    pub server: ApiServer,
    /// The node's shared context.
    pub node: Arc<NodeContext>,
    controllers: Vec<tokio::task::JoinHandle<()>>,
}

/// Builds a kube-rs client from a kubeconfig file, as Ferry's binaries do.
///
/// # Errors
/// When the file cannot be read or does not describe a usable cluster.
pub async fn client_from(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .context("loading kubeconfig")?;
    kube::Client::try_from(config).context("building a client")
}

impl SiteRuntime {
    /// Starts site `name` with its files under `root`, listening on `listen` (port 0 picks
    /// one), and starts its node controllers. Returns once the API server accepts requests.
    ///
    /// # Errors
    /// When the store cannot be opened, the address bound, or the kubeconfig written.
    pub async fn start(name: &str, root: &Path, listen: SocketAddr) -> Result<Self> {
        let catalog = Catalog::discover().context("locating the lab image catalog's binaries")?;
        Self::start_with_catalog(name, root, listen, catalog).await
    }

    /// Like [`SiteRuntime::start`], running images through `catalog` (tests point it at the
    /// built `ferry-lab` binary, since their own executable is the test harness).
    ///
    /// # Errors
    /// As [`SiteRuntime::start`].
    pub async fn start_with_catalog(
        name: &str,
        root: &Path,
        listen: SocketAddr,
        catalog: Catalog,
    ) -> Result<Self> {
        let layout = SiteLayout::new(root);
        std::fs::create_dir_all(&layout.root)
            .with_context(|| format!("creating {}", layout.root.display()))?;
        let server = ApiServer::start(ApiServerConfig {
            data_dir: layout.store(),
            listen,
            token: None,
            watch_window: WATCH_WINDOW,
        })
        .await
        .with_context(|| format!("starting the API server of site {name}"))?;
        crate::kubeconfig::write(&layout.kubeconfig(), name, server.addr(), None)
            .context("writing the kubeconfig")?;
        let client = client_from(&layout.kubeconfig()).await?;
        let node = Arc::new(NodeContext {
            site: name.to_string(),
            node_name: format!("lab-{name}"),
            client,
            root: layout.node(),
            ip: listen.ip(),
            kubeconfig: layout.kubeconfig(),
            timeline: Timeline::new(layout.timeline()),
            volume_users: VolumeUsers::default(),
            catalog,
            running: Default::default(),
        });
        for dir in [node.volumes_dir(), node.snapshots_dir(), node.pods_dir()] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        server.serve_exec(Arc::new(node::kubelet::KubeletExec(node.clone())));
        let controllers = node::spawn_all(node.clone());
        Ok(Self {
            server,
            node,
            controllers,
        })
    }

    /// Stops the node's pods and the API server.
    pub async fn shutdown(self) {
        for c in &self.controllers {
            c.abort();
        }
        node::kubelet::stop_all(&self.node).await;
        self.server.shutdown().await;
    }
}
