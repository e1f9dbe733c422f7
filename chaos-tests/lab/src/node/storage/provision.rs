//! The CSI driver and external-provisioner: a volume for a claim (a host directory, or a
//! sparse image file for `Block`), filled from a VolumeSnapshot `dataSource` when the claim
//! names one; data written under a temporary name and renamed into place.

use super::*;

/// The snapshot a claim is to be filled from: `dataSourceRef`, else `dataSource`.
pub(super) fn snapshot_source(pvc: &PersistentVolumeClaim) -> Result<Option<String>, StorageError> {
    let spec = pvc.spec.clone().unwrap_or_default();
    let namespace = pvc.namespace().unwrap_or_default();
    let source = match (spec.data_source_ref, spec.data_source) {
        (Some(r), _) => (r.api_group, r.kind, r.name, r.namespace),
        (None, Some(s)) => (s.api_group, s.kind, s.name, None),
        (None, None) => return Ok(None),
    };
    match source {
        (Some(group), kind, name, ns)
            if group == SNAPSHOT_GROUP
                && kind == "VolumeSnapshot"
                && ns.as_deref().is_none_or(|n| n == namespace) =>
        {
            Ok(Some(name))
        }
        (_, kind, name, _) => Err(StorageError::UnsupportedDataSource { kind, name }),
    }
}

/// A ready snapshot to restore from.
pub(super) struct RestoreSource {
    /// The snapshot copy (directory or image file).
    pub(super) handle: PathBuf,
    /// Mode of the volume the snapshot was taken of.
    pub(super) mode: VolumeMode,
}

/// Finds the claim's source snapshot's copy, checking it is ready, not being deleted, of the
/// claim's mode and no larger than the claim.
pub(super) async fn resolve_snapshot(
    client: &Client,
    pvc: &PersistentVolumeClaim,
    snapshot: &str,
    mode: VolumeMode,
    request_bytes: u64,
) -> Result<RestoreSource, StorageError> {
    let namespace = pvc.namespace().unwrap_or_default();
    let vs = Api::<VolumeSnapshot>::namespaced(client.clone(), &namespace)
        .get_opt(snapshot)
        .await
        .map_err(|source| StorageError::GetSnapshot {
            kind: "VolumeSnapshot",
            name: format!("{namespace}/{snapshot}"),
            source,
        })?
        .ok_or_else(|| StorageError::SnapshotNotFound {
            namespace: namespace.clone(),
            name: snapshot.to_string(),
        })?;
    let not_ready = || StorageError::SnapshotNotReady {
        namespace: namespace.clone(),
        name: snapshot.to_string(),
    };
    if vs.metadata.deletion_timestamp.is_some() {
        return Err(StorageError::SnapshotDeleting {
            namespace: namespace.clone(),
            name: snapshot.to_string(),
        });
    }
    let status = vs.status.clone().unwrap_or_default();
    let content_name = match (
        status.ready_to_use,
        status.bound_volume_snapshot_content_name,
    ) {
        (Some(true), Some(content)) => content,
        _ => return Err(not_ready()),
    };
    let content = Api::<VolumeSnapshotContent>::all(client.clone())
        .get_opt(&content_name)
        .await
        .map_err(|source| StorageError::GetSnapshot {
            kind: "VolumeSnapshotContent",
            name: content_name.clone(),
            source,
        })?
        .ok_or_else(not_ready)?;
    let content_status = content.status.clone().unwrap_or_default();
    let handle = match (content_status.ready_to_use, content_status.snapshot_handle) {
        (Some(true), Some(handle)) => PathBuf::from(handle),
        _ => return Err(not_ready()),
    };
    let snapshot_mode = VolumeMode::from_spec(content.spec.source_volume_mode.as_deref());
    if snapshot_mode != mode {
        return Err(StorageError::SnapshotModeMismatch {
            namespace,
            name: snapshot.to_string(),
            snapshot: snapshot_mode,
            claim: mode,
        });
    }
    let restore_bytes = content_status
        .restore_size
        .and_then(|b| u64::try_from(b).ok())
        .unwrap_or(0);
    if restore_bytes > request_bytes {
        return Err(StorageError::SnapshotTooLarge {
            namespace,
            name: snapshot.to_string(),
            restore_bytes,
            request_bytes,
        });
    }
    Ok(RestoreSource { handle, mode })
}

