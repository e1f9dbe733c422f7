//! The lab's snapshot controller and CSI snapshotter: fulfils VolumeSnapshots with
//! point-in-time copies of their PVC's volume and manages the VolumeSnapshotContents.
//!
//! Follows the kubernetes-csi/external-snapshotter design (snapshot-controller plus
//! csi-snapshotter sidecar) and the Kubernetes docs "Volume Snapshots":
//!
//! 1. A VolumeSnapshot of a class served by [`CSI_DRIVER`] (or of no class: the lab's
//!    `ferry-lab` class is the default) gets the finalizer [`VS_FINALIZER`].
//! 2. For `spec.source.persistentVolumeClaimName`: once the claim is bound, the processes
//!    registered as writing to its volume are frozen (SIGSTOP, see
//!    [`super::volumes::VolumeUsers::freeze`]) for exactly the duration of
//!    `cp -a --reflink=auto <volume> <snapshots_dir>/.tmp-snapcontent-<uid>`; the copy is then
//!    renamed to `<snapshots_dir>/snapcontent-<uid>` (the snapshot handle), so a crash never
//!    leaves a partial copy under the final name. The copy therefore holds what a crash at
//!    that instant would have left on disk: it is crash-consistent.
//! 3. The VolumeSnapshotContent `snapcontent-<vs uid>` is created with the copy's handle,
//!    creation time and restore size in its status, and the VolumeSnapshot's status points at
//!    it with `readyToUse: true`. Until then the VolumeSnapshot's status carries
//!    `readyToUse: false` and an `error` saying why.
//! 4. For `spec.source.volumeSnapshotContentName` (pre-provisioned), the named content is
//!    bound if it exists and refers to this VolumeSnapshot.
//! 5. Deleting a VolumeSnapshot waits until no unbound PVC is being restored from it, then,
//!    if its content's `deletionPolicy` is `Delete`, removes the copy and the content object,
//!    then the finalizer.
//!
//! Every step is skipped when already done (names derive from the VolumeSnapshot's uid), so a
//! restart resumes where it stopped and never copies twice.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{CustomResource, Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::Instrument;

use super::storage::{
    self, error_chain, format_quantity, BoundVolume, EventKind, EventRecorder, StorageError,
    VolumeMode, SNAPSHOT_GROUP,
};
use super::{NodeContext, CSI_DRIVER, STORAGE_CLASS};

/// Finalizer on VolumeSnapshots whose content and copy the controller must clean up first
/// (the name external-snapshotter uses).
pub const VS_FINALIZER: &str = "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection";
/// Annotation on a dynamically created content: its restore size in bytes, so a restart can
/// fill in the status without the source volume.
pub const ANN_RESTORE_SIZE_BYTES: &str = "lab.ferry.dev/restore-size-bytes";
/// Annotation on a dynamically created content: the instant of the copy, nanoseconds since
/// the Unix epoch.
pub const ANN_CREATION_TIME_NANOS: &str = "lab.ferry.dev/creation-time-nanos";

/// Delay before looking again at something expected to change soon (a claim being bound).
const WAIT: Duration = Duration::from_millis(500);
/// Delay before retrying after an error.
const RETRY: Duration = Duration::from_secs(1);

/// `spec` of a `snapshot.storage.k8s.io/v1` VolumeSnapshot: a request to snapshot a PVC, or
/// to bind a pre-provisioned content.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshot",
    plural = "volumesnapshots",
    namespaced,
    status = "VolumeSnapshotStatus",
    schema = "disabled",
    doc = "A `snapshot.storage.k8s.io/v1` VolumeSnapshot: a user's request for a snapshot of a PVC."
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    /// What to snapshot; exactly one field is set.
    pub source: VolumeSnapshotSource,
    /// The VolumeSnapshotClass; unset means the default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

/// `spec.source` of a VolumeSnapshot.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSource {
    /// A PVC in the snapshot's namespace to take a snapshot of (dynamic provisioning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
    /// A pre-provisioned VolumeSnapshotContent to bind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
}

/// `status` of a VolumeSnapshot.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotStatus {
    /// The VolumeSnapshotContent this snapshot is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_snapshot_content_name: Option<String>,
    /// When the point-in-time copy was taken (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// Whether a volume can be restored from the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Minimum size of a volume restored from the snapshot, a quantity (`64Mi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<Quantity>,
    /// The last error taking the snapshot, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
}

/// `status.error` of a VolumeSnapshot or VolumeSnapshotContent.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotError {
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// What happens to a snapshot's copy when its VolumeSnapshot is deleted.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum DeletionPolicy {
    /// The copy and the content object are deleted.
    #[default]
    Delete,
    /// The copy and the content object stay.
    Retain,
}

