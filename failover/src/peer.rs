//! Reaching another site's API server: the kubeconfig in the Secret its `Site` object names
//! (`spec.kubeconfigSecretRef`, key `kubeconfig`), as Stork's ClusterPair does.

use k8s_openapi::api::core::v1::Secret;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use ferry_schemas::Site;

/// Key of the kubeconfig in the Secret.
pub const KUBECONFIG_KEY: &str = "kubeconfig";

/// Failures reaching a peer; each names the Site or Secret.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No Site object of that name at this site.
    #[error("Site {0} not found")]
    NoSite(String),
    /// The Site has no kubeconfigSecretRef.
    #[error("Site {0}: spec.kubeconfigSecretRef is not set")]
    NoKubeconfig(String),
    /// The Secret is missing or has no usable kubeconfig.
    #[error("Site {site}: Secret {namespace}/{name}: {message}")]
    Secret {
        /// The Site.
        site: String,
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The API call failed.
    #[error("reading Site {site}: {source}")]
    Api {
        /// The Site.
        site: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
}

/// A client for site `name`'s API server, built from its Site's kubeconfig Secret.
///
/// # Errors
/// [`PeerError`] naming what is missing.
pub async fn peer_client(local: &Client, name: &str) -> Result<Client, PeerError> {
    let site = Api::<Site>::all(local.clone())
        .get_opt(name)
        .await
        .map_err(|source| PeerError::Api {
            site: name.to_string(),
            source,
        })?
        .ok_or_else(|| PeerError::NoSite(name.to_string()))?;
    let reference = site
        .spec
        .kubeconfig_secret_ref
        .ok_or_else(|| PeerError::NoKubeconfig(name.to_string()))?;
    let secret_error = |message: String| PeerError::Secret {
        site: name.to_string(),
        namespace: reference.namespace.clone(),
        name: reference.name.clone(),
        message,
    };
    let secret = Api::<Secret>::namespaced(local.clone(), &reference.namespace)
        .get_opt(&reference.name)
        .await
        .map_err(|e| secret_error(e.to_string()))?
        .ok_or_else(|| secret_error("not found".into()))?;
    let bytes = secret
        .data
        .and_then(|d| d.get(KUBECONFIG_KEY).cloned())
        .map(|b| b.0)
        .or_else(|| {
            secret
                .string_data
                .and_then(|d| d.get(KUBECONFIG_KEY).cloned())
                .map(String::into_bytes)
        })
        .ok_or_else(|| secret_error(format!("no key {KUBECONFIG_KEY}")))?;
    let text = String::from_utf8(bytes).map_err(|e| secret_error(e.to_string()))?;
    let kubeconfig = Kubeconfig::from_yaml(&text).map_err(|e| secret_error(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| secret_error(e.to_string()))?;
    Client::try_from(config).map_err(|e| secret_error(e.to_string()))
}
