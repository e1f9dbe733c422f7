//! The DRPairs of this site: a worker per pair that is active here ships its generations on
//! the RPO schedule; pairs active elsewhere are received by the destination service, which
//! reports through [`SiteObserver`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use ferry_schemas::conditions::{
    ConditionStatus as S, PairConditionReason as R, PairConditionType as T,
};
use ferry_schemas::contract::PEER_RELEASE_FINALIZER;
use ferry_schemas::DRPair;

use super::capture::{capture_generation, snapshot_name};
use super::movers::MoverPods;
use crate::delta::{HashStore, VolumeKey};
use crate::destination::{
    CommittedGeneration, DestinationObserver, PairKey, Rejection, Release, SiteView,
};
use crate::metrics::{Metrics, PairLabels};
use crate::source::{ship, Faults, ShipRequest};
use crate::tls::TlsMaterial;
use ferry_runtime::{Component, ConditionSet, PairStatus};

/// Everything a pair worker needs.
#[derive(Clone)]
pub struct SiteContext {
    /// This site's name.
    pub site: String,
    /// API client of this site.
    pub client: Client,
    /// Mover pods.
    pub movers: MoverPods,
    /// Source hash store.
    pub hashes: HashStore,
    /// TLS material for peers.
    pub tls: TlsMaterial,
    /// Status writer.
    pub status: PairStatus,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// This cluster's Sites, from one shared watch.
    pub sites: super::sites::SiteCache,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn from_unix(seconds: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(seconds.max(0.0))
}

/// `status.lastCaptureTime` as a `SystemTime`: when the newest generation the peer holds
/// was captured, as last written to this site's DRPair status.
pub(super) fn recorded_capture(status: &ferry_schemas::drpair::DRPairStatus) -> Option<SystemTime> {
    status
        .last_capture_time
        .as_ref()
        .map(|t| UNIX_EPOCH + Duration::from_millis(t.0.as_millisecond().max(0).unsigned_abs()))
}

pub(super) fn rfc3339(t: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .map(|ts| {
            ts.round(k8s_openapi::jiff::Unit::Second)
                .unwrap_or(ts)
                .to_string()
        })
        .unwrap_or_default()
}

/// Runs workers for the DRPairs active at this site until the process ends.
///
/// # Errors
/// Never returns under normal operation; a watch error is retried by the watcher.
pub async fn run(ctx: SiteContext) {
    let pairs: Api<DRPair> = Api::all(ctx.client.clone());
    let workers: Arc<Mutex<HashMap<PairKey, tokio::task::JoinHandle<()>>>> = Arc::default();
    let views: Arc<Mutex<HashMap<PairKey, tokio::task::JoinHandle<()>>>> = Arc::default();
    let mut events = watcher(pairs, watcher::Config::default()).boxed();
    while let Some(event) = events.next().await {
        let objects = match event {
            Ok(watcher::Event::Apply(pair)) | Ok(watcher::Event::InitApply(pair)) => vec![pair],
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "watching DRPairs");
                continue;
            }
        };
        for pair in objects {
            let key = PairKey {
                namespace: pair.namespace().unwrap_or_default(),
                name: pair.name_any(),
            };
            let active = pair
                .status
                .as_ref()
                .and_then(|s| s.active_site.clone())
                .unwrap_or_else(|| pair.spec.primary_site.clone());
            if active != ctx.site {
                if pair.metadata.deletion_timestamp.is_some() {
                    let (ctx, key) = (ctx.clone(), key.clone());
                    tokio::spawn(async move {
                        super::deletion::release_copy(&ctx, &pair, &key).await;
                    });
                    continue;
                }
                // This site holds the pair's copy: keep its own view of the lag current.
                let mut running = views.lock().unwrap_or_else(|p| p.into_inner());
                if running.get(&key).is_none_or(|w| w.is_finished()) {
                    let task = super::dr_view::run(ctx.clone(), key.clone());
                    running.insert(key, tokio::spawn(task));
                }
                continue;
            }
            let mut running = workers.lock().unwrap_or_else(|p| p.into_inner());
            if running.get(&key).is_some_and(|w| !w.is_finished()) {
                continue;
            }
            tracing::info!(pair = %key, "shipping pair from this site");
            let ctx = ctx.clone();
            let task_key = key.clone();
            running.insert(
                key,
                tokio::spawn(super::worker::Worker::new(ctx, task_key).run()),
            );
        }
    }
}