/// `spec` of a `snapshot.storage.k8s.io/v1` VolumeSnapshotContent: one snapshot as the
/// driver knows it.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshotContent",
    plural = "volumesnapshotcontents",
    status = "VolumeSnapshotContentStatus",
    schema = "disabled",
    doc = "A `snapshot.storage.k8s.io/v1` VolumeSnapshotContent (cluster-scoped): a snapshot taken by the driver."
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSpec {
    /// The CSI driver that holds the snapshot.
    pub driver: String,
    /// What deleting the bound VolumeSnapshot does to the copy.
    pub deletion_policy: DeletionPolicy,
    /// The volume it was taken of, or a pre-existing snapshot's handle.
    pub source: VolumeSnapshotContentSource,
    /// The class it was taken with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    /// The VolumeSnapshot it is bound to (kind, apiVersion, namespace, name, uid).
    pub volume_snapshot_ref: ObjectReference,
    /// Mode of the snapshotted volume (`Filesystem` or `Block`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_volume_mode: Option<String>,
}

/// `spec.source` of a VolumeSnapshotContent; exactly one field is set.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSource {
    /// The snapshotted volume's CSI handle (the lab: its PV name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_handle: Option<String>,
    /// A pre-existing snapshot's handle (the lab: its copy's path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
}

/// `status` of a VolumeSnapshotContent.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentStatus {
    /// The driver's handle of the snapshot: in the lab, the absolute path of the copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// When the copy was taken, nanoseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    /// Whether a volume can be restored from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Minimum size of a restored volume, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<i64>,
    /// The last error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
}

/// `cp` failing to copy a volume or snapshot.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// `cp` could not be started.
    #[error("starting cp")]
    Spawn(#[source] io::Error),
    /// `cp` exited unsuccessfully.
    #[error("cp exited with {status}: {stderr}")]
    Failed {
        /// Its exit status.
        status: ExitStatus,
        /// What it wrote to stderr.
        stderr: String,
    },
}

