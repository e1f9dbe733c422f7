//! The lab's CSI driver, external-provisioner and PersistentVolume controller: provisions
//! host-path volumes for PVCs of the `ferry-lab` StorageClass, binds claims to volumes, fills
//! new volumes from a VolumeSnapshot `dataSource`, and reclaims volumes whose claim is gone.
//!
//! Follows the Kubernetes docs "Persistent Volumes" (provisioning, binding, reclaiming,
//! "Volume Snapshot and Restore Volume from Snapshot Support") and the behaviour of
//! kubernetes-csi/external-provisioner and the in-tree PV controller:
//!
//! 1. A claim that names a volume (`spec.volumeName`, static binding) is bound to that volume
//!    once it exists and is free or already reserved for the claim (`claimRef`).
//! 2. Otherwise, for the `ferry-lab` class or no class (the lab's default class), a volume
//!    `pvc-<claim uid>` is provisioned: a directory `<volumes_dir>/pvc-<uid>` for `Filesystem`,
//!    a sparse file `<volumes_dir>/pvc-<uid>.img` of exactly the requested bytes for `Block`.
//!    The PV's `csi.volumeAttributes.path` holds that absolute host path.
//! 3. Binding happens in the PV controller's order: PV `claimRef`, PV `status.phase: Bound`,
//!    PVC `spec.volumeName` plus the `pv.kubernetes.io/bind-completed` annotation, PVC status.
//!    Each step is idempotent, so a restart finishes a half-done binding.
//! 4. When a bound claim disappears, a `Delete` volume loses its data and its PV; a `Retain`
//!    volume becomes `Released` and keeps its data.
//!
//! Volume data is always written under a temporary name and renamed into place, so a crash
//! never leaves a half-filled volume that a restart would mistake for a complete one.
//!
//! Differences from a real cluster: `Filesystem` volumes are plain directories without a size
//! limit; there is no `kubernetes.io/pvc-protection` finalizer; only snapshots can be a data
//! source (no PVC cloning). Expansion ([`resize`], the CSI external-resizer's part) grows a
//! bound claim's volume in one step, with no separate node expansion.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, Event as CoreEvent, EventSource, ObjectReference, PersistentVolume,
    PersistentVolumeClaim, PersistentVolumeSpec,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::Instrument;

use super::snapshots::{self, CopyError, VolumeSnapshot, VolumeSnapshotContent};
use super::{NodeContext, CSI_DRIVER, STORAGE_CLASS};
use crate::control_plane::ControlPlane;

mod events;
mod provision;
mod resize;

pub use events::{EventKind, EventRecorder};
pub use ferry_runtime::quantity::{format_quantity, parse_quantity, QuantityError};
use provision::provision;

/// Field manager of the node's server-side applies and the `reportingComponent` of its Events.
pub const FIELD_MANAGER: &str = "ferry-lab-node";
/// PVC annotation the PV controller sets once a claim's binding is complete.
pub const ANN_BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
/// Annotation the PV controller sets on the side of a binding it established itself.
pub const ANN_BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
/// PVC annotation by which the PV controller hands a claim to a dynamic provisioner (its
/// value: the StorageClass's `provisioner`).
pub const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
/// PV annotation naming the provisioner that created the volume.
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// StorageClass annotation marking the cluster's default class (the API server's admission
/// gives unclassed claims that class).
pub use crate::apiserver::lifecycle::ANN_DEFAULT_CLASS;
/// The `csi.volumeAttributes` key holding a lab volume's absolute host path.
pub const PATH_ATTRIBUTE: &str = "path";
/// API group of the snapshot kinds, as a `dataSource.apiGroup` names it.
pub const SNAPSHOT_GROUP: &str = "snapshot.storage.k8s.io";

/// Delay before looking again at something that is expected to change soon (a snapshot
/// becoming ready, a statically named PV appearing).
const WAIT: Duration = Duration::from_millis(500);
/// Delay before retrying after an error.
const RETRY: Duration = Duration::from_secs(1);
/// Delay before retrying a refusal only a user can fix (a snapshot larger than the claim).
const REFUSED: Duration = Duration::from_secs(5);

/// How a volume is presented to pods (PVC/PV `spec.volumeMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VolumeMode {
    /// A directory mounted into the pod (the Kubernetes default).
    Filesystem,
    /// A raw block device; in the lab, an image file of the volume's exact size in bytes.
    Block,
}

impl VolumeMode {
    /// Reads `spec.volumeMode`: `Block` is Block, anything else (including unset) Filesystem,
    /// as the API server defaults it.
    pub fn from_spec(mode: Option<&str>) -> Self {
        match mode {
            Some("Block") => Self::Block,
            _ => Self::Filesystem,
        }
    }

