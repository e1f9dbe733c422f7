//! Links between sites, and between sites and witnesses, and partitions of them.
//!
//! Every cross-site connection Ferry makes goes through a link: a TCP proxy that the process of
//! the endpoint being reached runs for each site that may reach it. A site runs two links per
//! peer site, one for the replicator's gRPC port and one for the API server (the kubeconfig a
//! peer's controller uses); a witness runs one per site, for its gRPC port. `ferry-lab up`
//! points the `Site` objects, kubeconfig Secrets and witness list of site `x` at the links
//! from `x`. Since everything shares the loopback interface, a link's port is what tells
//! traffic from `x` apart.
//!
//! `ferry-lab site partition NAME` adds the site to `DIR/partitions.json`; every link from or
//! to a partitioned site then refuses new connections and drops the ones it carries (within
//! [`POLL`]), so the site loses its peers and the witnesses at once, as a cut uplink would.
//! `heal` removes it. The harness (tests, `kubectl` with `DIR/<site>/kubeconfig`) reaches each
//! site directly and is never cut; witnesses reach each other directly.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// The replicator's port for peers, behind the replication link.
pub const REPLICATION_PORT: u16 = 7443;
/// How often links look for new sites and for partition changes.
pub const POLL: Duration = Duration::from_millis(100);
/// Service name of a site's replicator link.
pub const REPLICATION: &str = "replication";
/// Service name of a site's API server link.
pub const API: &str = "api";
/// Service name of a witness's link.
pub const WITNESS: &str = "witness";

/// Ports of the links from one site into an endpoint, by service name.
pub type LinkPorts = BTreeMap<String, u16>;

/// A service an endpoint offers through links: its name and where the links forward to.
#[derive(Clone, Debug)]
pub struct Service {
    /// [`REPLICATION`], [`API`] or [`WITNESS`].
    pub name: &'static str,
    /// The address behind the links.
    pub target: SocketAddr,
}

/// An endpoint reached through links: a site or a witness.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Its name in `DIR/partitions.json` and in log lines: a site name or `w<id>`.
    pub name: String,
    /// Its directory, which holds `links.json`.
    pub root: PathBuf,
    /// The address its links listen on.
    pub ip: IpAddr,
    /// What the links forward to.
    pub services: Vec<Service>,
}

/// `<root>/links.json`: source site → the ports of its links into the endpoint at `root`.
pub fn links_path(root: &Path) -> PathBuf {
    root.join("links.json")
}

/// The links into the endpoint at `root`, by source site (empty when none yet).
pub fn read_links(root: &Path) -> BTreeMap<String, LinkPorts> {
    std::fs::read(links_path(root))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The port of service `service` on the link from site `from` into the endpoint at `root`,
/// once the endpoint's process has opened it.
///
/// # Errors
/// When no such link appears within `timeout`.
pub async fn wait_link(root: &Path, from: &str, service: &str, timeout: Duration) -> Result<u16> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(port) = read_links(root).get(from).and_then(|p| p.get(service)) {
            return Ok(*port);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "{} opened no {service} link for site {from} within {timeout:?}",
                root.display()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `DIR/partitions.json`: the partitioned sites.
pub fn partitions_path(dir: &Path) -> PathBuf {
    dir.join("partitions.json")
}

/// The partitioned sites.
pub fn read_partitions(dir: &Path) -> BTreeSet<String> {
    std::fs::read(partitions_path(dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Partitions (`cut`) or heals `site`.
///
/// # Errors
/// When the file cannot be written.
pub fn set_partitioned(dir: &Path, site: &str, cut: bool) -> Result<()> {
    let mut sites = read_partitions(dir);
    if cut {
        sites.insert(site.to_string());
    } else {
        sites.remove(site);
    }
    let path = partitions_path(dir);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&sites)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

fn is_cut(dir: &Path, from: &str, to: &str) -> bool {
    let cut = read_partitions(dir);
    cut.contains(from) || cut.contains(to)
}

type Connections = Arc<Mutex<Vec<AbortHandle>>>;

/// Runs the links into `endpoint` until the process ends: creates them for every site of the
/// lab (other than the endpoint itself) as it appears, keeps their ports across restarts in
/// `links.json`, and cuts connections of partitioned links.
pub async fn run(dir: PathBuf, endpoint: Endpoint) {
    let mut served: BTreeMap<String, Connections> = BTreeMap::new();
    loop {
        let mut links = read_links(&endpoint.root);
        let mut changed = false;
        for source in crate::sites::list_sites(&dir) {
            if source == endpoint.name || served.contains_key(&source) {
                continue;
            }
            let wanted = links.get(&source).cloned().unwrap_or_default();
            match open_link(&dir, &source, &endpoint, &wanted).await {
                Ok((ports, connections)) => {
                    changed |= links.get(&source) != Some(&ports);
                    links.insert(source.clone(), ports);
                    served.insert(source, connections);
                }
                Err(e) => tracing::warn!(source, to = %endpoint.name, error = %e, "opening a link"),
            }
        }
        if changed {
            let _ = std::fs::write(
                links_path(&endpoint.root),
                serde_json::to_vec_pretty(&links).unwrap_or_default(),
            );
        }
        for (source, connections) in &served {
            if is_cut(&dir, source, &endpoint.name) {
                for handle in connections
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .drain(..)
                {
                    handle.abort();
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn open_link(
    dir: &Path,
    from: &str,
    endpoint: &Endpoint,
    wanted: &LinkPorts,
) -> Result<(LinkPorts, Connections)> {
    let connections: Connections = Arc::default();
    let mut ports = LinkPorts::new();
    for service in &endpoint.services {
        let wanted_port = wanted.get(service.name).copied().unwrap_or(0);
        let listener = bind(endpoint.ip, wanted_port).await?;
        ports.insert(service.name.to_string(), listener.local_addr()?.port());
        tokio::spawn(proxy(
            dir.to_path_buf(),
            from.to_string(),
            endpoint.name.clone(),
            listener,
            service.target,
            connections.clone(),
        ));
    }
    Ok((ports, connections))
}

async fn bind(ip: IpAddr, port: u16) -> Result<TcpListener> {
    match TcpListener::bind(SocketAddr::new(ip, port)).await {
        Ok(l) => Ok(l),
        // The recorded port was taken meanwhile: take any.
        Err(_) if port != 0 => Ok(TcpListener::bind(SocketAddr::new(ip, 0)).await?),
        Err(e) => Err(e.into()),
    }
}

async fn proxy(
    dir: PathBuf,
    from: String,
    to: String,
    listener: TcpListener,
    target: SocketAddr,
    connections: Connections,
) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        if is_cut(&dir, &from, &to) {
            drop(inbound);
            continue;
        }
        let task = tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(target).await {
                // As a router forwards packets: no Nagle delay added to small messages.
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
        let mut list = connections.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|h| !h.is_finished());
        list.push(task.abort_handle());
    }
}
