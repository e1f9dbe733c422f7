//! One running site in this process: its control plane (the lab's API server, or a real
//! Kubernetes control plane as child processes), its kubeconfig and its node.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Config;

use crate::apiserver::{store::WATCH_WINDOW, ApiServer, ApiServerConfig};
use crate::control_plane::{ControlPlane, KubeKit, KubernetesPlane};
use crate::node::{self, catalog::Catalog, timeline::Timeline, volumes::VolumeUsers, NodeContext};
use crate::sites::SiteLayout;

/// A site's running control plane.
pub enum Plane {
    /// The lab's own API server, in this process.
    Lab(ApiServer),
    /// etcd, kube-apiserver, kube-controller-manager and kube-scheduler, as child processes.
    Kubernetes(KubernetesPlane),
}

/// A running site: control plane plus node controllers.
pub struct SiteRuntime {
    /// The control plane.
    pub plane: Plane,
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
        let node = node_context(
            name,
            &layout,
            listen.ip(),
            server.addr(),
            catalog,
            ControlPlane::Lab,
        )
        .await?;
        server.serve_exec(Arc::new(node::kubelet::KubeletExec(node.clone())));
        let controllers = node::spawn_all(node.clone());
        Ok(Self {
            plane: Plane::Lab(server),
            node,
            controllers,
        })
    }

    /// Starts site `name` with files under `root` on a real Kubernetes control plane from
    /// `kit`, listening on `ip` (see [`crate::control_plane`]): installs the
    /// `snapshot.storage.k8s.io` CRDs (the files in `snapshot_crds`, else the lab's own
    /// definitions), then registers the node and starts its controllers in the roles a
    /// cluster leaves to nodes and drivers (kubelet, CSI provisioner, snapshotter).
    ///
    /// # Errors
    /// When the control plane does not start (see [`KubernetesPlane::start`]) or the CRDs
    /// are refused.
    pub async fn start_kubernetes(
        name: &str,
        root: &Path,
        ip: IpAddr,
        kit: &KubeKit,
        snapshot_crds: Option<&Path>,
        catalog: Catalog,
    ) -> Result<Self> {
        let layout = SiteLayout::new(root);
        std::fs::create_dir_all(&layout.root)
            .with_context(|| format!("creating {}", layout.root.display()))?;
        let plane = KubernetesPlane::start(name, &layout, ip, kit)
            .await
            .with_context(|| format!("starting the Kubernetes control plane of site {name}"))?;
        let node = node_context(
            name,
            &layout,
            ip,
            plane.addr(),
            catalog,
            ControlPlane::Kubernetes,
        )
        .await?;
        node::snapshots::install_crds(&node.client, snapshot_crds)
            .await
            .context("installing the snapshot.storage.k8s.io CRDs")?;
        let mut controllers = node::spawn_all(node.clone());
        controllers.push(tokio::spawn(crate::control_plane::publish_service_ca(
            node.client.clone(),
            plane.ca_pem().to_string(),
        )));
        Ok(Self {
            plane: Plane::Kubernetes(plane),
            node,
            controllers,
        })
    }

    /// The API server's address.
    pub fn addr(&self) -> SocketAddr {
        match &self.plane {
            Plane::Lab(server) => server.addr(),
            Plane::Kubernetes(plane) => plane.addr(),
        }
    }

    /// Stops the node's pods, then the control plane.
    pub async fn shutdown(self) {
        for c in &self.controllers {
            c.abort();
        }
        node::kubelet::stop_all(&self.node).await;
        match self.plane {
            Plane::Lab(server) => server.shutdown().await,
            Plane::Kubernetes(plane) => plane.shutdown().await,
        }
    }
}

/// The node's shared context for a site whose kubeconfig is written, with its directories.
async fn node_context(
    name: &str,
    layout: &SiteLayout,
    ip: IpAddr,
    api: SocketAddr,
    catalog: Catalog,
    control_plane: ControlPlane,
) -> Result<Arc<NodeContext>> {
    let client = client_from(&layout.kubeconfig()).await?;
    let node = Arc::new(NodeContext {
        site: name.to_string(),
        node_name: format!("lab-{name}"),
        client,
        root: layout.node(),
        ip,
        api,
        kubeconfig: layout.kubeconfig(),
        timeline: Timeline::new(layout.timeline()),
        volume_users: VolumeUsers::default(),
        catalog,
        running: Default::default(),
        control_plane,
    });
    for dir in [node.volumes_dir(), node.snapshots_dir(), node.pods_dir()] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(node)
}