    /// The API spelling: `Filesystem` or `Block`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Filesystem => "Filesystem",
            Self::Block => "Block",
        }
    }
}

/// Errors of the provisioner, binder and reclaimer, and of [`volume_path`].
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Applying the StorageClass or VolumeSnapshotClass at start.
    #[error("applying {kind} {name}")]
    ApplyClass {
        /// `StorageClass` or `VolumeSnapshotClass`.
        kind: &'static str,
        /// The class name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Reading a PVC.
    #[error("reading PersistentVolumeClaim {namespace}/{name}")]
    GetClaim {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The PVC does not exist.
    #[error("PersistentVolumeClaim {namespace}/{name} not found")]
    ClaimNotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Writing a PVC's spec, annotations or status.
    #[error("updating PersistentVolumeClaim {namespace}/{name}")]
    PatchClaim {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The PVC's `resources.requests.storage` is missing.
    #[error("PersistentVolumeClaim {namespace}/{name} requests no storage")]
    NoStorageRequest {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A storage size (a PVC request, a PV capacity) that is not a byte count.
    #[error("reading the storage size of {object}")]
    Size {
        /// `PersistentVolumeClaim ns/name` or `PersistentVolume name`.
        object: String,
        /// Why the quantity is invalid.
        #[source]
        source: QuantityError,
    },
    /// Reading a PV.
    #[error("reading PersistentVolume {name}")]
    GetVolume {
        /// PV name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Creating a provisioned PV.
    #[error("creating PersistentVolume {name}")]
    CreateVolume {
        /// PV name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing a PV's claimRef or status.
    #[error("updating PersistentVolume {name}")]
    PatchVolume {
        /// PV name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting a reclaimed PV.
    #[error("deleting PersistentVolume {name}")]
    DeleteVolume {
        /// PV name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The PV is reserved for, or bound to, another claim.
    #[error("PersistentVolume {volume} is bound to another claim ({claim})")]
    VolumeTaken {
        /// PV name.
        volume: String,
        /// The other claim, `ns/name (uid)`.
        claim: String,
    },
    /// A statically named PV cannot satisfy the claim.
    #[error("PersistentVolume {volume} does not fit the claim: {reason}")]
    VolumeMismatch {
        /// PV name.
        volume: String,
        /// Which property differs (capacity, volume mode, storage class).
        reason: String,
    },
    /// The PV is not a lab volume, so it has no host path.
    #[error("PersistentVolume {volume} is not served by {CSI_DRIVER} (driver {driver:?})")]
    ForeignVolume {
        /// PV name.
        volume: String,
        /// Its CSI driver, if any.
        driver: Option<String>,
    },
    /// A lab PV without the `path` volume attribute.
    #[error("PersistentVolume {volume} has no csi.volumeAttributes.path")]
    NoVolumePath {
        /// PV name.
        volume: String,
    },
    /// The claim's data source is not something the lab can provision from.
    #[error("unsupported dataSource {kind} {name} (only VolumeSnapshots of {SNAPSHOT_GROUP} in the claim's namespace)")]
    UnsupportedDataSource {
        /// Kind of the source.
        kind: String,
        /// Name of the source.
        name: String,
    },
    /// Reading the source VolumeSnapshot or its content.
    #[error("reading {kind} {name}")]
    GetSnapshot {
        /// `VolumeSnapshot` or `VolumeSnapshotContent`.
        kind: &'static str,
        /// `ns/name` or name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The source VolumeSnapshot does not exist.
    #[error("VolumeSnapshot {namespace}/{name} not found")]
    SnapshotNotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The source VolumeSnapshot is not ready to use yet (the claim waits).
    #[error("VolumeSnapshot {namespace}/{name} is not ready to use")]
    SnapshotNotReady {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The source VolumeSnapshot is being deleted.
    #[error("VolumeSnapshot {namespace}/{name} is being deleted")]
    SnapshotDeleting {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The snapshot is larger than the claim requests.
    #[error("VolumeSnapshot {namespace}/{name} needs {restore_bytes} bytes, the claim requests {request_bytes}")]
    SnapshotTooLarge {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The snapshot's `restoreSize` in bytes.
        restore_bytes: u64,
        /// The claim's request in bytes.
        request_bytes: u64,
    },
    /// The snapshot was taken of a volume of the other mode.
    #[error("VolumeSnapshot {namespace}/{name} holds a {snapshot:?} volume, the claim asks for {claim:?}")]
    SnapshotModeMismatch {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Mode of the snapshotted volume.
        snapshot: VolumeMode,
        /// Mode the claim asks for.
        claim: VolumeMode,
    },
    /// Creating, filling or sizing a volume's data on the host.
    #[error("preparing volume data at {}", path.display())]
    WriteData {
        /// The path being written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Copying a snapshot into a new volume.
    #[error("restoring {} into {}", from.display(), to.display())]
    RestoreData {
        /// The snapshot copy.
        from: PathBuf,
        /// The volume being filled.
        to: PathBuf,
        /// What the copy reported.
        #[source]
        source: CopyError,
    },
    /// Removing a reclaimed volume's data.
    #[error("removing volume data at {}", path.display())]
    RemoveData {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl StorageError {
    /// A stable, low-cardinality label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::ApplyClass { .. } => "apply_class",
            Self::GetClaim { .. } => "get_claim",
            Self::ClaimNotFound { .. } => "claim_not_found",
            Self::PatchClaim { .. } => "patch_claim",
            Self::NoStorageRequest { .. } => "no_storage_request",
            Self::Size { .. } => "size",
            Self::GetVolume { .. } => "get_volume",
            Self::CreateVolume { .. } => "create_volume",
            Self::PatchVolume { .. } => "patch_volume",
            Self::DeleteVolume { .. } => "delete_volume",
            Self::VolumeTaken { .. } => "volume_taken",
            Self::VolumeMismatch { .. } => "volume_mismatch",
            Self::ForeignVolume { .. } => "foreign_volume",
            Self::NoVolumePath { .. } => "no_volume_path",
            Self::UnsupportedDataSource { .. } => "unsupported_data_source",
            Self::GetSnapshot { .. } => "get_snapshot",
            Self::SnapshotNotFound { .. } => "snapshot_not_found",
            Self::SnapshotNotReady { .. } => "snapshot_not_ready",
            Self::SnapshotDeleting { .. } => "snapshot_deleting",
            Self::SnapshotTooLarge { .. } => "snapshot_too_large",
            Self::SnapshotModeMismatch { .. } => "snapshot_mode_mismatch",
            Self::WriteData { .. } => "write_data",
            Self::RestoreData { .. } => "restore_data",
            Self::RemoveData { .. } => "remove_data",
        }
    }

    /// The Warning Event reason a claim gets for this error, or `None` for a normal wait.
    fn claim_event_reason(&self) -> Option<&'static str> {
        match self {
            Self::SnapshotNotReady { .. } => None,
            Self::VolumeTaken { .. } | Self::VolumeMismatch { .. } => Some("FailedBinding"),
            _ => Some("ProvisioningFailed"),
        }
    }

    /// How long to wait before the next attempt.
    fn retry_after(&self) -> Duration {
        match self {
            Self::SnapshotNotReady { .. } => WAIT,
            Self::SnapshotTooLarge { .. }
            | Self::SnapshotModeMismatch { .. }
            | Self::UnsupportedDataSource { .. }
            | Self::NoStorageRequest { .. }
            | Self::Size { .. } => REFUSED,
            _ => RETRY,
        }
    }
}

/// A claim's bound volume as the node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundVolume {
    /// The PV's name (also its CSI `volumeHandle`).
    pub pv_name: String,
    /// Absolute host path: a directory for `Filesystem`, an image file for `Block`.
    pub path: PathBuf,
    /// The volume's mode.
    pub mode: VolumeMode,
    /// The PV's `spec.capacity.storage` in bytes.
    pub capacity_bytes: u64,
}

/// The claim `namespace/pvc`'s bound lab volume, or `None` while the claim is not bound (not
/// `Bound`, no `volumeName`, its PV missing or reserved for another claim).
///
/// # Errors
/// [`StorageError::ClaimNotFound`] when the claim does not exist,
/// [`StorageError::GetClaim`]/[`StorageError::GetVolume`] on API errors,
/// [`StorageError::ForeignVolume`]/[`StorageError::NoVolumePath`] when the bound PV is not a
/// lab volume, [`StorageError::Size`] for a PV capacity that is not a byte count.
pub async fn bound_volume(
    client: &Client,
    namespace: &str,
    pvc: &str,
) -> Result<Option<BoundVolume>, StorageError> {
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .get_opt(pvc)
        .await
        .map_err(|source| StorageError::GetClaim {
            namespace: namespace.to_string(),
            name: pvc.to_string(),
            source,
        })?
        .ok_or_else(|| StorageError::ClaimNotFound {
            namespace: namespace.to_string(),
            name: pvc.to_string(),
        })?;
    let phase = claim.status.as_ref().and_then(|s| s.phase.as_deref());
    let volume_name = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref());
    let (Some("Bound"), Some(volume_name)) = (phase, volume_name) else {
        return Ok(None);
    };
    let Some(pv) = get_volume(client, volume_name).await? else {
        return Ok(None);
    };
    if claim_ref_uid(&pv) != claim.metadata.uid.as_deref() {
        return Ok(None);
    }
    lab_volume(&pv).map(Some)
}

/// The host path and mode of the claim `namespace/pvc`'s bound volume, or `None` while it is
/// unbound. What the kubelet mounts and what snapshots copy; a process writing to the volume
/// registers under exactly this path in [`super::volumes::VolumeUsers`].
///
/// # Errors
/// As [`bound_volume`].
pub async fn volume_path(
    client: &Client,
    namespace: &str,
    pvc: &str,
) -> Result<Option<(PathBuf, VolumeMode)>, StorageError> {
    Ok(bound_volume(client, namespace, pvc)
        .await?
        .map(|v| (v.path, v.mode)))
}

/// Reads a lab PV's host path, mode and capacity.
fn lab_volume(pv: &PersistentVolume) -> Result<BoundVolume, StorageError> {
    let name = pv.name_any();
    let spec = pv.spec.clone().unwrap_or_default();
    let csi =
        spec.csi
            .filter(|c| c.driver == CSI_DRIVER)
            .ok_or_else(|| StorageError::ForeignVolume {
                volume: name.clone(),
                driver: pv
                    .spec
                    .as_ref()
                    .and_then(|s| s.csi.as_ref())
                    .map(|c| c.driver.clone()),
            })?;
    let path = csi
        .volume_attributes
        .as_ref()
        .and_then(|a| a.get(PATH_ATTRIBUTE))
        .map(PathBuf::from)
        .ok_or_else(|| StorageError::NoVolumePath {
            volume: name.clone(),
        })?;
    let capacity_bytes = storage_bytes(spec.capacity.as_ref()).map_or(Ok(0), |q| {
        parse_quantity(q).map_err(|source| StorageError::Size {
            object: format!("PersistentVolume {name}"),
            source,
        })
    })?;
    Ok(BoundVolume {
        pv_name: name,
        path,
        mode: VolumeMode::from_spec(spec.volume_mode.as_deref()),
        capacity_bytes,
    })
}

fn storage_bytes(resources: Option<&BTreeMap<String, Quantity>>) -> Option<&str> {
    resources
        .and_then(|r| r.get("storage"))
        .map(|q| q.0.as_str())
}

fn claim_ref_uid(pv: &PersistentVolume) -> Option<&str> {
    pv.spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|r| r.uid.as_deref())
}

async fn get_volume(client: &Client, name: &str) -> Result<Option<PersistentVolume>, StorageError> {
    Api::<PersistentVolume>::all(client.clone())
        .get_opt(name)
        .await
        .map_err(|source| StorageError::GetVolume {
            name: name.to_string(),
            source,
        })
}

/// The `ApiResource` of `snapshot.storage.k8s.io/v1` VolumeSnapshotClass, for dynamic access
/// (k8s-openapi has no type for it; its fields sit at the top level, not under `spec`).
pub fn snapshot_class_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(SNAPSHOT_GROUP, "v1", "VolumeSnapshotClass"),
        "volumesnapshotclasses",
    )
}

/// Applies the `ferry-lab` StorageClass (default class, provisioner [`CSI_DRIVER`],
/// `reclaimPolicy: Delete`, `volumeBindingMode: Immediate`, no expansion) and the `ferry-lab`
/// VolumeSnapshotClass (driver [`CSI_DRIVER`], `deletionPolicy: Delete`) with server-side
/// apply, so repeating it at every start is harmless.
///
/// # Errors
/// [`StorageError::ApplyClass`] when the API server refuses either.
pub async fn ensure_classes(client: &Client) -> Result<(), StorageError> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let class = json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS, "annotations": {ANN_DEFAULT_CLASS: "true"}},
        "provisioner": CSI_DRIVER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
        "allowVolumeExpansion": true,
    });
    Api::<StorageClass>::all(client.clone())
        .patch(STORAGE_CLASS, &params, &Patch::Apply(&class))
        .await
        .map_err(|source| StorageError::ApplyClass {
            kind: "StorageClass",
            name: STORAGE_CLASS.to_string(),
            source,
        })?;
    let snapshot_class = json!({
        "apiVersion": format!("{SNAPSHOT_GROUP}/v1"),
        "kind": "VolumeSnapshotClass",
        "metadata": {"name": STORAGE_CLASS},
        "driver": CSI_DRIVER,
        "deletionPolicy": "Delete",
    });
    Api::<DynamicObject>::all_with(client.clone(), &snapshot_class_resource())
        .patch(STORAGE_CLASS, &params, &Patch::Apply(&snapshot_class))
        .await
        .map_err(|source| StorageError::ApplyClass {
            kind: "VolumeSnapshotClass",
            name: STORAGE_CLASS.to_string(),
            source,
        })?;
    Ok(())
}

/// What the storage controllers share.
struct Shared {
    node: Arc<NodeContext>,
    events: EventRecorder,
}

/// Runs the provisioner/binder (one reconcile per PVC) and the reclaimer (one reconcile per
/// PV) until aborted, after applying the lab's storage classes (retried until it succeeds).
/// Errors are logged and retried per object.
pub async fn run(ctx: Arc<NodeContext>) {
    let client = ctx.client.clone();
    let shared = Arc::new(Shared {
        events: EventRecorder::new(client.clone(), CSI_DRIVER, &ctx.node_name),
        node: ctx,
    });
    let classes = async {
        while let Err(error) = ensure_classes(&client).await {
            tracing::warn!(error = %error_chain(&error), "applying the lab storage classes; retrying");
            tokio::time::sleep(RETRY).await;
        }
    };
    let claims = Controller::new(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
    )
    // A PV change (new static PV, deleted PV) concerns the claim it names.
    .watches(
        Api::<PersistentVolume>::all(client.clone()),
        watcher::Config::default(),
        |pv| {
            let claim = pv.spec.and_then(|s| s.claim_ref);
            claim.and_then(|r| {
                Some(ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
            })
        },
    )
    .run(reconcile_claim, claim_error_policy, shared.clone())
    .for_each(|_| async {});
    let volumes = Controller::new(
        Api::<PersistentVolume>::all(client.clone()),
        watcher::Config::default(),
    )
    // A claim's deletion is what releases its volume.
    .watches(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
        |pvc| {
            let provisioned = pvc.uid().map(|uid| ObjectRef::new(&format!("pvc-{uid}")));
            let named = pvc
                .spec
                .and_then(|s| s.volume_name)
                .map(|v| ObjectRef::new(&v));
            provisioned.into_iter().chain(named)
        },
    )
    .run(reconcile_volume, volume_error_policy, shared)
    .for_each(|_| async {});
    futures::join!(classes, claims, volumes);
}

/// Renders an error with its causes, `a: b: c`.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn claim_error_policy(
    _pvc: Arc<PersistentVolumeClaim>,
    error: &StorageError,
    _shared: Arc<Shared>,
) -> Action {
    Action::requeue(error.retry_after())
}

fn volume_error_policy(
    _pv: Arc<PersistentVolume>,
    error: &StorageError,
    _shared: Arc<Shared>,
) -> Action {
    Action::requeue(error.retry_after())
}

async fn reconcile_claim(
    pvc: Arc<PersistentVolumeClaim>,
    shared: Arc<Shared>,
) -> Result<Action, StorageError> {
    let namespace = pvc.namespace().unwrap_or_default();
    let name = pvc.name_any();
    let span = tracing::info_span!(
        "reconcile",
        site = %shared.node.site,
        namespace = %namespace,
        name = %name,
        kind = "PersistentVolumeClaim"
    );
    async {
        let result = ensure_claim_bound(&shared, &pvc).await;
        if let Err(error) = &result {
            let message = error_chain(error);
            match error.claim_event_reason() {
                Some(reason) => {
                    tracing::warn!(error = %message, label = error.label(), "claim not bound");
                    let object = pvc.object_ref(&());
                    shared
                        .events
                        .publish(&object, EventKind::Warning, reason, &message)
                        .await;
                }
                None => tracing::debug!(reason = %message, "claim waits"),
            }
        }
        result
    }
    .instrument(span)
    .await
}

/// The claim's request in bytes and as the text it was given in.
fn claim_request(pvc: &PersistentVolumeClaim) -> Result<(u64, Quantity), StorageError> {
    let namespace = pvc.namespace().unwrap_or_default();
    let name = pvc.name_any();
    let requests = pvc
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref());
    let quantity = requests
        .and_then(|r| r.get("storage"))
        .cloned()
        .ok_or_else(|| StorageError::NoStorageRequest {
            namespace: namespace.clone(),
            name: name.clone(),
        })?;
    let bytes = parse_quantity(&quantity.0).map_err(|source| StorageError::Size {
        object: format!("PersistentVolumeClaim {namespace}/{name}"),
        source,
    })?;
    Ok((bytes, quantity))
}

