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
pub const DEPLOY_FILES: [(&str, &str); 7] = [
    (
        "crds/sites.ferry.dev.yaml",
        include_str!("../../../deploy/crds/sites.ferry.dev.yaml"),
    ),
    (
        "crds/drpairs.ferry.dev.yaml",
        include_str!("../../../deploy/crds/drpairs.ferry.dev.yaml"),
    ),
    (
        "crds/migrations.ferry.dev.yaml",
        include_str!("../../../deploy/crds/migrations.ferry.dev.yaml"),
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
    Ok(ferry_replicator::manifests::apply_object(client, object, MANAGER).await?)
}

/// TLS material of every site, from `DIR/<site>/tls/`, generated (one CA for all) when any is
/// missing. SANs: the site's address and the replicator Service's DNS name.
fn tls_material(
    dir: &Path,
    sites: &[(String, std::net::IpAddr)],
) -> Result<BTreeMap<String, TlsMaterial>> {
    let tls_dir = |site: &str| SiteLayout::in_lab(dir, site).root.join("tls");
    let existing: Option<BTreeMap<String, TlsMaterial>> = sites
        .iter()
        .map(|(s, _)| {
            TlsMaterial::from_dir(tls_dir(s))
                .ok()
                .map(|m| (s.clone(), m))
        })
        .collect();
    if let Some(all) = existing {
        if all.values().all(|m| {
            m.ca_pem
                == all
                    .values()
                    .next()
                    .map(|f| f.ca_pem.clone())
                    .unwrap_or_default()
        }) {
            return Ok(all);
        }
    }
    let ca = CertificateAuthority::generate("ferry-lab")?;
    let mut out = BTreeMap::new();
    for (site, ip) in sites {
        let material = ca.issue(
            site,
            &[
                ip.to_string(),
                format!("ferry-replicator.{NAMESPACE}.svc"),
                "localhost".into(),
            ],
        )?;
        std::fs::create_dir_all(tls_dir(site))?;
        material.write_dir(tls_dir(site))?;
        out.insert(site.clone(), material);
    }
    Ok(out)
}

/// Installs Ferry into every site of `sites` (all already running in lab directory `dir`)
/// and waits until its components are ready.
///
/// # Errors
/// When a site is unreachable, an object is refused, or a component is not ready within
/// [`READY_TIMEOUT`] (the message names it).
pub async fn install(dir: &Path, sites: &[String]) -> Result<()> {
    let mut addresses = Vec::new();
    for site in sites {
        let record = SiteLayout::in_lab(dir, site).read_record()?;
        addresses.push((site.clone(), record.listen.ip()));
    }
    let tls = tls_material(dir, &addresses)?;
    let objects = deploy_objects()?;
    for (site, _) in &addresses {
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
        apply(&client, &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ferry-site", "namespace": NAMESPACE}, "data": {"site": site}})).await?;
        apply(&client, &json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": {"name": "ferry-replicator-tls", "namespace": NAMESPACE}, "stringData": material.to_secret_data()})).await?;
        for (peer, ip) in &addresses {
            let mut kubeconfig =
                std::fs::read_to_string(SiteLayout::in_lab(dir, peer).kubeconfig())?;
            // A peer is reached through the links into it for this site (partitionable).
            let mut replication_port = REPLICATION_PORT;
            if peer != site {
                let ports = wait_link(dir, site, peer).await?;
                let api = SiteLayout::in_lab(dir, peer).read_record()?.listen;
                kubeconfig = kubeconfig.replace(
                    &api.to_string(),
                    &std::net::SocketAddr::new(*ip, ports.api).to_string(),
                );
                replication_port = ports.replication;
            }
            let secret = format!("ferry-site-{peer}-kubeconfig");
            apply(&client, &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret, "namespace": NAMESPACE}, "stringData": {"kubeconfig": kubeconfig}})).await?;
            apply(
                &client,
                &json!({
                    "apiVersion": "ferry.dev/v1alpha1", "kind": "Site", "metadata": {"name": peer},
                    "spec": {
                        "replicatorEndpoint": format!("{ip}:{replication_port}"),
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
    for (site, _) in &addresses {
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

/// The links from `from` into `to`, once `to`'s process has opened them.
async fn wait_link(dir: &Path, from: &str, to: &str) -> Result<crate::links::LinkPorts> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(ports) = crate::links::read_links(dir, to).get(from) {
            return Ok(*ports);
        }
        if Instant::now() > deadline {
            bail!("site {to} opened no link for site {from} within 15s");
        }
        tokio::time::sleep(crate::links::POLL).await;
    }
}

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
