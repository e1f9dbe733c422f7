//! Capturing a generation at the source: the app's manifests and a VolumeSnapshot of each of
//! its volumes, then a mover pod per volume reading a PVC restored from that snapshot.
//!
//! The snapshots of all volumes are requested together and only then awaited, so they are
//! taken as close to one point as the CSI driver allows; an app that needs strict
//! crash-consistency across volumes quiesces with `spec.hooks` (or a single volume):
//! `preCapture` runs in the app's pods before the snapshots, `postCapture` once they are cut
//! (see [`super::hooks`]). The manifests are listed right before the snapshots.

use std::collections::BTreeMap;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::{Api, Client};

use super::hooks::{run_hook, HookPoint};
use ferry_schemas::contract::{GENERATION_LABEL, PAIR_LABEL, ROLE_LABEL, VOLUME_LABEL};

use super::movers::MoverPods;
use crate::destination::{PairKey, ReplicaError, VolumeSpec};
use crate::source::SourceVolume;
use ferry_manifests::{capture, sanitise, ManifestBundle};
use ferry_runtime::volumes::{
    create_claim, delete_claim, delete_snapshot, list_snapshots, snapshot_claim, ClaimShape,
};
use ferry_schemas::validation::{ValidPairSpec, VolumeSelection};

/// A captured generation, ready to ship, with what it created at the source.
#[derive(Debug)]
pub struct Captured {
    /// Volumes with mover sessions on their point-in-time copies.
    pub volumes: Vec<SourceVolume>,
    /// Sanitised manifests, JSON.
    pub manifests_json: Vec<u8>,
    /// When the snapshots were requested.
    pub capture_time: SystemTime,
    /// Objects to delete once the generation is shipped (or failed).
    pub cleanup: Cleanup,
}

/// What a capture created at the source: snapshots, restored PVCs and mover pods.
#[derive(Debug, Default)]
pub struct Cleanup {
    namespace: String,
    pair: String,
    snapshots: Vec<String>,
    claims: Vec<String>,
    /// Snapshots to keep once the generation commits: the next sync's changed block tracking
    /// base (see [`super::cbt`]).
    keep: Vec<String>,
}

impl Cleanup {
    /// Keeps `snapshot` after a commit, as the base of the next generation's changed block
    /// tracking query.
    pub fn keep_as_base(&mut self, snapshot: String) {
        self.keep.push(snapshot);
    }

    /// After generation `generation` committed: deletes the movers, the restored PVCs and the
    /// snapshots not kept as a base, then every source snapshot of the pair from an earlier
    /// generation (the bases this generation replaces). Best effort, as [`Self::run`].
    pub async fn after_commit(mut self, client: &Client, movers: &MoverPods, generation: u64) {
        let keep = std::mem::take(&mut self.keep);
        self.snapshots.retain(|s| !keep.contains(s));
        let (namespace, pair) = (self.namespace.clone(), self.pair.clone());
        self.run(client, movers).await;
        let selector = format!("{PAIR_LABEL}={pair},{ROLE_LABEL}=source");
        let earlier = match list_snapshots(client, &namespace, &selector).await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(error = %e, "listing earlier source snapshots");
                return;
            }
        };
        for (name, labels) in earlier {
            let older = labels
                .get(GENERATION_LABEL)
                .and_then(|g| g.parse::<u64>().ok())
                .is_some_and(|g| g < generation);
            if older && !keep.contains(&name) {
                if let Err(e) = delete_snapshot(client, &namespace, &name).await {
                    tracing::warn!(error = %e, "deleting an earlier base snapshot");
                }
            }
        }
    }

    /// Deletes the mover pods, restored PVCs and snapshots of this capture. Best effort: a
    /// failure is logged and the objects stay labelled for the next cleanup.
    pub async fn run(self, client: &Client, movers: &MoverPods) {
        if let Err(e) = movers.stop(&self.namespace, &self.pair, "source").await {
            tracing::warn!(error = %e, "deleting source movers");
        }
        for claim in &self.claims {
            if let Err(e) = delete_claim(client, &self.namespace, claim).await {
                tracing::warn!(error = %e, "deleting restored PVC");
            }
        }
        for snapshot in &self.snapshots {
            if let Err(e) = delete_snapshot(client, &self.namespace, snapshot).await {
                tracing::warn!(error = %e, "deleting source snapshot");
            }
        }
    }
}

