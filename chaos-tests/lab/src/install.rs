//! Installing Ferry into running lab sites, as an operator would on clusters: the manifests of
//! `deploy/` (embedded at build time, so `ferry-lab` works from any directory), a per-site
//! ConfigMap `ferry-site` and TLS Secret `ferry-replicator-tls`, and a `Site` object for every
//! site with a Secret holding that site's kubeconfig. See deploy/README.md.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{Api, Client};
use serde_json::{json, Value};

use ferry_replicator::tls::{CertificateAuthority, TlsMaterial};

use crate::links;
use crate::site::client_from;
use crate::sites::SiteLayout;

/// Field manager of what the lab applies.
pub const MANAGER: &str = "ferry-lab";
/// Ferry's namespace.
pub const NAMESPACE: &str = "ferry-system";
/// The replicator's port for peers.
pub const REPLICATION_PORT: u16 = crate::links::REPLICATION_PORT;
/// How long the components may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// `deploy/` files in the order `deploy/kustomization.yaml` lists them, embedded.
pub const DEPLOY_FILES: [(&str, &str); 8] = [
    (
        "helm/ferry/crds/sites.ferry.dev.yaml",
        include_str!("../../../deploy/helm/ferry/crds/sites.ferry.dev.yaml"),
    ),
    (
        "helm/ferry/crds/drpairs.ferry.dev.yaml",
        include_str!("../../../deploy/helm/ferry/crds/drpairs.ferry.dev.yaml"),
    ),
    (
        "helm/ferry/crds/migrations.ferry.dev.yaml",
        include_str!("../../../deploy/helm/ferry/crds/migrations.ferry.dev.yaml"),
    ),
    (
        "helm/ferry/crds/drdrills.ferry.dev.yaml",
        include_str!("../../../deploy/helm/ferry/crds/drdrills.ferry.dev.yaml"),
    ),
    (
        "base/namespace.yaml",
        include_str!("../../../deploy/base/namespace.yaml"),
    ),
    (
        "base/rbac.yaml",
        include_str!("../../../deploy/base/rbac.yaml"),
    ),
    (
        "base/replicator.yaml",
        include_str!("../../../deploy/base/replicator.yaml"),
    ),
    (
        "base/controller.yaml",
        include_str!("../../../deploy/base/controller.yaml"),
    ),
];

/// The objects of every embedded `deploy/` file, in order.
///
/// # Errors
/// When a file is not valid YAML.
pub fn deploy_objects() -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (name, text) in DEPLOY_FILES {
        for document in serde_yaml::Deserializer::from_str(text) {
            let value: Value = serde::Deserialize::deserialize(document)
                .with_context(|| format!("parsing deploy/{name}"))?;
            if !value.is_null() {
                out.push(value);
            }
        }
    }
    Ok(out)
}

/// Applies `object` with server-side apply, finding its resource through discovery.
///
/// # Errors
/// When the kind is not served or the apply is refused.
pub async fn apply(client: &Client, object: &Value) -> Result<()> {
    Ok(ferry_manifests::apply_object(client, object, MANAGER).await?)
}

/// Where a holder of lab TLS material keeps it, and the names its certificate must carry.
struct Holder {
    name: String,
    dir: std::path::PathBuf,
    sans: Vec<String>,
}

fn holders(dir: &Path, sites: &[(String, std::net::IpAddr)]) -> Result<Vec<Holder>> {
    let mut out: Vec<Holder> = sites
        .iter()
        .map(|(site, ip)| Holder {
            name: site.clone(),
            dir: SiteLayout::in_lab(dir, site).root.join("tls"),
            sans: vec![
                ip.to_string(),
                format!("ferry-replicator.{NAMESPACE}.svc"),
                "localhost".into(),
            ],
        })
        .collect();
    for id in crate::witnesses::list_witnesses(dir) {
        let layout = crate::witnesses::WitnessLayout::in_lab(dir, id);
        let record = layout.read_record()?;
        out.push(Holder {
            name: format!("witness-{id}"),
            dir: layout.tls(),
            sans: vec![record.listen.ip().to_string()],
        });
    }
    Ok(out)
}

/// The lab's TLS material: one CA, a leaf per site (in `DIR/<site>/tls/`; SANs: the site's
/// address and the replicator Service's DNS name) and per witness (in
/// `DIR/witnesses/w<i>/tls/`; SAN: its address). Generated anew, for all, when any holder
/// lacks material from the shared CA. Returns the sites' material.
///
/// # Errors
/// When a site has no record or the material cannot be generated or written.
pub fn lab_tls(dir: &Path, sites: &[String]) -> Result<BTreeMap<String, TlsMaterial>> {
    let mut addresses = Vec::new();
    for site in sites {
        let record = SiteLayout::in_lab(dir, site).read_record()?;
        addresses.push((site.clone(), record.listen.ip()));
    }
    let holders = holders(dir, &addresses)?;
    let existing: Option<Vec<TlsMaterial>> = holders
        .iter()
        .map(|h| TlsMaterial::from_dir(&h.dir).ok())
        .collect();
    let shared_ca = existing.as_ref().is_some_and(|all| {
        all.iter()
            .all(|m| all.first().is_some_and(|f| f.ca_pem == m.ca_pem))
    });
    if !shared_ca {
        let ca = CertificateAuthority::generate("ferry-lab")?;
        for holder in &holders {
            let material = ca.issue(&holder.name, &holder.sans)?;
            std::fs::create_dir_all(&holder.dir)?;
            material.write_dir(&holder.dir)?;
        }
    }
    sites
        .iter()
        .map(|site| {
            let path = SiteLayout::in_lab(dir, site).root.join("tls");
            Ok((site.clone(), TlsMaterial::from_dir(&path)?))
        })
        .collect()
}