/// Binds the claim, provisioning its volume first when it names none.
async fn ensure_claim_bound(
    shared: &Shared,
    pvc: &PersistentVolumeClaim,
) -> Result<Action, StorageError> {
    if pvc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let client = &shared.node.client;
    let spec = pvc.spec.clone().unwrap_or_default();
    let phase = pvc.status.as_ref().and_then(|s| s.phase.as_deref());
    if shared.node.control_plane == ControlPlane::Kubernetes {
        // The real PV controller binds and marks claims Lost; the provisioner's only job is
        // to create the volume of a claim the PV controller handed to this driver.
        let asked = pvc
            .annotations()
            .get(ANN_STORAGE_PROVISIONER)
            .map(String::as_str);
        if phase != Some("Bound") && spec.volume_name.is_none() && asked == Some(CSI_DRIVER) {
            provision(shared, pvc).await?;
        }
        if phase == Some("Bound") {
            resize::ensure_expanded(shared, pvc).await?;
        }
        return Ok(Action::await_change());
    }
    if phase == Some("Bound") {
        resize::ensure_expanded(shared, pvc).await?;
        return ensure_not_lost(shared, pvc).await;
    }
    let class = spec.storage_class_name.as_deref();
    let pv = match spec.volume_name.as_deref() {
        // The PV controller binds statically named volumes whatever their class.
        Some(volume) => match reserve_named_volume(shared, pvc, volume).await? {
            Some(pv) => pv,
            None => return Ok(Action::requeue(WAIT)),
        },
        // Only the lab class (or no class: the lab's is the default) is provisioned here.
        None if matches!(class, None | Some(STORAGE_CLASS)) => provision(shared, pvc).await?,
        None => return Ok(Action::await_change()),
    };
    bind(client, pvc, &pv).await?;
    Ok(Action::await_change())
}

