//! Volume expansion: the CSI external-resizer's part (kubernetes-csi/external-resizer, and the
//! Kubernetes docs "Expanding Persistent Volumes Claims"), for this driver's volumes.
//!
//! A bound claim whose `spec.resources.requests.storage` grew past its `status.capacity` (the
//! API server let it: its StorageClass has `allowVolumeExpansion: true`) gets a bigger volume:
//! a `Block` image file is extended (sparse: the new bytes read as zeros), a `Filesystem`
//! directory has no size to change. Then the PV's `spec.capacity` and the claim's
//! `status.capacity` say the new size, and the claim gets a `VolumeResizeSuccessful` Event.
//! There is no separate node expansion (`FileSystemResizePending`): a lab volume is usable at
//! its new size at once.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{
    claim_request, get_volume, lab_volume, parse_quantity, patch_claim_status, storage_bytes,
    EventKind, Shared, StorageError, VolumeMode, CSI_DRIVER,
};

/// Grows `pvc`'s volume to its request when the request exceeds its capacity; otherwise does
/// nothing.
///
/// # Errors
/// [`StorageError`] naming the claim, the volume or the file that could not be changed; the
/// claim also gets a `VolumeResizeFailed` Event.
pub(super) async fn ensure_expanded(
    shared: &Shared,
    pvc: &PersistentVolumeClaim,
) -> Result<(), StorageError> {
    let (want, quantity) = claim_request(pvc)?;
    let capacity = pvc.status.as_ref().and_then(|s| s.capacity.as_ref());
    let have = match storage_bytes(capacity) {
        Some(q) => parse_quantity(q).map_err(|source| StorageError::Size {
            object: format!(
                "PersistentVolumeClaim {}/{} status.capacity",
                pvc.namespace().unwrap_or_default(),
                pvc.name_any()
            ),
            source,
        })?,
        None => return Ok(()), // not bound yet: provisioning sizes it
    };
    if want <= have {
        return Ok(());
    }
    let Some(volume) = pvc.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
        return Ok(());
    };
    let Some(pv) = get_volume(&shared.node.client, &volume).await? else {
        return Ok(());
    };
    let served = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .is_some_and(|c| c.driver == CSI_DRIVER);
    if !served {
        return Ok(());
    }
    let result = grow(shared, pvc, &pv, want, &quantity.0).await;
    let object = pvc.object_ref(&());
    match &result {
        Ok(()) => {
            let message = format!(
                "resize volume {volume:?} by resizer {CSI_DRIVER:?} finished successfully: {want} bytes"
            );
            tracing::info!(volume, from = have, to = want, "volume expanded");
            shared
                .events
                .publish(
                    &object,
                    EventKind::Normal,
                    "VolumeResizeSuccessful",
                    &message,
                )
                .await;
        }
        Err(e) => {
            let message = super::error_chain(e);
            shared
                .events
                .publish(&object, EventKind::Warning, "VolumeResizeFailed", &message)
                .await;
        }
    }
    result
}

async fn grow(
    shared: &Shared,
    pvc: &PersistentVolumeClaim,
    pv: &PersistentVolume,
    want: u64,
    quantity: &str,
) -> Result<(), StorageError> {
    let volume = lab_volume(pv)?;
    if volume.mode == VolumeMode::Block {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&volume.path)
            .await
            .map_err(|source| StorageError::WriteData {
                path: volume.path.clone(),
                source,
            })?;
        let len = file
            .metadata()
            .await
            .map_err(|source| StorageError::WriteData {
                path: volume.path.clone(),
                source,
            })?
            .len();
        if len < want {
            file.set_len(want)
                .await
                .map_err(|source| StorageError::WriteData {
                    path: volume.path.clone(),
                    source,
                })?;
            file.sync_all()
                .await
                .map_err(|source| StorageError::WriteData {
                    path: volume.path.clone(),
                    source,
                })?;
        }
    }
    Api::<PersistentVolume>::all(shared.node.client.clone())
        .patch(
            &volume.pv_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"capacity": {"storage": quantity}}})),
        )
        .await
        .map_err(|source| StorageError::PatchVolume {
            name: volume.pv_name.clone(),
            source,
        })?;
    patch_claim_status(
        &shared.node.client,
        pvc,
        json!({"status": {"capacity": {"storage": quantity}}}),
    )
    .await
}
