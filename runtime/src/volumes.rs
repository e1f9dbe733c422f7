//! PVCs and CSI VolumeSnapshots (snapshot.storage.k8s.io/v1, the CSI snapshot API), the way
//! Ferry uses them: snapshot a PVC (a replica, a source capture, a seed), wait until the
//! snapshot is ready to use, restore a PVC from it (`dataSource`), and delete what a job
//! created.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use serde_json::json;

/// A volume operation that failed; the message names the object.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// An API call failed, or the snapshotter reported an error.
    #[error("{0}")]
    Kube(String),
    /// A step did not finish within [`VOLUME_TIMEOUT`].
    #[error("timed out {0}")]
    Timeout(String),
    /// A PVC could not grow: its StorageClass does not allow expansion (or the API server
    /// refused for another reason it names).
    #[error("{0}")]
    NotExpandable(String),
}

/// How long a VolumeSnapshot may take to become ready, or a PVC to go away.
pub const VOLUME_TIMEOUT: Duration = Duration::from_secs(300);

/// The VolumeSnapshot API resource.
pub fn snapshot_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
        "volumesnapshots",
    )
}

/// The VolumeSnapshotContent API resource (cluster-scoped).
pub fn content_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent"),
        "volumesnapshotcontents",
    )
}

fn snapshots(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &snapshot_resource())
}

fn kube_error(what: String) -> impl FnOnce(kube::Error) -> VolumeError {
    move |e| VolumeError::Kube(format!("{what}: {e}"))
}

/// What a restored PVC copies from the original: mode, class and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimShape {
    /// volumeMode Block.
    pub block: bool,
    /// storageClassName, if set.
    pub storage_class: Option<String>,
    /// Requested storage, e.g. `1Gi`.
    pub capacity: String,
}

impl ClaimShape {
    /// The shape of `pvc`.
    pub fn of(pvc: &PersistentVolumeClaim) -> Self {
        let spec = pvc.spec.clone().unwrap_or_default();
        Self {
            block: spec.volume_mode.as_deref() == Some("Block"),
            storage_class: spec.storage_class_name,
            capacity: spec
                .resources
                .and_then(|r| r.requests)
                .and_then(|r| r.get("storage").map(|q| q.0.clone()))
                .unwrap_or_else(|| "1Gi".into()),
        }
    }
}

/// Creates VolumeSnapshot `name` of PVC `claim`, labelled with `labels`, and waits until it is
/// ready to use.
///
/// # Errors
/// [`VolumeError::Kube`] naming the snapshot and the error the snapshotter reported;
/// [`VolumeError::Timeout`].
pub async fn snapshot_claim(
    client: &Client,
    namespace: &str,
    name: &str,
    claim: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Result<(), VolumeError> {
    let api = snapshots(client, namespace);
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {"source": {"persistentVolumeClaimName": claim}},
    }))
    .map_err(|e| VolumeError::Kube(format!("building VolumeSnapshot {name}: {e}")))?;
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        // A retry of the same job: the snapshot is already there.
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => {
            return Err(kube_error(format!(
                "creating VolumeSnapshot {namespace}/{name}"
            ))(e))
        }
    }
    let ready = |object: Option<&DynamicObject>| {
        object
            .and_then(|o| o.data.get("status"))
            .map(|s| s["readyToUse"] == true || !s["error"].is_null())
            .unwrap_or(false)
    };
    let done = tokio::time::timeout(VOLUME_TIMEOUT, await_condition(api, name, ready))
        .await
        .map_err(|_| {
            VolumeError::Timeout(format!(
                "for VolumeSnapshot {namespace}/{name} to become ready"
            ))
        })?
        .map_err(|e| {
            VolumeError::Kube(format!("watching VolumeSnapshot {namespace}/{name}: {e}"))
        })?;
    let status = done
        .as_ref()
        .and_then(|o| o.data.get("status"))
        .cloned()
        .unwrap_or_default();
    if status["readyToUse"] == true {
        Ok(())
    } else {
        Err(VolumeError::Kube(format!(
            "VolumeSnapshot {namespace}/{name} of PVC {claim} failed: {}",
            status["error"]["message"].as_str().unwrap_or("no message")
        )))
    }
}

/// Creates PVC `name` shaped like `shape`, filled from VolumeSnapshot `from` when given (else
/// empty), labelled with `labels`.
///
/// # Errors
/// [`VolumeError::Kube`] naming the claim.
pub async fn create_claim(
    client: &Client,
    namespace: &str,
    name: &str,
    shape: &ClaimShape,
    from: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> Result<(), VolumeError> {
    let mut spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "volumeMode": if shape.block { "Block" } else { "Filesystem" },
        "resources": {"requests": {"storage": shape.capacity}},
    });
    if let Some(class) = &shape.storage_class {
        spec["storageClassName"] = json!(class);
    }
    if let Some(snapshot) = from {
        spec["dataSource"] = json!({
            "apiGroup": "snapshot.storage.k8s.io",
            "kind": "VolumeSnapshot",
            "name": snapshot,
        });
    }
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": spec,
    }))
    .map_err(|e| VolumeError::Kube(format!("building PVC {name}: {e}")))?;
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pvc)
        .await
        .map(|_| ())
        .map_err(kube_error(format!("creating PVC {namespace}/{name}")))
}