/// A bound claim whose PV vanished becomes `Lost`, as the PV controller marks it.
async fn ensure_not_lost(
    shared: &Shared,
    pvc: &PersistentVolumeClaim,
) -> Result<Action, StorageError> {
    let Some(volume) = pvc.spec.as_ref().and_then(|s| s.volume_name.as_deref()) else {
        return Ok(Action::await_change());
    };
    if get_volume(&shared.node.client, volume).await?.is_some() {
        return Ok(Action::await_change());
    }
    patch_claim_status(
        &shared.node.client,
        pvc,
        json!({"status": {"phase": "Lost"}}),
    )
    .await?;
    let message = format!("Bound claim has lost its PersistentVolume {volume}");
    shared
        .events
        .publish(
            &pvc.object_ref(&()),
            EventKind::Warning,
            "ClaimLost",
            &message,
        )
        .await;
    Ok(Action::await_change())
}

/// Reserves the statically named PV for the claim (sets or completes its `claimRef`) after
/// checking it fits. `None` while the PV does not exist yet, or when it changed while being
/// reserved (the caller looks again shortly).
async fn reserve_named_volume(
    shared: &Shared,
    pvc: &PersistentVolumeClaim,
    volume: &str,
) -> Result<Option<PersistentVolume>, StorageError> {
    let client = &shared.node.client;
    let Some(pv) = get_volume(client, volume).await? else {
        tracing::debug!(volume, "the named PersistentVolume does not exist yet");
        return Ok(None);
    };
    let namespace = pvc.namespace().unwrap_or_default();
    let name = pvc.name_any();
    let uid = pvc.metadata.uid.clone().unwrap_or_default();
    let pv_spec = pv.spec.clone().unwrap_or_default();
    let claim_ref = pv_spec.claim_ref.clone();
    let mine = claim_ref.as_ref().is_none_or(|r| {
        r.namespace.as_deref() == Some(namespace.as_str())
            && r.name.as_deref() == Some(name.as_str())
            && r.uid.as_deref().is_none_or(|u| u == uid)
    });
    if !mine {
        let r = claim_ref.unwrap_or_default();
        return Err(StorageError::VolumeTaken {
            volume: volume.to_string(),
            claim: format!(
                "{}/{} ({})",
                r.namespace.unwrap_or_default(),
                r.name.unwrap_or_default(),
                r.uid.unwrap_or_default()
            ),
        });
    }
    check_fits(pvc, &pv)?;
    if claim_ref.as_ref().and_then(|r| r.uid.as_deref()) == Some(uid.as_str()) {
        return Ok(Some(pv));
    }
    let mut patch = json!({
        // The resourceVersion makes this a compare-and-swap: two claims cannot both win.
        "metadata": {"resourceVersion": pv.resource_version()},
        "spec": {"claimRef": claim_reference(pvc)},
    });
    if claim_ref.is_none() {
        patch["metadata"]["annotations"] = json!({ANN_BOUND_BY_CONTROLLER: "yes"});
    }
    match Api::<PersistentVolume>::all(client.clone())
        .patch(volume, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(pv) => Ok(Some(pv)),
        // Changed meanwhile (maybe reserved by another claim): decide again on the new state.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
        Err(source) => Err(StorageError::PatchVolume {
            name: volume.to_string(),
            source,
        }),
    }
}