/// Captures and ships generation `generation` of `key` at `epoch` through `client`; gives
/// the ship report and the capture time, or a message naming the step that failed.
pub(super) async fn sync_once(
    ctx: &SiteContext,
    client: &mut ferry_schemas::proto::ReplicationClient<tonic::transport::Channel>,
    pair: &DRPair,
    key: &PairKey,
    valid: &ferry_schemas::validation::ValidPairSpec,
    generation: u64,
    epoch: u64,
) -> Result<(crate::source::ShipReport, SystemTime), String> {
    let mut captured = capture_generation(&ctx.client, &ctx.movers, key, valid, generation)
        .await
        .map_err(|e| format!("capture of generation {generation}: {e}"))?;
    // Block volumes: what changed since the last committed generation's snapshot, from the
    // CSI driver's changed block tracking.
    for volume in captured.volumes.iter_mut().filter(|v| v.spec.block) {
        let claim = volume.spec.volume.clone();
        let base = ctx
            .hashes
            .load(&VolumeKey::new(key.to_string(), claim.clone()))
            .ok()
            .and_then(|loaded| loaded.into_previous())
            .map(|index| (index.generation.0, index.digest().0));
        let base_name = base.map(|(g, _)| snapshot_name(key, &claim, g));
        let target = snapshot_name(key, &claim, generation);
        let answer = super::cbt::changed_blocks(
            &ctx.client,
            &key.namespace,
            base.zip(base_name.as_deref())
                .map(|((generation, digest), snapshot)| super::cbt::Base {
                    snapshot,
                    generation,
                    digest,
                }),
            &target,
        )
        .await;
        if answer.service {
            captured.cleanup.keep_as_base(target);
        }
        // A driver that under-reports would go unnoticed (the destination verifies what it
        // was sent): every spec.fullScanEvery-th generation reads Block volumes whole too.
        volume.changed = Some(if valid.quick_check(generation) {
            answer.changed
        } else {
            crate::source::ChangedBlocks::Unknown(crate::source::FullScanReason {
                code: "scheduled",
                message: format!(
                    "generation {generation} is a full-scan generation (spec.fullScanEvery)"
                ),
            })
        });
    }
    let pair_json = serde_json::to_vec(&json!({
        "metadata": {"name": key.name, "namespace": key.namespace, "labels": pair.metadata.labels},
        "spec": pair.spec,
    }))
    .unwrap_or_default();
    let request = ShipRequest {
        pair: key.clone(),
        generation,
        epoch,
        source_site: ctx.site.clone(),
        pair_json,
        manifests_json: captured.manifests_json.clone(),
        capture_time_unix_seconds: unix(captured.capture_time),
        quick_check: valid.quick_check(generation),
    };
    let capture_time = captured.capture_time;
    let result = ship(
        client,
        &ctx.hashes,
        &request,
        captured.volumes,
        &Faults::default(),
    )
    .await;
    match &result {
        Ok(_) => {
            captured
                .cleanup
                .after_commit(&ctx.client, &ctx.movers, generation)
                .await
        }
        Err(_) => captured.cleanup.run(&ctx.client, &ctx.movers).await,
    }
    result
        .map(|report| (report, capture_time))
        .map_err(|e| format!("shipping generation {generation}: {e}"))
}

