//! Applying a manifest to a site: server-side apply (forced, one field manager) through the
//! resource that discovery finds for its `apiVersion` and `kind`, namespaced or cluster-scoped.
//! See the Kubernetes "Server-Side Apply" documentation.

use kube::api::{DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::{pinned_kind, Scope};
use kube::{Api, Client};
use serde_json::Value;

/// Failures applying one object; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("applying {kind} {namespace}/{name}: {message}")]
pub struct ApplyError {
    /// Kind.
    pub kind: String,
    /// Namespace (empty for cluster-scoped objects).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Discovery's or the API's message.
    pub message: String,
}

/// Applies `object` (a full manifest with `apiVersion`, `kind`, `metadata.name` and, for a
/// namespaced kind, `metadata.namespace`) with server-side apply as `manager`, forcing
/// conflicts.
///
/// # Errors
/// [`ApplyError`] when the kind is not served or the API refuses the object.
pub async fn apply_object(
    client: &Client,
    object: &Value,
    manager: &str,
) -> Result<(), ApplyError> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let fail = |message: String| ApplyError {
        kind: kind.to_string(),
        namespace: namespace.to_string(),
        name: name.to_string(),
        message,
    };
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let (resource, capabilities) =
        pinned_kind(client, &GroupVersionKind::gvk(group, version, kind))
            .await
            .map_err(|e| fail(format!("discovering {api_version} {kind}: {e}")))?;
    let api: Api<DynamicObject> = match capabilities.scope {
        Scope::Namespaced if namespace.is_empty() => {
            Api::default_namespaced_with(client.clone(), &resource)
        }
        Scope::Namespaced => Api::namespaced_with(client.clone(), namespace, &resource),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(object),
    )
    .await
    .map(|_| ())
    .map_err(|e| fail(e.to_string()))
}
