//! The destination's replicas in Kubernetes, as VolSync's ReplicationDestination keeps them:
//! one staging PVC per volume (`ferry-<pair>-<volume>-replica`) written by a mover pod, a
//! VolumeSnapshot of it per committed generation (`ferry-<pair>-<volume>-g<N>`) and a Secret
//! with the generation's manifests (`ferry-<pair>-g<N>-manifests`, key `manifests.json`; a
//! Secret because manifests include the app's Secrets).
//!
//! Failover and migration create the app's PVCs from a generation's snapshots, so a torn
//! staging volume never touches a committed generation. A source volume that grew makes its
//! staging PVC grow (PVC expansion); where the StorageClass forbids that, the staging PVC is
//! re-created at the new size from the newest generation's snapshot.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use ferry_schemas::contract::{
    generation_snapshot, manifests_secret, staging_claim, DIGEST_ANNOTATION, DIVERGED_LABEL,
    GENERATION_LABEL, MANIFESTS_KEY, PAIR_LABEL, REPLICA_ROLE, ROLE_LABEL, SEED_LABEL,
    VOLUME_LABEL,
};

use super::movers::MoverPods;
use crate::delta::VolumeDigest;
use crate::destination::{PairKey, ReplicaError, ReplicaStore, Seed, VolumeSpec};
use crate::mover::MoverSession;
use ferry_runtime::volumes::{
    create_claim, delete_claim, delete_snapshot, expand_claim, list_snapshots, snapshot_claim,
    ClaimShape, VolumeError,
};

/// Replicas kept as PVCs, VolumeSnapshots and Secrets in the pair's namespace.
#[derive(Clone)]
pub struct KubeReplicas {
    client: Client,
    movers: MoverPods,
    status: ferry_runtime::PairStatus,
}

impl KubeReplicas {
    /// Replicas through `client`, with movers started by `movers`, reporting Events through
    /// `status`.
    pub fn new(client: Client, movers: MoverPods, status: ferry_runtime::PairStatus) -> Self {
        Self {
            client,
            movers,
            status,
        }
    }

    fn labels(
        pair: &PairKey,
        generation: Option<u64>,
        volume: Option<&str>,
    ) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            (PAIR_LABEL.to_string(), pair.name.clone()),
            (ROLE_LABEL.to_string(), REPLICA_ROLE.to_string()),
            (
                "app.kubernetes.io/managed-by".to_string(),
                "ferry-replicator".to_string(),
            ),
        ]);
        if let Some(g) = generation {
            labels.insert(GENERATION_LABEL.to_string(), g.to_string());
        }
        if let Some(v) = volume {
            labels.insert(VOLUME_LABEL.to_string(), v.to_string());
        }
        labels
    }

    /// Reports (log and a Warning Event on the pair's DRPair here) that a replica PVC could
    /// not be expanded in place and is re-created from `base` instead.
    async fn not_expandable(&self, pair: &PairKey, why: &str, base: Option<&str>) {
        let from = base.map_or("empty (no committed generation yet)".to_string(), |b| {
            format!("VolumeSnapshot {b}")
        });
        let message = format!("{why}; re-creating the replica at the new size from {from}");
        tracing::warn!(pair = %pair, %message, "replica PVC not expandable");
        let api: Api<ferry_schemas::DRPair> = Api::namespaced(self.client.clone(), &pair.namespace);
        if let Ok(Some(object)) = api.get_opt(&pair.name).await {
            self.status
                .event(&object, true, "ReplicaNotExpandable", "Receive", message)
                .await;
        }
    }

    async fn ensure_namespace(&self, namespace: &str) -> Result<(), ReplicaError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}}))
            .map_err(|e| ReplicaError::Kube(e.to_string()))?;
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(ReplicaError::Kube(format!(
                "creating namespace {namespace}: {e}"
            ))),
        }
    }
}