/// Checks a named PV against the claim: capacity, volume mode and storage class.
fn check_fits(pvc: &PersistentVolumeClaim, pv: &PersistentVolume) -> Result<(), StorageError> {
    let volume = pv.name_any();
    let mismatch = |reason: String| StorageError::VolumeMismatch {
        volume: volume.clone(),
        reason,
    };
    let (request, _) = claim_request(pvc)?;
    let pv_spec = pv.spec.clone().unwrap_or_default();
    let capacity = storage_bytes(pv_spec.capacity.as_ref()).unwrap_or("0");
    let capacity_bytes = parse_quantity(capacity).map_err(|source| StorageError::Size {
        object: format!("PersistentVolume {volume}"),
        source,
    })?;
    if capacity_bytes < request {
        return Err(mismatch(format!(
            "capacity {capacity_bytes} bytes, the claim requests {request}"
        )));
    }
    let claim_spec = pvc.spec.clone().unwrap_or_default();
    let claim_mode = VolumeMode::from_spec(claim_spec.volume_mode.as_deref());
    let pv_mode = VolumeMode::from_spec(pv_spec.volume_mode.as_deref());
    if claim_mode != pv_mode {
        return Err(mismatch(format!(
            "volume mode {}, the claim asks for {}",
            pv_mode.as_str(),
            claim_mode.as_str()
        )));
    }
    let (claim_class, pv_class) = (
        claim_spec.storage_class_name.unwrap_or_default(),
        pv_spec.storage_class_name.unwrap_or_default(),
    );
    // A claim without a class (created before the default class existed, or `""`) matches
    // any volume here; the API server gives new unclassed claims the default class, as the
    // DefaultStorageClass admission plugin does, so a class is the usual case.
    if !claim_class.is_empty() && claim_class != pv_class {
        return Err(mismatch(format!(
            "storage class {pv_class:?}, the claim asks for {claim_class:?}"
        )));
    }
    Ok(())
}