/// Provisions the claim's volume `pvc-<uid>`: data first, then the PV (pre-bound to the
/// claim). Both steps are skipped when already done, so a restart never provisions twice.
pub(super) async fn provision(
    shared: &Shared,
    pvc: &PersistentVolumeClaim,
) -> Result<PersistentVolume, StorageError> {
    let client = &shared.node.client;
    let uid = pvc.metadata.uid.clone().unwrap_or_default();
    let pv_name = format!("pvc-{uid}");
    if let Some(pv) = get_volume(client, &pv_name).await? {
        if claim_ref_uid(&pv) == Some(uid.as_str()) {
            return Ok(pv);
        }
        return Err(StorageError::VolumeTaken {
            volume: pv_name,
            claim: format!(
                "{:?}",
                pv.spec.and_then(|s| s.claim_ref).and_then(|r| r.uid)
            ),
        });
    }
    let spec = pvc.spec.clone().unwrap_or_default();
    let mode = VolumeMode::from_spec(spec.volume_mode.as_deref());
    let (request_bytes, request) = claim_request(pvc)?;
    let restore = match snapshot_source(pvc)? {
        Some(snapshot) => {
            Some(resolve_snapshot(client, pvc, &snapshot, mode, request_bytes).await?)
        }
        None => None,
    };
    let path = ensure_data(
        &shared.node.volumes_dir(),
        &pv_name,
        mode,
        request_bytes,
        restore.as_ref(),
    )
    .await?;
    let access_modes = spec
        .access_modes
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| vec!["ReadWriteOnce".to_string()]);
    let pv = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(pv_name.clone()),
            annotations: Some(BTreeMap::from([(
                ANN_PROVISIONED_BY.to_string(),
                CSI_DRIVER.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(access_modes),
            capacity: Some(BTreeMap::from([("storage".to_string(), request)])),
            claim_ref: Some(claim_reference(pvc)),
            csi: Some(CSIPersistentVolumeSource {
                driver: CSI_DRIVER.to_string(),
                volume_handle: pv_name.clone(),
                fs_type: (mode == VolumeMode::Filesystem).then(|| "ext4".to_string()),
                volume_attributes: Some(BTreeMap::from([(
                    PATH_ATTRIBUTE.to_string(),
                    path.display().to_string(),
                )])),
                ..CSIPersistentVolumeSource::default()
            }),
            persistent_volume_reclaim_policy: Some("Delete".to_string()),
            storage_class_name: Some(STORAGE_CLASS.to_string()),
            volume_mode: Some(mode.as_str().to_string()),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    };
    let api = Api::<PersistentVolume>::all(client.clone());
    let pv = match api.create(&PostParams::default(), &pv).await {
        Ok(pv) => pv,
        // Created by an earlier attempt whose answer was lost: done.
        Err(kube::Error::Api(status)) if status.code == 409 => get_volume(client, &pv_name)
            .await?
            .ok_or_else(|| StorageError::CreateVolume {
                name: pv_name.clone(),
                source: kube::Error::Api(status),
            })?,
        Err(source) => {
            return Err(StorageError::CreateVolume {
                name: pv_name,
                source,
            })
        }
    };
    let message = match restore {
        Some(r) => format!(
            "Successfully provisioned volume {pv_name} from snapshot copy {}",
            r.handle.display()
        ),
        None => format!("Successfully provisioned volume {pv_name}"),
    };
    shared
        .events
        .publish(
            &pvc.object_ref(&()),
            EventKind::Normal,
            "ProvisioningSucceeded",
            &message,
        )
        .await;
    Ok(pv)
}

/// Host path of a provisioned volume: `<dir>/<pv>` or `<dir>/<pv>.img`.
pub(super) fn data_path(volumes_dir: &Path, pv_name: &str, mode: VolumeMode) -> PathBuf {
    match mode {
        VolumeMode::Filesystem => volumes_dir.join(pv_name),
        VolumeMode::Block => volumes_dir.join(format!("{pv_name}.img")),
    }
}

/// Creates the volume's data under a temporary name and renames it into place; an existing
/// final path is complete by construction and kept.
pub(super) async fn ensure_data(
    volumes_dir: &Path,
    pv_name: &str,
    mode: VolumeMode,
    size_bytes: u64,
    restore: Option<&RestoreSource>,
) -> Result<PathBuf, StorageError> {
    let path = data_path(volumes_dir, pv_name, mode);
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StorageError::WriteData { path, source }
    };
    if tokio::fs::try_exists(&path)
        .await
        .map_err(write_err(&path))?
    {
        return Ok(path);
    }
    let tmp = volumes_dir.join(format!(".tmp-{pv_name}"));
    snapshots::remove_path(&tmp)
        .await
        .map_err(write_err(&tmp))?;
    match (restore, mode) {
        (Some(source), _) => {
            debug_assert_eq!(source.mode, mode);
            snapshots::copy_preserving(&source.handle, &tmp)
                .await
                .map_err(|source_err| StorageError::RestoreData {
                    from: source.handle.clone(),
                    to: path.clone(),
                    source: source_err,
                })?;
        }
        (None, VolumeMode::Filesystem) => {
            tokio::fs::create_dir(&tmp).await.map_err(write_err(&tmp))?;
        }
        (None, VolumeMode::Block) => {
            tokio::fs::File::create(&tmp)
                .await
                .map_err(write_err(&tmp))?;
        }
    }
    if mode == VolumeMode::Block {
        // Sparse: set_len allocates nothing. A restored image grows to the claim's size.
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .await
            .map_err(write_err(&tmp))?;
        let len = file.metadata().await.map_err(write_err(&tmp))?.len();
        if len < size_bytes {
            file.set_len(size_bytes).await.map_err(write_err(&tmp))?;
        }
    }
    tokio::fs::rename(&tmp, &path)
        .await
        .map_err(write_err(&path))?;
    Ok(path)
}