/// Capture failures: the message names the object.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Listing the app failed.
    #[error("capturing manifests: {0}")]
    Manifests(String),
    /// A PVC of `spec.volumes` is not there.
    #[error("spec.volumes: PVC {0} does not exist in the namespace")]
    MissingVolume(String),
    /// Snapshots, restores or movers failed.
    #[error(transparent)]
    Volume(#[from] ReplicaError),
    /// A capture hook failed (the message names the field and the pod).
    #[error(transparent)]
    Hook(super::hooks::HookError),
}

impl From<ferry_runtime::volumes::VolumeError> for CaptureError {
    fn from(e: ferry_runtime::volumes::VolumeError) -> Self {
        Self::Volume(e.into())
    }
}

/// Captures generation `generation` of `pair`. On error, whatever was created is deleted
/// before returning.
///
/// # Errors
/// [`CaptureError`] naming the manifest, PVC or snapshot that failed.
pub async fn capture_generation(
    client: &Client,
    movers: &MoverPods,
    pair: &PairKey,
    spec: &ValidPairSpec,
    generation: u64,
) -> Result<Captured, CaptureError> {
    let app = capture(client, &pair.namespace, &spec.selector)
        .await
        .map_err(|e| CaptureError::Manifests(crate::mover::agent::error_chain(&e)))?;
    let claims: Vec<String> = match &spec.volumes {
        VolumeSelection::AllMatched => app.pvcs.clone(),
        VolumeSelection::Named(names) => names.clone(),
    };
    let manifests_json = ManifestBundle {
        objects: sanitise(app.objects),
    }
    .to_json_bytes()
    .map_err(|e| CaptureError::Manifests(e.to_string()))?;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &pair.namespace);
    let mut shapes = BTreeMap::new();
    for claim in &claims {
        let pvc = pvcs
            .get_opt(claim)
            .await
            .map_err(|e| {
                ReplicaError::Kube(format!("reading PVC {}/{claim}: {e}", pair.namespace))
            })?
            .ok_or_else(|| CaptureError::MissingVolume(claim.to_string()))?;
        shapes.insert(claim.to_string(), ClaimShape::of(&pvc));
    }
    let mut cleanup = Cleanup {
        namespace: pair.namespace.clone(),
        pair: pair.name.clone(),
        ..Cleanup::default()
    };
    // Quiesce, cut the snapshots, resume: the app pauses only while the snapshots are taken.
    let pre = match &spec.hooks.pre_capture {
        Some(hook) => {
            run_hook(
                client,
                &pair.namespace,
                &spec.selector,
                hook,
                HookPoint::PreCapture,
            )
            .await
        }
        None => Ok(Vec::new()),
    };
    let capture_time = SystemTime::now();
    let snapshots = match pre {
        Ok(_) => snapshot(client, pair, generation, &shapes, &mut cleanup).await,
        Err(e) => Err(CaptureError::Hook(e)),
    };
    if let Some(hook) = &spec.hooks.post_capture {
        // Always, even after a failed pre-hook or snapshot: resume whatever was quiesced.
        let post = run_hook(
            client,
            &pair.namespace,
            &spec.selector,
            hook,
            HookPoint::PostCapture,
        )
        .await;
        if let Err(e) = post {
            if snapshots.is_ok() {
                cleanup.run(client, movers).await;
                return Err(CaptureError::Hook(e));
            }
            tracing::warn!(error = %e, "post-capture hook after a failed capture");
        }
    }
    let result = match snapshots {
        Ok(()) => mount(client, movers, pair, generation, &shapes, &mut cleanup).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(volumes) => Ok(Captured {
            volumes,
            manifests_json,
            capture_time,
            cleanup,
        }),
        Err(e) => {
            cleanup.run(client, movers).await;
            Err(e)
        }
    }
}