fn claim_reference(pvc: &PersistentVolumeClaim) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_string()),
        kind: Some("PersistentVolumeClaim".to_string()),
        namespace: pvc.namespace(),
        name: Some(pvc.name_any()),
        uid: pvc.metadata.uid.clone(),
        resource_version: pvc.resource_version(),
        ..ObjectReference::default()
    }
}

/// The last binding steps, each skipped when done: PV phase `Bound`, claim `volumeName` and
/// annotations, claim status.
async fn bind(
    client: &Client,
    pvc: &PersistentVolumeClaim,
    pv: &PersistentVolume,
) -> Result<(), StorageError> {
    let volume = pv.name_any();
    if pv.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
        Api::<PersistentVolume>::all(client.clone())
            .patch_status(
                &volume,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Bound"}})),
            )
            .await
            .map_err(|source| StorageError::PatchVolume {
                name: volume.clone(),
                source,
            })?;
    }
    let spec = pvc.spec.clone().unwrap_or_default();
    let annotations = pvc.annotations();
    if spec.volume_name.as_deref() != Some(volume.as_str())
        || annotations.get(ANN_BIND_COMPLETED).map(String::as_str) != Some("yes")
    {
        let mut set = serde_json::Map::new();
        set.insert(ANN_BIND_COMPLETED.into(), json!("yes"));
        // Only the side whose binding the controller chose says so (static names are the user's).
        if spec.volume_name.is_none() {
            set.insert(ANN_BOUND_BY_CONTROLLER.into(), json!("yes"));
        }
        let patch = json!({"metadata": {"annotations": set}, "spec": {"volumeName": volume}});
        Api::<PersistentVolumeClaim>::namespaced(
            client.clone(),
            &pvc.namespace().unwrap_or_default(),
        )
        .patch(
            &pvc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(|source| StorageError::PatchClaim {
            namespace: pvc.namespace().unwrap_or_default(),
            name: pvc.name_any(),
            source,
        })?;
    }
    let pv_spec = pv.spec.clone().unwrap_or_default();
    let status = json!({"status": {
        "phase": "Bound",
        "capacity": pv_spec.capacity,
        "accessModes": pv_spec.access_modes,
    }});
    patch_claim_status(client, pvc, status).await?;
    tracing::info!(volume, "claim bound");
    Ok(())
}