/// The destination's view of this site: epochs from the local DRPair, Events and status on
/// commit and rejection.
#[derive(Clone)]
pub struct SiteObserver {
    /// This site.
    pub site: String,
    /// Status writer.
    pub status: PairStatus,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl SiteObserver {
    /// `spec.standby: Applied`: the generation's manifests, transformed for this site and
    /// parked (workloads at zero replicas with the count kept in an annotation, CronJobs
    /// suspended), are applied here, so a failover only has to scale up. PVCs are left out:
    /// a migration or failover creates them from the chosen generation's snapshots.
    async fn apply_standby(
        &self,
        pair: &PairKey,
        generation: u64,
        pair_json: &[u8],
        manifests_json: &[u8],
    ) -> Option<ConditionSet> {
        let declared = serde_json::from_slice::<serde_json::Value>(pair_json).ok()?;
        let spec =
            serde_json::from_value::<ferry_schemas::DRPairSpec>(declared["spec"].clone()).ok()?;
        let api: Api<DRPair> = Api::namespaced(self.status.client().clone(), &pair.namespace);
        if spec.standby != ferry_schemas::drpair::StandbyMode::Applied {
            // Cold standby: say so only where a warm standby was reported before.
            let here = api.get_opt(&pair.name).await.ok().flatten()?;
            let reported = here
                .status
                .is_some_and(|s| T::StandbyApplied.find(&s.conditions).is_some());
            return reported.then(|| {
                (
                    T::StandbyApplied,
                    S::False,
                    R::StandbyStored,
                    "spec.standby is Stored: nothing is applied here until a migration or failover"
                        .to_string(),
                )
            });
        }
        let result = async {
            let bundle = ferry_manifests::ManifestBundle::from_json_bytes(manifests_json)
                .map_err(|e| e.to_string())?;
            let waves = ferry_manifests::plan_instantiation(
                bundle.objects,
                &pair.name,
                &pair.namespace,
                &spec.transform,
                ferry_manifests::Instantiation::Standby,
            )
            .map_err(|e| e.to_string())?;
            for object in waves.iter().flatten() {
                ferry_manifests::apply_object(
                    self.status.client(),
                    object,
                    Component::Replicator.manager(),
                )
                .await
                .map_err(|e| {
                    format!(
                        "{} {}: {e}",
                        object["kind"].as_str().unwrap_or_default(),
                        object["metadata"]["name"].as_str().unwrap_or_default()
                    )
                })?;
            }
            Ok::<(), String>(())
        }
        .await;
        match result {
            Ok(()) => Some((
                T::StandbyApplied,
                S::True,
                R::StandbyCurrent,
                format!("generation {generation}'s manifests are applied here, parked"),
            )),
            Err(message) => {
                tracing::warn!(pair = %pair, generation, %message, "applying the standby manifests");
                let message = format!("generation {generation}: {message}");
                if let Ok(Some(object)) = api.get_opt(&pair.name).await {
                    self.status
                        .event(
                            &object,
                            true,
                            "StandbyApplyFailed",
                            "Receive",
                            message.clone(),
                        )
                        .await;
                }
                Some((T::StandbyApplied, S::False, R::StandbyApplyFailed, message))
            }
        }
    }
}

impl SiteObserver {
    /// This site's DRPair copy of `pair`, with the API that reads it, if there is one.
    async fn copy_of(&self, pair: &PairKey) -> Result<Option<(Api<DRPair>, DRPair)>, String> {
        let api: Api<DRPair> = Api::namespaced(self.status.client().clone(), &pair.namespace);
        let copy = api
            .get_opt(&pair.name)
            .await
            .map_err(|e| format!("reading DRPair {pair}: {e}"))?;
        Ok(copy.map(|c| (api, c)))
    }

    /// `Retain`: the DRPair copy says it is detached, with what it keeps.
    async fn detach(&self, pair: &PairKey, release: &Release) -> Result<Vec<String>, String> {
        let Some((_, object)) = self.copy_of(pair).await? else {
            // No generation ever arrived here: nothing to mark.
            return Ok(Vec::new());
        };
        let kept = release
            .kept
            .iter()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let message = format!(
            "{} (deletionPolicy Retain): nothing more arrives; generations [{kept}] are kept here, and a Failover Migration here can still start the app from them",
            release.reason
        );
        self.status
            .apply(
                &pair.namespace,
                &pair.name,
                json!({"phase": "Detached"}),
                &[(T::Ready, S::False, R::Detached, message.clone())],
            )
            .await
            .map_err(|e| format!("writing DRPair {pair} status: {e}"))?;
        self.status
            .event(&object, false, "Detached", "Release", message)
            .await;
        Ok(Vec::new())
    }

    /// `Delete`: the DRPair copy goes. A parked standby (`spec.standby: Applied`) is the
    /// app's own objects, which Ferry applies but never deletes: they stay, and the Event
    /// says so.
    async fn remove(&self, pair: &PairKey, release: &Release) -> Result<Vec<String>, String> {
        let Some((api, object)) = self.copy_of(pair).await? else {
            return Ok(Vec::new());
        };
        let parked = object
            .status
            .as_ref()
            .and_then(|s| T::StandbyApplied.find(&s.conditions))
            .is_some_and(|c| c.status == S::True.as_str());
        if parked {
            let message = format!(
                "{} (deletionPolicy Delete): the copy here is removed; the parked standby's objects are the app's and stay (delete them if unwanted)",
                release.reason
            );
            self.status
                .event(&object, false, "StandbyLeftInPlace", "Release", message)
                .await;
        }
        // A copy that was once the active one still carries the finalizer.
        ferry_runtime::finalizer::remove(&api, &object, PEER_RELEASE_FINALIZER)
            .await
            .map_err(|e| format!("removing the finalizer of DRPair {pair}: {e}"))?;
        match api.delete(&pair.name, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(format!("deleting DRPair {pair}: {e}")),
        }
        Ok(vec![format!("DRPair {}", pair.name)])
    }
}

#[tonic::async_trait]
impl DestinationObserver for SiteObserver {
    async fn released(&self, pair: &PairKey, release: &Release) -> Result<Vec<String>, String> {
        match release.policy {
            ferry_schemas::drpair::DeletionPolicy::Retain => self.detach(pair, release).await,
            ferry_schemas::drpair::DeletionPolicy::Delete => self.remove(pair, release).await,
        }
    }