/// Copies `src` (a directory or file) to `dst`, which must not exist, with
/// `cp -a --reflink=auto`: shares extents where the filesystem supports reflinks and copies
/// otherwise, keeping modes, owners, timestamps, symlinks, hard links and holes.
///
/// # Errors
/// [`CopyError`] when `cp` cannot run or fails.
pub async fn copy_preserving(src: &Path, dst: &Path) -> Result<(), CopyError> {
    let out = tokio::process::Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg("--")
        .arg(src)
        .arg(dst)
        .output()
        .await
        .map_err(CopyError::Spawn)?;
    if !out.status.success() {
        return Err(CopyError::Failed {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Removes a file or directory tree; a missing path is already removed.
///
/// # Errors
/// The I/O error of a removal that failed for another reason.
pub async fn remove_path(path: &Path) -> io::Result<()> {
    let removed = match tokio::fs::symlink_metadata(path).await {
        Ok(m) if m.is_dir() => tokio::fs::remove_dir_all(path).await,
        Ok(_) => tokio::fs::remove_file(path).await,
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Errors of the snapshot controller. Those met while taking a snapshot are also written to
/// the VolumeSnapshot's `status.error` and a `SnapshotCreationFailed` Event.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// `spec.source` names neither a PVC nor a content.
    #[error("VolumeSnapshot {namespace}/{name} has no spec.source")]
    NoSource {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Reading the VolumeSnapshotClass.
    #[error("reading VolumeSnapshotClass {name}")]
    GetClass {
        /// Class name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The VolumeSnapshotClass does not exist.
    #[error("VolumeSnapshotClass {name} not found")]
    ClassNotFound {
        /// Class name.
        name: String,
    },
    /// Finding the source claim's volume.
    #[error("finding the volume of PersistentVolumeClaim {namespace}/{claim}")]
    ClaimVolume {
        /// Namespace.
        namespace: String,
        /// Claim name.
        claim: String,
        /// What the lookup reported.
        #[source]
        source: StorageError,
    },
    /// The source claim is not bound yet.
    #[error("PersistentVolumeClaim {namespace}/{claim} is not bound")]
    ClaimNotBound {
        /// Namespace.
        namespace: String,
        /// Claim name.
        claim: String,
    },
    /// Copying the volume.
    #[error("copying {} to {}", from.display(), to.display())]
    Copy {
        /// The volume.
        from: PathBuf,
        /// The temporary copy.
        to: PathBuf,
        /// What `cp` reported.
        #[source]
        source: CopyError,
    },
    /// Preparing, finishing (rename) or measuring a copy, or removing one.
    #[error("handling snapshot copy {}", path.display())]
    CopyFile {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Reading a VolumeSnapshotContent.
    #[error("reading VolumeSnapshotContent {name}")]
    GetContent {
        /// Content name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The pre-provisioned VolumeSnapshotContent does not exist.
    #[error("VolumeSnapshotContent {name} not found")]
    ContentNotFound {
        /// Content name.
        name: String,
    },
    /// The content refers to another VolumeSnapshot.
    #[error("VolumeSnapshotContent {content} is bound to VolumeSnapshot {other}")]
    ContentBoundElsewhere {
        /// Content name.
        content: String,
        /// The other snapshot, `ns/name (uid)`.
        other: String,
    },
    /// A pre-provisioned content whose snapshot handle names no copy on this node.
    #[error(
        "VolumeSnapshotContent {content} has snapshot handle {handle:?}, which does not exist"
    )]
    MissingHandle {
        /// Content name.
        content: String,
        /// The handle.
        handle: Option<String>,
    },
    /// Creating the VolumeSnapshotContent.
    #[error("creating VolumeSnapshotContent {name}")]
    CreateContent {
        /// Content name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing a VolumeSnapshotContent's spec or status.
    #[error("updating VolumeSnapshotContent {name}")]
    PatchContent {
        /// Content name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting a VolumeSnapshotContent.
    #[error("deleting VolumeSnapshotContent {name}")]
    DeleteContent {
        /// Content name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing the VolumeSnapshot's status.
    #[error("updating the status of VolumeSnapshot {namespace}/{name}")]
    PatchSnapshot {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Listing claims to find restores in progress.
    #[error("listing PersistentVolumeClaims in {namespace}")]
    ListClaims {
        /// Namespace.
        namespace: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The snapshot is the source of a claim still being provisioned, so it is kept.
    #[error("VolumeSnapshot {namespace}/{name} is the data source of unbound PersistentVolumeClaim {claim}")]
    InUse {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The claim being restored.
        claim: String,
    },
    /// Adding the finalizer.
    #[error("adding finalizer {VS_FINALIZER} to VolumeSnapshot {namespace}/{name}")]
    AddFinalizer {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Removing the finalizer.
    #[error("removing finalizer {VS_FINALIZER} from VolumeSnapshot {namespace}/{name}")]
    RemoveFinalizer {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The finalizer helper refused the object (no name); unreachable for objects read from
    /// the API server.
    #[error("VolumeSnapshot {namespace}/{name} cannot carry finalizer {VS_FINALIZER}")]
    FinalizerRefused {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

impl SnapshotError {
    /// A stable, low-cardinality label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoSource { .. } => "no_source",
            Self::GetClass { .. } => "get_class",
            Self::ClassNotFound { .. } => "class_not_found",
            Self::ClaimVolume { .. } => "claim_volume",
            Self::ClaimNotBound { .. } => "claim_not_bound",
            Self::Copy { .. } => "copy",
            Self::CopyFile { .. } => "copy_file",
            Self::GetContent { .. } => "get_content",
            Self::ContentNotFound { .. } => "content_not_found",
            Self::ContentBoundElsewhere { .. } => "content_bound_elsewhere",
            Self::MissingHandle { .. } => "missing_handle",
            Self::CreateContent { .. } => "create_content",
            Self::PatchContent { .. } => "patch_content",
            Self::DeleteContent { .. } => "delete_content",
            Self::PatchSnapshot { .. } => "patch_snapshot",
            Self::ListClaims { .. } => "list_claims",
            Self::InUse { .. } => "in_use",
            Self::AddFinalizer { .. } => "add_finalizer",
            Self::RemoveFinalizer { .. } => "remove_finalizer",
            Self::FinalizerRefused { .. } => "finalizer_refused",
        }
    }

    fn retry_after(&self) -> Duration {
        match self {
            Self::ClaimNotBound { .. } | Self::InUse { .. } => WAIT,
            _ => RETRY,
        }
    }
}

/// What the snapshot controller shares.
struct Shared {
    node: Arc<NodeContext>,
    events: EventRecorder,
}

/// A VolumeSnapshotClass as far as the controller needs it.
struct SnapshotClass {
    name: String,
    driver: String,
    deletion_policy: DeletionPolicy,
}

/// Runs the snapshot controller (one reconcile per VolumeSnapshot) until aborted. Errors are
/// logged and retried per object.
pub async fn run(ctx: Arc<NodeContext>) {
    let client = ctx.client.clone();
    let shared = Arc::new(Shared {
        events: EventRecorder::new(client.clone(), CSI_DRIVER, &ctx.node_name),
        node: ctx,
    });
    Controller::new(
        Api::<VolumeSnapshot>::all(client.clone()),
        watcher::Config::default(),
    )
    // A content change concerns the snapshot it is bound to.
    .watches(
        Api::<VolumeSnapshotContent>::all(client.clone()),
        watcher::Config::default(),
        |content| {
            let r = content.spec.volume_snapshot_ref;
            Some(ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
        },
    )
    .run(reconcile, error_policy, shared)
    .for_each(|_| async {})
    .await;
}

fn error_policy(_vs: Arc<VolumeSnapshot>, error: &SnapshotError, _shared: Arc<Shared>) -> Action {
    Action::requeue(error.retry_after())
}

async fn reconcile(vs: Arc<VolumeSnapshot>, shared: Arc<Shared>) -> Result<Action, SnapshotError> {
    let namespace = vs.namespace().unwrap_or_default();
    let name = vs.name_any();
    let span = tracing::info_span!(
        "reconcile",
        site = %shared.node.site,
        namespace = %namespace,
        name = %name,
        kind = "VolumeSnapshot"
    );
    async {
        let result = reconcile_snapshot(&shared, vs.clone()).await;
        if let Err(error) = &result {
            tracing::warn!(error = %error_chain(error), label = error.label(), "snapshot not reconciled");
        }
        result
    }
    .instrument(span)
    .await
}

async fn reconcile_snapshot(
    shared: &Arc<Shared>,
    vs: Arc<VolumeSnapshot>,
) -> Result<Action, SnapshotError> {
    let namespace = vs.namespace().unwrap_or_default();
    let name = vs.name_any();
    let has_finalizer = vs.finalizers().iter().any(|f| f == VS_FINALIZER);
    if !has_finalizer {
        if vs.metadata.deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        // Snapshots of other drivers' classes are not this node's to protect or take.
        if let Some(class) =
            get_class(shared, vs.spec.volume_snapshot_class_name.as_deref()).await?
        {
            if class.driver != CSI_DRIVER {
                return Ok(Action::await_change());
            }
        }
    }
    let api = Api::<VolumeSnapshot>::namespaced(shared.node.client.clone(), &namespace);
    let outcome = finalizer(&api, VS_FINALIZER, vs, |event| async {
        match event {
            finalizer::Event::Apply(vs) => {
                let result = ensure_ready(shared, &vs).await;
                if let Err(error) = &result {
                    record_failure(shared, &vs, error).await;
                }
                result
            }
            finalizer::Event::Cleanup(vs) => cleanup(shared, &vs).await,
        }
    })
    .await;
    outcome.map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        finalizer::Error::AddFinalizer(source) => SnapshotError::AddFinalizer {
            namespace,
            name,
            source,
        },
        finalizer::Error::RemoveFinalizer(source) => SnapshotError::RemoveFinalizer {
            namespace,
            name,
            source,
        },
        finalizer::Error::UnnamedObject | finalizer::Error::InvalidFinalizer => {
            SnapshotError::FinalizerRefused { namespace, name }
        }
    })
}

/// The named class, or the default `ferry-lab` class when unnamed; `None` when a named class
/// does not exist.
async fn get_class(
    shared: &Shared,
    name: Option<&str>,
) -> Result<Option<SnapshotClass>, SnapshotError> {
    let name = name.unwrap_or(STORAGE_CLASS);
    let api = Api::<DynamicObject>::all_with(
        shared.node.client.clone(),
        &storage::snapshot_class_resource(),
    );
    let class = api
        .get_opt(name)
        .await
        .map_err(|source| SnapshotError::GetClass {
            name: name.to_string(),
            source,
        })?;
    Ok(class.map(|c| SnapshotClass {
        name: name.to_string(),
        driver: c.data["driver"].as_str().unwrap_or_default().to_string(),
        deletion_policy: match c.data["deletionPolicy"].as_str() {
            Some("Retain") => DeletionPolicy::Retain,
            _ => DeletionPolicy::Delete,
        },
    }))
}

/// Writes the failure to the snapshot's status (`readyToUse: false`, `error`) and as a
/// Warning Event. Skipped when the status already says the same, so the status write does
/// not retrigger the controller forever.
async fn record_failure(shared: &Shared, vs: &VolumeSnapshot, error: &SnapshotError) {
    let message = error_chain(error);
    let status = vs.status.clone().unwrap_or_default();
    let same = status.error.as_ref().and_then(|e| e.message.as_deref()) == Some(message.as_str());
    if !same && status.ready_to_use != Some(true) {
        let patch = json!({"status": {
            "readyToUse": false,
            "error": {"message": message, "time": Time(Timestamp::now())},
        }});
        let api = Api::<VolumeSnapshot>::namespaced(
            shared.node.client.clone(),
            &vs.namespace().unwrap_or_default(),
        );
        if let Err(e) = api
            .patch_status(
                &vs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            tracing::debug!(error = %e, "recording the snapshot error in its status failed");
        }
    }
    shared
        .events
        .publish(
            &vs.object_ref(&()),
            EventKind::Warning,
            "SnapshotCreationFailed",
            &message,
        )
        .await;
}

/// Takes (or binds) the snapshot and makes it ready, skipping what is already done.
async fn ensure_ready(shared: &Shared, vs: &VolumeSnapshot) -> Result<Action, SnapshotError> {
    let status = vs.status.clone().unwrap_or_default();
    if status.ready_to_use == Some(true) && status.bound_volume_snapshot_content_name.is_some() {
        return Ok(Action::await_change());
    }
    let source = &vs.spec.source;
    let content = match (
        &source.persistent_volume_claim_name,
        &source.volume_snapshot_content_name,
    ) {
        (Some(claim), _) => ensure_dynamic_content(shared, vs, claim).await?,
        (None, Some(content)) => ensure_preprovisioned_content(shared, vs, content).await?,
        (None, None) => {
            return Err(SnapshotError::NoSource {
                namespace: vs.namespace().unwrap_or_default(),
                name: vs.name_any(),
            })
        }
    };
    let content_status = content.status.clone().unwrap_or_default();
    let created = content_status
        .creation_time
        .and_then(|n| Timestamp::from_second(n.div_euclid(1_000_000_000)).ok());
    let patch = json!({"status": {
        "boundVolumeSnapshotContentName": content.name_any(),
        "creationTime": created.map(Time),
        "readyToUse": content_status.ready_to_use.unwrap_or(false),
        "restoreSize": content_status
            .restore_size
            .and_then(|b| u64::try_from(b).ok())
            .map(format_quantity),
        "error": null,
    }});
    Api::<VolumeSnapshot>::namespaced(
        shared.node.client.clone(),
        &vs.namespace().unwrap_or_default(),
    )
    .patch_status(
        &vs.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(|source| SnapshotError::PatchSnapshot {
        namespace: vs.namespace().unwrap_or_default(),
        name: vs.name_any(),
        source,
    })?;
    if content_status.ready_to_use == Some(true) {
        let message = format!(
            "Snapshot {}/{} is ready to use",
            vs.namespace().unwrap_or_default(),
            vs.name_any()
        );
        shared
            .events
            .publish(
                &vs.object_ref(&()),
                EventKind::Normal,
                "SnapshotReady",
                &message,
            )
            .await;
        tracing::info!(content = %content.name_any(), "snapshot ready");
    }
    Ok(Action::await_change())
}

fn snapshot_reference(vs: &VolumeSnapshot) -> ObjectReference {
    ObjectReference {
        api_version: Some(format!("{SNAPSHOT_GROUP}/v1")),
        kind: Some("VolumeSnapshot".to_string()),
        namespace: vs.namespace(),
        name: Some(vs.name_any()),
        uid: vs.metadata.uid.clone(),
        resource_version: vs.resource_version(),
        ..ObjectReference::default()
    }
}

fn nanos_since_epoch(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Copies the volume to `<snapshots_dir>/<content>` with its writers frozen, unless a complete
/// copy is already there. Returns the copy's path and the instant of the copy (nanoseconds).
async fn take_copy(
    shared: &Shared,
    volume: &BoundVolume,
    content_name: &str,
) -> Result<(PathBuf, i64), SnapshotError> {
    let dir = shared.node.snapshots_dir();
    let handle = dir.join(content_name);
    let file_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::CopyFile { path, source }
    };
    if tokio::fs::try_exists(&handle)
        .await
        .map_err(file_err(&handle))?
    {
        // Complete by construction (renamed into place); its time is lost with the crash.
        return Ok((handle, nanos_since_epoch(SystemTime::now())));
    }
    let tmp = dir.join(format!(".tmp-{content_name}"));
    remove_path(&tmp).await.map_err(file_err(&tmp))?;
    let taken_at = {
        // Writers stay stopped for the copy only; the guard resumes them when dropped.
        let _frozen = shared.node.volume_users.freeze(&[volume.path.as_path()]);
        let taken_at = nanos_since_epoch(SystemTime::now());
        copy_preserving(&volume.path, &tmp)
            .await
            .map_err(|source| SnapshotError::Copy {
                from: volume.path.clone(),
                to: tmp.clone(),
                source,
            })?;
        taken_at
    };
    tokio::fs::rename(&tmp, &handle)
        .await
        .map_err(file_err(&handle))?;
    Ok((handle, taken_at))
}

/// The content of a snapshot of a PVC: `snapcontent-<vs uid>`, created after the copy, with a
/// ready status.
async fn ensure_dynamic_content(
    shared: &Shared,
    vs: &VolumeSnapshot,
    claim: &str,
) -> Result<VolumeSnapshotContent, SnapshotError> {
    let client = &shared.node.client;
    let namespace = vs.namespace().unwrap_or_default();
    let uid = vs.metadata.uid.clone().unwrap_or_default();
    let content_name = format!("snapcontent-{uid}");
    let contents = Api::<VolumeSnapshotContent>::all(client.clone());
    let existing =
        contents
            .get_opt(&content_name)
            .await
            .map_err(|source| SnapshotError::GetContent {
                name: content_name.clone(),
                source,
            })?;
    let content = match existing {
        Some(content) => content,
        None => {
            let class_name = vs
                .spec
                .volume_snapshot_class_name
                .clone()
                .unwrap_or_else(|| STORAGE_CLASS.to_string());
            let class = get_class(shared, Some(&class_name))
                .await?
                .ok_or(SnapshotError::ClassNotFound { name: class_name })?;
            let volume = storage::bound_volume(client, &namespace, claim)
                .await
                .map_err(|source| SnapshotError::ClaimVolume {
                    namespace: namespace.clone(),
                    claim: claim.to_string(),
                    source,
                })?
                .ok_or_else(|| SnapshotError::ClaimNotBound {
                    namespace: namespace.clone(),
                    claim: claim.to_string(),
                })?;
            let (handle, taken_at) = take_copy(shared, &volume, &content_name).await?;
            let restore_bytes = match volume.mode {
                VolumeMode::Block => tokio::fs::metadata(&handle)
                    .await
                    .map_err(|source| SnapshotError::CopyFile {
                        path: handle.clone(),
                        source,
                    })?
                    .len(),
                VolumeMode::Filesystem => volume.capacity_bytes,
            };
            let message = format!(
                "Snapshot {namespace}/{} of volume {} copied to {}",
                vs.name_any(),
                volume.pv_name,
                handle.display()
            );
            shared
                .events
                .publish(
                    &vs.object_ref(&()),
                    EventKind::Normal,
                    "SnapshotCreated",
                    &message,
                )
                .await;
            let content = VolumeSnapshotContent {
                metadata: ObjectMeta {
                    name: Some(content_name.clone()),
                    annotations: Some(BTreeMap::from([
                        (
                            ANN_RESTORE_SIZE_BYTES.to_string(),
                            restore_bytes.to_string(),
                        ),
                        (ANN_CREATION_TIME_NANOS.to_string(), taken_at.to_string()),
                    ])),
                    ..ObjectMeta::default()
                },
                spec: VolumeSnapshotContentSpec {
                    driver: CSI_DRIVER.to_string(),
                    deletion_policy: class.deletion_policy,
                    source: VolumeSnapshotContentSource {
                        volume_handle: Some(volume.pv_name.clone()),
                        snapshot_handle: None,
                    },
                    volume_snapshot_class_name: Some(class.name),
                    volume_snapshot_ref: snapshot_reference(vs),
                    source_volume_mode: Some(volume.mode.as_str().to_string()),
                },
                status: None,
            };
            match contents.create(&PostParams::default(), &content).await {
                Ok(created) => created,
                Err(kube::Error::Api(s)) if s.code == 409 => contents
                    .get_opt(&content_name)
                    .await
                    .map_err(|source| SnapshotError::GetContent {
                        name: content_name.clone(),
                        source,
                    })?
                    .ok_or(SnapshotError::ContentNotFound {
                        name: content_name.clone(),
                    })?,
                Err(source) => {
                    return Err(SnapshotError::CreateContent {
                        name: content_name,
                        source,
                    })
                }
            }
        }
    };
    check_bound_to(&content, vs)?;
    if content.status.as_ref().and_then(|s| s.ready_to_use) == Some(true) {
        return Ok(content);
    }
    // Status from the content's own record, so a restart needs neither volume nor clock.
    let annotation = |key: &str| {
        content
            .annotations()
            .get(key)
            .and_then(|v| v.parse::<i64>().ok())
    };
    let handle = shared.node.snapshots_dir().join(&content_name);
    let status = VolumeSnapshotContentStatus {
        snapshot_handle: Some(handle.display().to_string()),
        creation_time: annotation(ANN_CREATION_TIME_NANOS),
        ready_to_use: Some(true),
        restore_size: annotation(ANN_RESTORE_SIZE_BYTES),
        error: None,
    };
    patch_content_status(shared, &content_name, status).await
}

async fn patch_content_status(
    shared: &Shared,
    name: &str,
    status: VolumeSnapshotContentStatus,
) -> Result<VolumeSnapshotContent, SnapshotError> {
    Api::<VolumeSnapshotContent>::all(shared.node.client.clone())
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .map_err(|source| SnapshotError::PatchContent {
            name: name.to_string(),
            source,
        })
}

/// Whether the content's `volumeSnapshotRef` names this snapshot (a missing uid matches: a
/// pre-provisioned content's reference is completed on binding).
fn refers_to(content: &VolumeSnapshotContent, vs: &VolumeSnapshot) -> bool {
    let r = &content.spec.volume_snapshot_ref;
    r.name.as_deref() == Some(vs.name_any().as_str())
        && r.namespace == vs.namespace()
        && (r.uid.is_none() || r.uid == vs.metadata.uid)
}

fn check_bound_to(
    content: &VolumeSnapshotContent,
    vs: &VolumeSnapshot,
) -> Result<(), SnapshotError> {
    if refers_to(content, vs) {
        return Ok(());
    }
    let r = &content.spec.volume_snapshot_ref;
    Err(SnapshotError::ContentBoundElsewhere {
        content: content.name_any(),
        other: format!(
            "{}/{} ({})",
            r.namespace.clone().unwrap_or_default(),
            r.name.clone().unwrap_or_default(),
            r.uid.clone().unwrap_or_default()
        ),
    })
}

/// Binds a pre-provisioned content: completes its `volumeSnapshotRef.uid` and, for a content
/// of this driver without status, checks its `spec.source.snapshotHandle` exists on the node
/// and marks it ready (what the csi-snapshotter does by asking the driver).
async fn ensure_preprovisioned_content(
    shared: &Shared,
    vs: &VolumeSnapshot,
    name: &str,
) -> Result<VolumeSnapshotContent, SnapshotError> {
    let api = Api::<VolumeSnapshotContent>::all(shared.node.client.clone());
    let mut content = api
        .get_opt(name)
        .await
        .map_err(|source| SnapshotError::GetContent {
            name: name.to_string(),
            source,
        })?
        .ok_or_else(|| SnapshotError::ContentNotFound {
            name: name.to_string(),
        })?;
    check_bound_to(&content, vs)?;
    if content.spec.volume_snapshot_ref.uid.is_none() {
        let patch = json!({"spec": {"volumeSnapshotRef": {"uid": vs.metadata.uid}}});
        content = api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| SnapshotError::PatchContent {
                name: name.to_string(),
                source,
            })?;
    }
    let ready = content.status.as_ref().and_then(|s| s.ready_to_use) == Some(true);
    if ready || content.spec.driver != CSI_DRIVER {
        return Ok(content);
    }
    let handle = content.spec.source.snapshot_handle.clone();
    let missing = || SnapshotError::MissingHandle {
        content: name.to_string(),
        handle: handle.clone(),
    };
    let path = handle.as_deref().map(PathBuf::from).ok_or_else(missing)?;
    let meta = tokio::fs::metadata(&path).await.map_err(|_| missing())?;
    let status = VolumeSnapshotContentStatus {
        snapshot_handle: handle.clone(),
        creation_time: meta.modified().ok().map(nanos_since_epoch),
        ready_to_use: Some(true),
        // A directory's restore size is the source volume's capacity, which is unknown here.
        restore_size: meta
            .is_file()
            .then(|| i64::try_from(meta.len()).unwrap_or(i64::MAX)),
        error: None,
    };
    patch_content_status(shared, name, status).await
}

/// Before the finalizer goes: waits for restores from the snapshot to finish, then for a
/// `Delete` content removes the copy and the content object; orphaned copies of a crashed
/// first attempt are removed too.
async fn cleanup(shared: &Shared, vs: &VolumeSnapshot) -> Result<Action, SnapshotError> {
    let client = &shared.node.client;
    let namespace = vs.namespace().unwrap_or_default();
    let name = vs.name_any();
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default())
        .await
        .map_err(|source| SnapshotError::ListClaims {
            namespace: namespace.clone(),
            source,
        })?;
    // What `volumesnapshot-as-source-protection` guards on a real cluster.
    if let Some(claim) = claims.items.iter().find(|c| restores_from(c, &name)) {
        return Err(SnapshotError::InUse {
            namespace,
            name,
            claim: claim.name_any(),
        });
    }
    let uid = vs.metadata.uid.clone().unwrap_or_default();
    let dynamic_name = format!("snapcontent-{uid}");
    let content_name = vs
        .status
        .as_ref()
        .and_then(|s| s.bound_volume_snapshot_content_name.clone())
        .unwrap_or_else(|| dynamic_name.clone());
    let contents = Api::<VolumeSnapshotContent>::all(client.clone());
    let content =
        contents
            .get_opt(&content_name)
            .await
            .map_err(|source| SnapshotError::GetContent {
                name: content_name.clone(),
                source,
            })?;
    let dir = shared.node.snapshots_dir();
    let remove = |path: PathBuf| async move {
        remove_path(&path)
            .await
            .map_err(|source| SnapshotError::CopyFile { path, source })
    };
    match content {
        Some(content) if refers_to(&content, vs) => {
            if content.spec.deletion_policy == DeletionPolicy::Delete {
                let handle = content
                    .status
                    .as_ref()
                    .and_then(|s| s.snapshot_handle.clone())
                    .or_else(|| content.spec.source.snapshot_handle.clone())
                    .map(PathBuf::from);
                // Only copies this node made; a handle elsewhere is someone else's data.
                if let Some(handle) = handle.filter(|h| h.parent() == Some(dir.as_path())) {
                    remove(handle).await?;
                }
                match contents
                    .delete(&content_name, &DeleteParams::default())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(source) => {
                        return Err(SnapshotError::DeleteContent {
                            name: content_name,
                            source,
                        })
                    }
                }
                tracing::info!(content = %content_name, "snapshot deleted with its content");
            }
        }
        // No content: a copy may have been made before a crash, and belongs to no one.
        _ => {
            remove(dir.join(&dynamic_name)).await?;
        }
    }
    remove(dir.join(format!(".tmp-{dynamic_name}"))).await?;
    Ok(Action::await_change())
}

/// Whether the claim is unbound and names the snapshot as its data source.
fn restores_from(claim: &PersistentVolumeClaim, snapshot: &str) -> bool {
    let spec = claim.spec.clone().unwrap_or_default();
    let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let by_ref = spec.data_source_ref.is_some_and(|r| {
        r.kind == "VolumeSnapshot"
            && r.api_group.as_deref() == Some(SNAPSHOT_GROUP)
            && r.name == snapshot
    });
    let by_source = spec.data_source.is_some_and(|r| {
        r.kind == "VolumeSnapshot"
            && r.api_group.as_deref() == Some(SNAPSHOT_GROUP)
            && r.name == snapshot
    });
    !bound && claim.metadata.deletion_timestamp.is_none() && (by_ref || by_source)
}

/// The lab's own definitions of the three `snapshot.storage.k8s.io/v1` kinds
/// (`crds/snapshot.storage.k8s.io.yaml`), for a real control plane without upstream files.
pub const LAB_SNAPSHOT_CRDS: &str = include_str!("../../crds/snapshot.storage.k8s.io.yaml");

/// Installs the `snapshot.storage.k8s.io` CRDs on a real control plane with server-side
/// apply and waits until each is Established: every `*.yaml` file in `dir` when given (the
/// upstream files of kubernetes-csi/external-snapshotter, as a cluster runs them), else
/// [`LAB_SNAPSHOT_CRDS`].
///
/// # Errors
/// When a file cannot be read or parsed, the API server refuses a CRD, or one is not
/// Established within 30 s.
pub async fn install_crds(client: &kube::Client, dir: Option<&Path>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let mut texts = Vec::new();
    match dir {
        Some(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
                .collect();
            files.sort();
            anyhow::ensure!(
                !files.is_empty(),
                "no CRD files (*.yaml) in {}",
                dir.display()
            );
            for file in files {
                texts.push((file.display().to_string(), std::fs::read_to_string(&file)?));
            }
        }
        None => texts.push((
            "the lab's snapshot CRDs".into(),
            LAB_SNAPSHOT_CRDS.to_string(),
        )),
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for (origin, text) in texts {
        for document in serde_yaml::Deserializer::from_str(&text) {
            let crd: CustomResourceDefinition = serde::Deserialize::deserialize(document)
                .with_context(|| format!("parsing {origin}"))?;
            let name = crd.name_any();
            crds.patch(
                &name,
                &PatchParams::apply(storage::FIELD_MANAGER).force(),
                &Patch::Apply(&crd),
            )
            .await
            .with_context(|| format!("applying CRD {name} from {origin}"))?;
            names.push(name);
        }
    }
    for name in names {
        crate::wait::until(
            &format!("CRD {name} Established"),
            Duration::from_secs(30),
            || {
                let crds = crds.clone();
                let name = name.clone();
                async move {
                    let crd = crds.get(&name).await.map_err(|e| e.to_string())?;
                    let established = crd
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    if established {
                        Ok(())
                    } else {
                        Err("not yet".to_string())
                    }
                }
            },
        )
        .await?;
    }
    Ok(())
}