/// What `ferry-lab up` sets per lab for Ferry's controllers.
#[derive(Clone, Copy, Debug)]
pub struct InstallOptions {
    /// The witness lease each active site holds per pair (`ferry-site` key `lease`).
    pub lease: Duration,
}

impl Default for InstallOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(10),
        }
    }
}

/// Installs Ferry into every site of `sites` (all already running in lab directory `dir`,
/// with the lab's witnesses, if any, started) and waits until its components are ready. The
/// `ferry-site` ConfigMap of each site names the witnesses through that site's links into
/// them (key `witnesses`, empty without witnesses) and the lease (key `lease`).
///
/// # Errors
/// When a site is unreachable, an object is refused, or a component is not ready within
/// [`READY_TIMEOUT`] (the message names it).
pub async fn install(dir: &Path, sites: &[String], options: InstallOptions) -> Result<()> {
    let tls = lab_tls(dir, sites)?;
    let objects = deploy_objects()?;
    for site in sites {
        let client = client_from(&SiteLayout::in_lab(dir, site).kubeconfig()).await?;
        // CRDs and the namespace first, then the per-site configuration, then the components.
        let (early, late): (Vec<&Value>, Vec<&Value>) = objects.iter().partition(|o| {
            matches!(
                o["kind"].as_str(),
                Some("CustomResourceDefinition" | "Namespace")
            )
        });
        for object in early {
            apply(&client, object).await?;
        }
        let material = &tls[site];
        let witnesses = crate::witnesses::addresses_for(dir, site, LINK_TIMEOUT).await?;
        let lease = humantime::format_duration(options.lease).to_string();
        apply(&client, &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ferry-site", "namespace": NAMESPACE}, "data": {"site": site, "witnesses": witnesses.join(","), "lease": lease}})).await?;
        apply(&client, &json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": {"name": "ferry-replicator-tls", "namespace": NAMESPACE}, "stringData": material.to_secret_data()})).await?;
        for peer in sites {
            let peer_layout = SiteLayout::in_lab(dir, peer);
            let mut kubeconfig = std::fs::read_to_string(peer_layout.kubeconfig())?;
            let api = peer_layout.read_record()?.listen;
            // A peer is reached through the links into it for this site (partitionable).
            let mut replication = std::net::SocketAddr::new(api.ip(), REPLICATION_PORT);
            if peer != site {
                let wait =
                    |service| links::wait_link(&peer_layout.root, site, service, LINK_TIMEOUT);
                let api_link = std::net::SocketAddr::new(api.ip(), wait(links::API).await?);
                kubeconfig = kubeconfig.replace(&api.to_string(), &api_link.to_string());
                replication.set_port(wait(links::REPLICATION).await?);
            }
            let secret = format!("ferry-site-{peer}-kubeconfig");
            apply(&client, &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret, "namespace": NAMESPACE}, "stringData": {"kubeconfig": kubeconfig}})).await?;
            apply(
                &client,
                &json!({
                    "apiVersion": "ferry.dev/v1alpha1", "kind": "Site", "metadata": {"name": peer},
                    "spec": {
                        "replicatorEndpoint": replication.to_string(),
                        "tlsSecretRef": {"name": "ferry-replicator-tls", "namespace": NAMESPACE},
                        "kubeconfigSecretRef": {"name": secret, "namespace": NAMESPACE},
                    },
                }),
            )
            .await?;
        }
        for object in late {
            apply(&client, object).await?;
        }
    }
    for site in sites {
        let client = client_from(&SiteLayout::in_lab(dir, site).kubeconfig()).await?;
        for component in ["ferry-replicator", "ferry-controller"] {
            wait_ready(&client, component)
                .await
                .with_context(|| format!("site {site}"))?;
        }
        println!(
            "site {site}: Ferry deployed (ferry-replicator, ferry-controller, Sites {})",
            sites.join(", ")
        );
    }
    Ok(())
}

/// How long a site or witness process may take to open its links for a new site.
const LINK_TIMEOUT: Duration = Duration::from_secs(15);

async fn wait_ready(client: &Client, name: &str) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let ready = api
            .get_opt(name)
            .await?
            .and_then(|d| d.status)
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        if ready >= 1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{NAMESPACE}/{name} not ready after {}s",
                READY_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_the_kustomization_is_embedded() {
        let kustomization = include_str!("../../../deploy/kustomization.yaml");
        let listed: Vec<&str> = kustomization
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- "))
            .collect();
        let embedded: Vec<&str> = DEPLOY_FILES.iter().map(|(n, _)| *n).collect();
        assert_eq!(listed, embedded);
        let objects = deploy_objects().unwrap();
        assert!(objects
            .iter()
            .any(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "ferry-replicator"));
    }
}
