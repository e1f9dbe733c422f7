//! Links between sites, and partitions of them.
//!
//! Every cross-site connection Ferry makes goes through a link: a TCP proxy that the
//! destination site's process runs for each other site, one for the replicator's gRPC port and
//! one for the API server (the kubeconfig a peer's controller uses). `ferry-lab up` points the
//! `Site` objects and kubeconfig Secrets of site `x` at the links `x → peer`. Since all sites
//! share the loopback interface, a link's port is what tells traffic from `x` apart.
//!
//! `ferry-lab site partition NAME` adds the site to `DIR/partitions.json`; every link from or
//! to a partitioned site then refuses new connections and drops the ones it carries (within
//! [`POLL`]). `heal` removes it. The harness (tests, `kubectl` with `DIR/<site>/kubeconfig`)
//! reaches each site directly and is never cut.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// The replicator's port for peers, behind the replication link.
pub const REPLICATION_PORT: u16 = 7443;
/// How often links look for new sites and for partition changes.
pub const POLL: Duration = Duration::from_millis(100);

/// Ports of the links from one site to this one (on this site's address).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkPorts {
    /// Proxy to this site's replicator.
    pub replication: u16,
    /// Proxy to this site's API server.
    pub api: u16,
}

/// `DIR/<site>/links.json`: source site → the ports of its links into `site`.
pub fn links_path(dir: &Path, site: &str) -> PathBuf {
    dir.join(site).join("links.json")
}

/// The links into `site`, by source site (empty when none yet).
pub fn read_links(dir: &Path, site: &str) -> BTreeMap<String, LinkPorts> {
    std::fs::read(links_path(dir, site))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
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

/// Runs the links into `site` (address `ip`, API server at `api`) until the process ends:
/// creates them for every other site of the lab as it appears, keeps their ports across
/// restarts in `links.json`, and cuts connections of partitioned links.
pub async fn run(dir: PathBuf, site: String, ip: IpAddr, api: SocketAddr) {
    let mut served: BTreeMap<String, Connections> = BTreeMap::new();
    loop {
        let mut links = read_links(&dir, &site);
        let mut changed = false;
        for peer in crate::sites::list_sites(&dir) {
            if peer == site || served.contains_key(&peer) {
                continue;
            }
            let wanted = links.get(&peer).copied().unwrap_or_default();
            match open_link(&dir, &peer, &site, ip, api, wanted).await {
                Ok((ports, connections)) => {
                    changed |= links.insert(peer.clone(), ports) != Some(ports);
                    served.insert(peer, connections);
                }
                Err(e) => tracing::warn!(peer, error = %e, "opening a link"),
            }
        }
        if changed {
            let _ = std::fs::write(
                links_path(&dir, &site),
                serde_json::to_vec_pretty(&links).unwrap_or_default(),
            );
        }
        for (peer, connections) in &served {
            if is_cut(&dir, peer, &site) {
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
    to: &str,
    ip: IpAddr,
    api: SocketAddr,
    wanted: LinkPorts,
) -> Result<(LinkPorts, Connections)> {
    let connections: Connections = Arc::default();
    let replication = bind(ip, wanted.replication).await?;
    let api_link = bind(ip, wanted.api).await?;
    let ports = LinkPorts {
        replication: replication.local_addr()?.port(),
        api: api_link.local_addr()?.port(),
    };
    for (listener, target) in [
        (replication, SocketAddr::new(ip, REPLICATION_PORT)),
        (api_link, api),
    ] {
        tokio::spawn(proxy(
            dir.to_path_buf(),
            from.to_string(),
            to.to_string(),
            listener,
            target,
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
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
        let mut list = connections.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|h| !h.is_finished());
        list.push(task.abort_handle());
    }
}
