//! Projected volumes, as the kubelet fills them: `serviceAccountToken` sources through the
//! TokenRequest API (a token bound to the pod, refreshed before it expires), `configMap`,
//! `secret` and `downwardAPI` sources as files.
//!
//! On a real control plane the ServiceAccount admission plugin gives every pod that mounts
//! its service account's token the volume `kube-api-access-<suffix>`: a token (audience the
//! API server, one hour), the `kube-root-ca.crt` ConfigMap's `ca.crt` and the pod's
//! namespace, mounted at `/var/run/secrets/kubernetes.io/serviceaccount`. With these files
//! and `KUBERNETES_SERVICE_HOST`/`PORT`, clients such as kube-rs use their in-cluster
//! configuration, so each pod acts under its own ServiceAccount and RBAC applies to it.
//!
//! Follows the Kubernetes docs "Projected Volumes", "Configure Service Accounts for Pods"
//! (bound service account tokens: the kubelet refreshes a token once 80% of its lifetime has
//! passed, or after 24 hours) and the TokenRequest API (`serviceaccounts/token`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, KeyToPath, Pod, ProjectedVolumeSource, Secret, ServiceAccount,
};
use kube::api::{Api, PostParams};
use kube::ResourceExt;
use tokio::sync::watch;

use super::NodeContext;

/// `expirationSeconds` when a source does not say (the API's default).
const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// The longest a token is kept before it is refreshed, whatever its lifetime.
const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// Delay before retrying a refresh that failed.
const RETRY: Duration = Duration::from_secs(5);

/// A projected service-account token file the kubelet keeps fresh while the pod runs.
#[derive(Clone, Debug)]
pub struct TokenFile {
    /// The file on the host (inside the volume's directory).
    pub path: PathBuf,
    /// The pod's ServiceAccount.
    pub service_account: String,
    /// `audience`, or empty for the API server's own.
    pub audience: Option<String>,
    /// `expirationSeconds`.
    pub expiration_seconds: i64,
}

/// Writes the files of projected volume `source` into `dir` for `pod`, and returns the token
/// files to refresh.
///
/// # Errors
/// A message naming the source that failed: a missing ConfigMap or Secret (unless
/// `optional`), a missing key, an unsupported `fieldRef`, a refused TokenRequest.
pub async fn fill(
    ctx: &NodeContext,
    pod: &Pod,
    source: &ProjectedVolumeSource,
    dir: &Path,
) -> Result<Vec<TokenFile>, String> {
    let ns = pod.namespace().unwrap_or_default();
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut tokens = Vec::new();
    for s in source.sources.iter().flatten() {
        if let Some(t) = &s.service_account_token {
            let token = TokenFile {
                path: dir.join(&t.path),
                service_account: pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into()),
                audience: t.audience.clone().filter(|a| !a.is_empty()),
                expiration_seconds: t.expiration_seconds.unwrap_or(DEFAULT_EXPIRATION_SECONDS),
            };
            let value = request_token(ctx, pod, &token).await?;
            write_atomically(&token.path, value.as_bytes())?;
            tokens.push(token);
        }
        if let Some(c) = &s.config_map {
            let optional = c.optional == Some(true);
            let found = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
                .get_opt(&c.name)
                .await
                .map_err(|e| format!("configmap {:?}: {e}", c.name))?;
            let data: BTreeMap<String, Vec<u8>> = match found {
                Some(cm) => cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect(),
                None if optional => continue,
                None => return Err(format!("configmap {:?} not found", c.name)),
            };
            write_items(
                dir,
                &data,
                c.items.as_deref(),
                optional,
                "configmap",
                &c.name,
            )?;
        }
        if let Some(c) = &s.secret {
            let optional = c.optional == Some(true);
            let found = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
                .get_opt(&c.name)
                .await
                .map_err(|e| format!("secret {:?}: {e}", c.name))?;
            let data: BTreeMap<String, Vec<u8>> = match found {
                Some(secret) => secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect(),
                None if optional => continue,
                None => return Err(format!("secret {:?} not found", c.name)),
            };
            write_items(dir, &data, c.items.as_deref(), optional, "secret", &c.name)?;
        }
        if let Some(d) = &s.downward_api {
            for item in d.items.iter().flatten() {
                let Some(field) = &item.field_ref else {
                    return Err(format!(
                        "downwardAPI {}: only fieldRef is supported by the lab",
                        item.path
                    ));
                };
                let value = match field.field_path.as_str() {
                    "metadata.namespace" => ns.clone(),
                    "metadata.name" => pod.name_any(),
                    "metadata.uid" => pod.uid().unwrap_or_default(),
                    "spec.nodeName" => ctx.node_name.clone(),
                    "spec.serviceAccountName" => pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.clone())
                        .unwrap_or_default(),
                    other => {
                        return Err(format!(
                            "downwardAPI fieldRef {other} is not supported by the lab"
                        ))
                    }
                };
                write_atomically(&dir.join(&item.path), value.as_bytes())?;
            }
        }
    }
    Ok(tokens)
}