#[tonic::async_trait]
impl ReplicaStore for KubeReplicas {
    async fn stage(
        &self,
        pair: &PairKey,
        volume: &VolumeSpec,
        base: Option<&str>,
        reset: bool,
    ) -> Result<MoverSession, ReplicaError> {
        self.ensure_namespace(&pair.namespace).await?;
        let claim = staging_claim(&pair.name, &volume.volume);
        let exists = Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(
            self.client.clone(),
            &pair.namespace,
        )
        .get_opt(&claim)
        .await
        .map_err(|e| ReplicaError::Kube(format!("reading PVC {}/{claim}: {e}", pair.namespace)))?
        .is_some();
        let mut reset = reset;
        if exists && !reset && !volume.capacity.is_empty() {
            // The source volume grew: the replica grows with it before anything is written.
            match expand_claim(&self.client, &pair.namespace, &claim, &volume.capacity).await {
                Ok(Some(from)) => {
                    tracing::info!(pair = %pair, claim, from, to = %volume.capacity, "replica PVC expanded");
                }
                Ok(None) => {}
                Err(VolumeError::NotExpandable(why)) => {
                    // The class cannot grow a volume in place: the replica is re-created at the
                    // new size from the newest generation's snapshot instead (a copy inside the
                    // storage; nothing more crosses the wire), and the pair's Event says so.
                    self.not_expandable(pair, &why, base).await;
                    reset = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if reset || !exists {
            // Movers of an abandoned sync were released by the caller before staging began;
            // stopping movers here would also stop this sync's movers of other volumes.
            delete_claim(&self.client, &pair.namespace, &claim).await?;
            let shape = ClaimShape {
                block: volume.block,
                storage_class: None,
                capacity: if volume.capacity.is_empty() {
                    "1Gi".into()
                } else {
                    volume.capacity.clone()
                },
            };
            create_claim(
                &self.client,
                &pair.namespace,
                &claim,
                &shape,
                base,
                &Self::labels(pair, None, Some(&volume.volume)),
            )
            .await?;
        }
        self.movers
            .start(
                &pair.namespace,
                &pair.name,
                "destination",
                &claim,
                volume.block,
                false,
            )
            .await
    }

    async fn release(&self, pair: &PairKey) -> Result<(), ReplicaError> {
        self.movers
            .stop(&pair.namespace, &pair.name, "destination")
            .await
    }

    async fn snapshot(
        &self,
        pair: &PairKey,
        generation: u64,
        volumes: &[VolumeSpec],
        digests: &BTreeMap<String, VolumeDigest>,
    ) -> Result<BTreeMap<String, String>, ReplicaError> {
        let mut names = BTreeMap::new();
        for volume in volumes {
            let name = generation_snapshot(&pair.name, &volume.volume, generation);
            // A leftover of a sync that died before its commit point is not this generation.
            delete_snapshot(&self.client, &pair.namespace, &name).await?;
            let annotations: BTreeMap<String, String> = digests
                .get(&volume.volume)
                .map(|d| (DIGEST_ANNOTATION.to_string(), d.to_string()))
                .into_iter()
                .collect();
            snapshot_claim(
                &self.client,
                &pair.namespace,
                &name,
                &staging_claim(&pair.name, &volume.volume),
                &Self::labels(pair, Some(generation), Some(&volume.volume)),
                &annotations,
            )
            .await?;
            names.insert(volume.volume.clone(), name);
        }
        Ok(names)
    }

    async fn store_manifests(
        &self,
        pair: &PairKey,
        generation: u64,
        manifests_json: &[u8],
    ) -> Result<(), ReplicaError> {
        let name = manifests_secret(&pair.name, generation);
        let mut secret = Secret {
            type_: Some("ferry.dev/manifests".into()),
            data: Some(BTreeMap::from([(
                MANIFESTS_KEY.to_string(),
                ByteString(manifests_json.to_vec()),
            )])),
            ..Secret::default()
        };
        secret.metadata.name = Some(name.clone());
        secret.metadata.labels = Some(Self::labels(pair, Some(generation), None));
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &pair.namespace);
        let _ = api.delete(&name, &DeleteParams::default()).await;
        api.create(&PostParams::default(), &secret)
            .await
            .map(|_| ())
            .map_err(|e| {
                ReplicaError::Kube(format!(
                    "storing manifests Secret {}/{name}: {e}",
                    pair.namespace
                ))
            })
    }

    async fn seed(&self, pair: &PairKey) -> Result<Option<Seed>, ReplicaError> {
        let selector = format!(
            "{PAIR_LABEL}={},{ROLE_LABEL}=replica,{SEED_LABEL}=true",
            pair.name
        );
        let mut by_generation: BTreeMap<u64, Seed> = BTreeMap::new();
        for (name, labels) in list_snapshots(&self.client, &pair.namespace, &selector).await? {
            let generation = labels
                .get(GENERATION_LABEL)
                .and_then(|g| g.parse::<u64>().ok());
            if let (Some(g), Some(volume)) = (generation, labels.get(VOLUME_LABEL)) {
                let seed = by_generation.entry(g).or_insert_with(|| Seed {
                    generation: g,
                    snapshots: BTreeMap::new(),
                    diverged: false,
                });
                seed.snapshots.insert(volume.clone(), name);
                seed.diverged |= labels.get(DIVERGED_LABEL).map(String::as_str) == Some("true");
            }
        }
        Ok(by_generation.pop_last().map(|(_, seed)| seed))
    }

    async fn prune(&self, pair: &PairKey, keep: &[u64]) -> Result<(), ReplicaError> {
        let selector = format!("{PAIR_LABEL}={},{ROLE_LABEL}=replica", pair.name);
        // A generation a DR drill is restoring from is held until the drill's verdict.
        let stale = |labels: &BTreeMap<String, String>| {
            let held = labels
                .keys()
                .any(|k| k.starts_with(ferry_schemas::contract::DRILL_HOLD_PREFIX));
            !held
                && labels
                    .get(GENERATION_LABEL)
                    .and_then(|g| g.parse::<u64>().ok())
                    .is_some_and(|g| !keep.contains(&g))
        };
        for (name, labels) in list_snapshots(&self.client, &pair.namespace, &selector).await? {
            if stale(&labels) {
                delete_snapshot(&self.client, &pair.namespace, &name).await?;
            }
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &pair.namespace);
        let list = secrets
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| {
                ReplicaError::Kube(format!(
                    "listing manifests Secrets in {}: {e}",
                    pair.namespace
                ))
            })?;
        for secret in list.items {
            if stale(secret.metadata.labels.as_ref().unwrap_or(&BTreeMap::new())) {
                let name = secret.metadata.name.unwrap_or_default();
                let _ = secrets.delete(&name, &DeleteParams::default()).await;
            }
        }
        Ok(())
    }

    async fn remove_pair(&self, pair: &PairKey) -> Result<Vec<String>, ReplicaError> {
        // Everything the destination made carries the pair and replica-role labels: staging
        // PVCs, generation and seed VolumeSnapshots, manifests Secrets. Snapshots go first,
        // so that no snapshot outlives the claim a restore would need to know it by.
        let selector = format!("{PAIR_LABEL}={},{ROLE_LABEL}={REPLICA_ROLE}", pair.name);
        let ns = &pair.namespace;
        self.movers.stop(ns, &pair.name, "destination").await?;
        let mut removed = Vec::new();
        for (name, _) in list_snapshots(&self.client, ns, &selector).await? {
            delete_snapshot(&self.client, ns, &name).await?;
            removed.push(format!("VolumeSnapshot {name}"));
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let listed = secrets
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| ReplicaError::Kube(format!("listing manifests Secrets in {ns}: {e}")))?;
        for secret in listed.items {
            let name = secret.metadata.name.unwrap_or_default();
            match secrets.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    return Err(ReplicaError::Kube(format!(
                        "deleting manifests Secret {ns}/{name}: {e}"
                    )))
                }
            }
            removed.push(format!("Secret {name}"));
        }
        let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
            Api::namespaced(self.client.clone(), ns);
        let listed = claims
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| ReplicaError::Kube(format!("listing replica PVCs in {ns}: {e}")))?;
        for claim in listed.items {
            let name = claim.metadata.name.unwrap_or_default();
            delete_claim(&self.client, ns, &name).await?;
            removed.push(format!("PersistentVolumeClaim {name}"));
        }
        Ok(removed)
    }
}

impl std::fmt::Debug for KubeReplicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeReplicas").finish_non_exhaustive()
    }
}