async fn patch_claim_status(
    client: &Client,
    pvc: &PersistentVolumeClaim,
    status: serde_json::Value,
) -> Result<(), StorageError> {
    let namespace = pvc.namespace().unwrap_or_default();
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &namespace)
        .patch_status(
            &pvc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .map_err(|source| StorageError::PatchClaim {
            namespace,
            name: pvc.name_any(),
            source,
        })?;
    Ok(())
}

/// Sets the PV's phase if the PV is still at the version the decision was made on; `false`
/// when it changed meanwhile (the binder and the reclaimer both write PVs, so a decision on a
/// stale copy must not overwrite a newer phase).
async fn set_volume_phase(
    client: &Client,
    pv: &PersistentVolume,
    phase: &str,
) -> Result<bool, StorageError> {
    let name = pv.name_any();
    let patch = json!({
        "metadata": {"resourceVersion": pv.resource_version()},
        "status": {"phase": phase},
    });
    match Api::<PersistentVolume>::all(client.clone())
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(source) => Err(StorageError::PatchVolume { name, source }),
    }
}

async fn reconcile_volume(
    pv: Arc<PersistentVolume>,
    shared: Arc<Shared>,
) -> Result<Action, StorageError> {
    let span = tracing::info_span!(
        "reconcile",
        site = %shared.node.site,
        namespace = "",
        name = %pv.name_any(),
        kind = "PersistentVolume"
    );
    async {
        let result = reclaim(&shared, &pv).await;
        if let Err(error) = &result {
            let message = error_chain(error);
            tracing::warn!(error = %message, label = error.label(), "reclaiming the volume failed");
            shared
                .events
                .publish(
                    &pv.object_ref(&()),
                    EventKind::Warning,
                    "VolumeFailedDelete",
                    &message,
                )
                .await;
        }
        result
    }
    .instrument(span)
    .await
}