/// Writes the selected keys (`items`, else every key) of a ConfigMap or Secret.
fn write_items(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    optional: bool,
    kind: &str,
    name: &str,
) -> Result<(), String> {
    match items {
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(v) => write_atomically(&dir.join(&item.path), v)?,
                    None if optional => {}
                    None => return Err(format!("key {:?} not in {kind} {name:?}", item.key)),
                }
            }
        }
        None => {
            for (k, v) in data {
                write_atomically(&dir.join(k), v)?;
            }
        }
    }
    Ok(())
}

/// Replaces `path` with `bytes` through a rename, so a reader never sees half a token.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    let tmp = path.with_extension("tmp-ferry-lab");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Requests a token bound to `pod` for `token`'s ServiceAccount and audience.
async fn request_token(ctx: &NodeContext, pod: &Pod, token: &TokenFile) -> Result<String, String> {
    let api: Api<ServiceAccount> =
        Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: token.audience.iter().cloned().collect(),
            expiration_seconds: Some(token.expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
        },
        ..TokenRequest::default()
    };
    let answer = api
        .create_token_request(&token.service_account, &PostParams::default(), &request)
        .await
        .map_err(|e| {
            format!(
                "requesting a token for serviceaccount {:?}: {e}",
                token.service_account
            )
        })?;
    answer
        .status
        .map(|s| s.token)
        .ok_or_else(|| "the TokenRequest answer has no status".to_string())
}

/// Refreshes `tokens` once 80% of their lifetime has passed (at most every 24 hours) until
/// `stopped` says the pod stopped. A failed refresh is logged and retried; the old token
/// stays in place meanwhile.
pub async fn refresh(
    ctx: std::sync::Arc<NodeContext>,
    pod: Pod,
    tokens: Vec<TokenFile>,
    mut stopped: watch::Receiver<bool>,
) {
    if tokens.is_empty() {
        return;
    }
    let period = |t: &TokenFile| {
        Duration::from_secs((t.expiration_seconds.max(10) as u64) * 8 / 10).min(MAX_REFRESH)
    };
    let mut next: Vec<tokio::time::Instant> = tokens
        .iter()
        .map(|t| tokio::time::Instant::now() + period(t))
        .collect();
    loop {
        let Some((i, at)) = next.iter().copied().enumerate().min_by_key(|(_, at)| *at) else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = stopped.changed() => return,
        }
        let token = &tokens[i];
        next[i] = match request_token(&ctx, &pod, token).await {
            Ok(value) => match write_atomically(&token.path, value.as_bytes()) {
                Ok(()) => tokio::time::Instant::now() + period(token),
                Err(e) => {
                    tracing::warn!(pod = %pod.name_any(), error = %e, "refreshing a projected token");
                    tokio::time::Instant::now() + RETRY
                }
            },
            Err(e) => {
                tracing::warn!(pod = %pod.name_any(), error = %e, "refreshing a projected token");
                tokio::time::Instant::now() + RETRY
            }
        };
    }
}