/// Grows PVC `name` to `capacity` (a resource quantity such as `128Mi`) when it requests less,
/// and waits until its `status.capacity` says so (the CSI resizer is done). Returns the
/// request it had before, or `None` when it already requested at least `capacity`. Follows
/// "Expanding Persistent Volumes Claims" in the Kubernetes docs: the API server refuses the
/// change unless the claim's StorageClass has `allowVolumeExpansion: true`.
///
/// # Errors
/// [`VolumeError::NotExpandable`] naming the claim, the sizes and the StorageClass when the API
/// server refuses; [`VolumeError::Kube`] for other API errors or an unreadable size;
/// [`VolumeError::Timeout`] when the resize does not finish.
pub async fn expand_claim(
    client: &Client,
    namespace: &str,
    name: &str,
    capacity: &str,
) -> Result<Option<String>, VolumeError> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let bytes = |q: &str| {
        crate::quantity::parse_quantity(q)
            .map_err(|e| VolumeError::Kube(format!("PVC {namespace}/{name}: {e}")))
    };
    let want = bytes(capacity)?;
    let pvc = api
        .get(name)
        .await
        .map_err(kube_error(format!("reading PVC {namespace}/{name}")))?;
    let requested = ClaimShape::of(&pvc).capacity;
    if bytes(&requested)? >= want {
        return Ok(None);
    }
    let class = pvc
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default();
    let patch = json!({"spec": {"resources": {"requests": {"storage": capacity}}}});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => {
            return Err(VolumeError::NotExpandable(format!(
                "PVC {namespace}/{name} cannot grow from {requested} to {capacity}: StorageClass {class:?} does not allow volume expansion (allowVolumeExpansion), or the claim is not bound: {}",
                e.message
            )));
        }
        Err(e) => {
            return Err(kube_error(format!(
                "expanding PVC {namespace}/{name} to {capacity}"
            ))(e))
        }
    }
    let grown = move |p: Option<&PersistentVolumeClaim>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("storage"))
            .and_then(|q| crate::quantity::parse_quantity(&q.0).ok())
            .is_some_and(|b| b >= want)
    };
    tokio::time::timeout(VOLUME_TIMEOUT, await_condition(api, name, grown))
        .await
        .map_err(|_| {
            VolumeError::Timeout(format!(
                "for PVC {namespace}/{name} to grow to {capacity} (StorageClass {class:?})"
            ))
        })?
        .map_err(|e| VolumeError::Kube(format!("watching PVC {namespace}/{name}: {e}")))?;
    Ok(Some(requested))
}

/// Deletes PVC `name` (if present) and waits until it is gone.
///
/// # Errors
/// [`VolumeError::Kube`] or [`VolumeError::Timeout`], naming the claim.
pub async fn delete_claim(client: &Client, namespace: &str, name: &str) -> Result<(), VolumeError> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let Some(existing) = api
        .get_opt(name)
        .await
        .map_err(kube_error(format!("reading PVC {namespace}/{name}")))?
    else {
        return Ok(());
    };
    let uid = existing.metadata.uid.unwrap_or_default();
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(kube_error(format!("deleting PVC {namespace}/{name}"))(e)),
    }
    tokio::time::timeout(
        VOLUME_TIMEOUT,
        await_condition(api, name, conditions::is_deleted(&uid)),
    )
    .await
    .map_err(|_| VolumeError::Timeout(format!("for PVC {namespace}/{name} to be deleted")))?
    .map_err(|e| VolumeError::Kube(format!("watching PVC {namespace}/{name}: {e}")))?;
    Ok(())
}

/// Deletes VolumeSnapshot `name` if present.
///
/// # Errors
/// [`VolumeError::Kube`].
pub async fn delete_snapshot(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(), VolumeError> {
    match snapshots(client, namespace)
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(kube_error(format!(
            "deleting VolumeSnapshot {namespace}/{name}"
        ))(e)),
    }
}

/// Names and labels of the VolumeSnapshots matching `selector` in `namespace`.
///
/// # Errors
/// [`VolumeError::Kube`].
pub async fn list_snapshots(
    client: &Client,
    namespace: &str,
    selector: &str,
) -> Result<Vec<(String, BTreeMap<String, String>)>, VolumeError> {
    let list = snapshots(client, namespace)
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(kube_error(format!(
            "listing VolumeSnapshots {selector} in {namespace}"
        )))?;
    Ok(list
        .items
        .into_iter()
        .map(|o| {
            (
                o.metadata.name.unwrap_or_default(),
                o.metadata.labels.unwrap_or_default(),
            )
        })
        .collect())
}