fn source_labels(pair: &PairKey, generation: u64, volume: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (PAIR_LABEL.to_string(), pair.name.clone()),
        (ROLE_LABEL.to_string(), "source".to_string()),
        (GENERATION_LABEL.to_string(), generation.to_string()),
        (VOLUME_LABEL.to_string(), volume.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "ferry-replicator".to_string(),
        ),
    ])
}

/// Deletes every source snapshot of `pair` (the changed block tracking bases): this site no
/// longer ships the pair. Best effort: a failure is logged, and the next commit or the pair's
/// deletion sweeps again.
pub async fn drop_bases(client: &Client, pair: &PairKey) {
    let selector = format!("{PAIR_LABEL}={},{ROLE_LABEL}=source", pair.name);
    match list_snapshots(client, &pair.namespace, &selector).await {
        Ok(list) => {
            for (name, _) in list {
                if let Err(e) = delete_snapshot(client, &pair.namespace, &name).await {
                    tracing::warn!(error = %e, "deleting a base snapshot");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing base snapshots"),
    }
}

/// The source VolumeSnapshot of `claim` at `generation`: `ferry-<pair>-<claim>-g<N>-src`.
pub fn snapshot_name(pair: &PairKey, claim: &str, generation: u64) -> String {
    format!("ferry-{}-{claim}-g{generation}-src", pair.name)
}

/// Snapshots every volume of `shapes`, returning once all are ready to use.
async fn snapshot(
    client: &Client,
    pair: &PairKey,
    generation: u64,
    shapes: &BTreeMap<String, ClaimShape>,
    cleanup: &mut Cleanup,
) -> Result<(), CaptureError> {
    let labels = |volume: &str| source_labels(pair, generation, volume);
    let snapshot_name = |claim: &str| snapshot_name(pair, claim, generation);
    // All snapshots requested before any is awaited: one point, as far as the driver allows.
    let requests = shapes.keys().map(|claim| {
        let name = snapshot_name(claim);
        let labels = labels(claim);
        async move {
            snapshot_claim(
                client,
                &pair.namespace,
                &name,
                claim,
                &labels,
                &BTreeMap::new(),
            )
            .await
        }
    });
    cleanup.snapshots = shapes.keys().map(|c| snapshot_name(c)).collect();
    for result in futures::future::join_all(requests).await {
        result?;
    }
    Ok(())
}

/// Restores a PVC from each volume's snapshot and starts a mover pod reading it.
async fn mount(
    client: &Client,
    movers: &MoverPods,
    pair: &PairKey,
    generation: u64,
    shapes: &BTreeMap<String, ClaimShape>,
    cleanup: &mut Cleanup,
) -> Result<Vec<SourceVolume>, CaptureError> {
    let labels = |volume: &str| source_labels(pair, generation, volume);
    let mut volumes = Vec::new();
    for (claim, shape) in shapes {
        let restored = format!("ferry-{}-{claim}-g{generation}-read", pair.name);
        cleanup.claims.push(restored.clone());
        create_claim(
            client,
            &pair.namespace,
            &restored,
            shape,
            Some(&snapshot_name(pair, claim, generation)),
            &labels(claim),
        )
        .await?;
        let session = movers
            .start(
                &pair.namespace,
                &pair.name,
                "source",
                &restored,
                shape.block,
                true,
            )
            .await?;
        volumes.push(SourceVolume {
            spec: VolumeSpec {
                volume: claim.clone(),
                block: shape.block,
                capacity: shape.capacity.clone(),
            },
            size_bytes: 0,
            session,
            changed: None,
        });
    }
    Ok(volumes)
}