/// Makes a new unclaimed PV `Available`, and reclaims a PV whose claim is gone: `Delete`
/// removes the data (lab volumes under the volumes directory only) and then the PV;
/// anything else leaves the PV `Released` with its data.
async fn reclaim(shared: &Shared, pv: &PersistentVolume) -> Result<Action, StorageError> {
    if pv.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let client = &shared.node.client;
    let spec = pv.spec.clone().unwrap_or_default();
    let phase = pv.status.as_ref().and_then(|s| s.phase.clone());
    let claim = spec.claim_ref.clone().unwrap_or_default();
    if shared.node.control_plane == ControlPlane::Kubernetes {
        // The real PV controller sets the phases; a `Released` volume with policy `Delete`
        // is the provisioner's to delete, as external-provisioner does.
        return if phase.as_deref() == Some("Released") {
            delete_volume(shared, pv).await
        } else {
            Ok(Action::await_change())
        };
    }
    // No claimRef, or one without uid (a reservation for a claim that may not exist yet): the
    // volume waits for its claim, `Available` as the PV controller shows it.
    let (Some(claim_ns), Some(claim_name), Some(claim_uid)) = (
        claim.namespace.as_deref(),
        claim.name.as_deref(),
        claim.uid.as_deref(),
    ) else {
        if matches!(phase.as_deref(), None | Some("Pending"))
            && !set_volume_phase(client, pv, "Available").await?
        {
            return Ok(Action::requeue(WAIT));
        }
        return Ok(Action::await_change());
    };
    // A live read, not a cache: a stale cache must never delete a volume in use.
    let current = Api::<PersistentVolumeClaim>::namespaced(client.clone(), claim_ns)
        .get_opt(claim_name)
        .await
        .map_err(|source| StorageError::GetClaim {
            namespace: claim_ns.to_string(),
            name: claim_name.to_string(),
            source,
        })?;
    if current.and_then(|c| c.metadata.uid).as_deref() == Some(claim_uid) {
        return Ok(Action::await_change());
    }
    if phase.as_deref() != Some("Released") && !set_volume_phase(client, pv, "Released").await? {
        return Ok(Action::requeue(WAIT));
    }
    delete_volume(shared, pv).await
}

/// Deletes a released volume whose policy is `Delete` and that this driver provisioned:
/// its data (lab volumes under the volumes directory only), then its PV. Anything else stays
/// `Released` with its data.
async fn delete_volume(shared: &Shared, pv: &PersistentVolume) -> Result<Action, StorageError> {
    let client = &shared.node.client;
    let name = pv.name_any();
    let spec = pv.spec.clone().unwrap_or_default();
    let policy = spec
        .persistent_volume_reclaim_policy
        .as_deref()
        .unwrap_or("Retain");
    let ours = spec.csi.as_ref().is_some_and(|c| c.driver == CSI_DRIVER);
    if policy != "Delete" || !ours {
        tracing::info!(policy, "claim gone; volume released");
        return Ok(Action::await_change());
    }
    let volume = lab_volume(pv)?;
    if volume.path.parent() == Some(shared.node.volumes_dir().as_path()) {
        snapshots::remove_path(&volume.path)
            .await
            .map_err(|source| StorageError::RemoveData {
                path: volume.path.clone(),
                source,
            })?;
    } else {
        tracing::warn!(path = %volume.path.display(), "volume data outside the volumes directory is kept");
    }
    match Api::<PersistentVolume>::all(client.clone())
        .delete(&name, &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(source) => return Err(StorageError::DeleteVolume { name, source }),
    }
    tracing::info!("claim gone; volume and data deleted");
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_mode_defaults_to_filesystem() {
        assert_eq!(VolumeMode::from_spec(None), VolumeMode::Filesystem);
        assert_eq!(
            VolumeMode::from_spec(Some("Filesystem")),
            VolumeMode::Filesystem
        );
        assert_eq!(VolumeMode::from_spec(Some("Block")), VolumeMode::Block);
    }
}