    async fn site_view(&self, pair: &PairKey) -> Option<SiteView> {
        let api: Api<DRPair> = Api::namespaced(self.status.client().clone(), &pair.namespace);
        let status = api.get_opt(&pair.name).await.ok().flatten()?.status?;
        Some(SiteView {
            epoch: status.epoch.map(|e| e.0).unwrap_or(0),
            active_here: status.active_site.as_deref() == Some(self.site.as_str()),
            active_site: status.active_site,
        })
    }

    async fn rejected(&self, pair: &PairKey, rejection: &Rejection) {
        self.metrics.chunk_rejected(
            &PairLabels::new(&pair.namespace, &pair.name),
            rejection.reason,
        );
        let api: Api<DRPair> = Api::namespaced(self.status.client().clone(), &pair.namespace);
        if let Ok(Some(object)) = api.get_opt(&pair.name).await {
            self.status
                .event(
                    &object,
                    true,
                    rejection.reason,
                    "Receive",
                    rejection.message.clone(),
                )
                .await;
        }
    }

    async fn committed(
        &self,
        pair: &PairKey,
        source_site: &str,
        generation: &CommittedGeneration,
        pair_json: &[u8],
        manifests_json: &[u8],
    ) {
        let api: Api<DRPair> = Api::namespaced(self.status.client().clone(), &pair.namespace);
        // Keep this site's copy of the DRPair in agreement with the source's.
        if let Ok(declared) = serde_json::from_slice::<serde_json::Value>(pair_json) {
            let patch = json!({
                "apiVersion": "ferry.dev/v1alpha1",
                "kind": "DRPair",
                "metadata": {"name": pair.name, "namespace": pair.namespace, "labels": declared["metadata"]["labels"]},
                "spec": declared["spec"],
            });
            let params = kube::api::PatchParams::apply(Component::Replicator.manager()).force();
            if let Err(e) = api
                .patch(&pair.name, &params, &kube::api::Patch::Apply(&patch))
                .await
            {
                tracing::warn!(pair = %pair, error = %e, "keeping the DRPair copy in agreement");
                return;
            }
        }
        let standby = self
            .apply_standby(pair, generation.generation, pair_json, manifests_json)
            .await;
        let capture = from_unix(generation.capture_time_unix_seconds);
        let lag = SystemTime::now()
            .duration_since(capture)
            .unwrap_or_default()
            .as_secs_f64();
        // The sender is the active site of the generation's epoch (the destination checked).
        let fields = json!({
            "epoch": generation.epoch,
            "activeSite": source_site,
            "generation": generation.generation,
            "lastSyncTime": rfc3339(SystemTime::now()),
            "lastCaptureTime": rfc3339(capture),
            "currentLagSeconds": (lag * 10.0).round() / 10.0,
            "phase": "Replicating",
        });
        let mut conditions = vec![
            (
                T::Synced,
                S::True,
                R::SyncSucceeded,
                format!(
                    "generation {} received and committed at {}",
                    generation.generation, self.site
                ),
            ),
            (
                T::Ready,
                S::True,
                R::Protected,
                format!("generation {} is complete here", generation.generation),
            ),
        ];
        conditions.extend(standby);
        // The next commit writes all of this again; a refusal now is logged and counted.
        if let Err(e) = self
            .status
            .apply(&pair.namespace, &pair.name, fields, &conditions)
            .await
        {
            tracing::warn!(pair = %pair, error = %e, "writing DRPair status after a commit");
            self.metrics
                .status_write_failed(&PairLabels::new(&pair.namespace, &pair.name));
        }
    }
}
