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
use ferry_schemas::validation::join_errors;
use ferry_schemas::{DRPair, Site};

use super::capture::capture_generation;
use super::movers::MoverPods;
use super::status::{ConditionSet, PairStatus};
use crate::delta::HashStore;
use crate::destination::{CommittedGeneration, DestinationObserver, PairKey, Rejection, SiteView};
use crate::metrics::{Metrics, PairLabels};
use crate::source::{committed_state, ship, Faults, RpoSchedule, ShipRequest};
use crate::tls::TlsMaterial;

/// Annotation a controller sets to ask for a sync now (any new value); the replicator echoes
/// the value in `status.lastSyncRequest`… once the generation it started after seeing it is
/// committed.
pub const SYNC_REQUEST_ANNOTATION: &str = "ferry.dev/sync-request";
/// How long to wait after a failed sync before the next attempt.
const RETRY: Duration = Duration::from_secs(5);
/// How often the lag in status is refreshed.
const TICK: Duration = Duration::from_secs(1);

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
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn from_unix(seconds: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(seconds.max(0.0))
}

fn rfc3339(t: SystemTime) -> String {
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
                tokio::spawn(async move { worker(ctx, task_key).await }),
            );
        }
    }
}

/// Ships `key` while it is active at this site.
async fn worker(ctx: SiteContext, key: PairKey) {
    let api: Api<DRPair> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let labels = PairLabels::new(&key.namespace, &key.name);
    let mut schedule: Option<RpoSchedule> = None;
    let mut last_capture: Option<SystemTime> = None;
    let mut last_lag_written = -1.0f64;
    let mut retry_at = SystemTime::UNIX_EPOCH;
    let mut violated = false;
    loop {
        let pair = match api.get_opt(&key.name).await {
            Ok(Some(pair)) if pair.metadata.deletion_timestamp.is_none() => pair,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(pair = %key, error = %e, "reading DRPair");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let status = pair.status.clone().unwrap_or_default();
        let active = status
            .active_site
            .clone()
            .unwrap_or_else(|| pair.spec.primary_site.clone());
        if active != ctx.site {
            tracing::info!(pair = %key, active, "pair is no longer active here; stop shipping");
            return;
        }
        if status.phase == Some(ferry_schemas::drpair::PairPhase::Fenced) {
            // The controller fenced this site (witness lease lost): ship nothing until it
            // holds the lease again.
            tokio::time::sleep(RETRY).await;
            continue;
        }
        let sites: Vec<String> = match Api::<Site>::all(ctx.client.clone())
            .list(&Default::default())
            .await
        {
            Ok(list) => list.items.iter().map(|s| s.name_any()).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing Sites");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let valid = match pair.spec.validate(Some(&sites)) {
            Ok(valid) => valid,
            Err(errors) => {
                let message = join_errors(&errors);
                let _ = ctx
                    .status
                    .patch(
                        &key.namespace,
                        &key.name,
                        json!({"phase": "Error", "observedGeneration": pair.metadata.generation}),
                        &[(T::Ready, S::False, R::InvalidSpec, message.clone())],
                    )
                    .await;
                if status.phase.map(|p| p.as_str()) != Some("Error") {
                    ctx.status
                        .event(&pair, true, "InvalidSpec", "Validate", message)
                        .await;
                }
                // Wait for the spec to change.
                wait_for_change(&api, &key.name, pair.metadata.generation).await;
                continue;
            }
        };
        if status.active_site.is_none() || status.epoch.is_none() {
            let _ = ctx
                .status
                .patch(
                    &key.namespace,
                    &key.name,
                    json!({"activeSite": ctx.site, "epoch": 1, "phase": "Initializing"}),
                    &[(
                        T::Ready,
                        S::False,
                        R::NoCompleteGeneration,
                        "no complete generation at the destination yet".to_string(),
                    )],
                )
                .await;
            continue;
        }
        let epoch = status.epoch.map(|e| e.0).unwrap_or(1);
        let schedule = schedule.get_or_insert_with(|| RpoSchedule::new(valid.rpo));
        schedule.set_rpo(valid.rpo);
        let peer = if valid.primary_site == ctx.site {
            &valid.secondary_site
        } else {
            &valid.primary_site
        };
        let endpoint = match Api::<Site>::all(ctx.client.clone()).get_opt(peer).await {
            Ok(Some(site)) => site.spec.replicator_endpoint,
            _ => {
                let _ = ctx
                    .status
                    .patch(
                        &key.namespace,
                        &key.name,
                        json!({}),
                        &[(
                            T::PeerReachable,
                            S::False,
                            R::PeerUnreachable,
                            format!("Site {peer} not found"),
                        )],
                    )
                    .await;
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let mut client = match crate::transport::connect_peer(&endpoint, &ctx.tls) {
            Ok(client) => client,
            Err(e) => {
                let _ = ctx
                    .status
                    .patch(
                        &key.namespace,
                        &key.name,
                        json!({}),
                        &[(
                            T::PeerReachable,
                            S::False,
                            R::PeerUnreachable,
                            format!("Site {peer}: {e}"),
                        )],
                    )
                    .await;
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        // Refresh what the destination holds: its newest generation and when it was captured.
        let (committed, dest_epoch) = match committed_state(&mut client, &key).await {
            Ok(state) => state,
            Err(e) => {
                let _ = ctx
                    .status
                    .patch(
                        &key.namespace,
                        &key.name,
                        json!({"phase": "Degraded"}),
                        &[(
                            T::PeerReachable,
                            S::False,
                            R::PeerUnreachable,
                            format!("replicator of site {peer} at {endpoint}: {e}"),
                        )],
                    )
                    .await;
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if dest_epoch > epoch {
            let message = format!("site {peer} holds epoch {dest_epoch}, newer than this site's {epoch}: this site was superseded; not shipping");
            ctx.status
                .event(&pair, true, "StaleEpoch", "Sync", message.clone())
                .await;
            let _ = ctx
                .status
                .patch(
                    &key.namespace,
                    &key.name,
                    json!({}),
                    &[(T::Synced, S::False, R::SyncFailed, message)],
                )
                .await;
            tokio::time::sleep(RETRY * 6).await;
            continue;
        }
        if committed.is_none() {
            last_capture = None;
        }
        // Lag and RPO, refreshed every tick while waiting.
        let now_t = SystemTime::now();
        let lag = last_capture.map(|c| now_t.duration_since(c).unwrap_or_default().as_secs_f64());
        if let Some(lag) = lag {
            ctx.metrics.set_lag(&labels, lag);
            let met = schedule.rpo_met(last_capture, now_t);
            if !met && !violated {
                violated = true;
                ctx.metrics.rpo_violation(&labels);
                ctx.status
                    .event(
                        &pair,
                        true,
                        "RPOMissed",
                        "Sync",
                        format!("lag {lag:.0}s exceeds rpo {}s", valid.rpo.as_secs()),
                    )
                    .await;
            }
            if (lag - last_lag_written).abs() >= 1.0 || !met {
                last_lag_written = lag;
                let (cs, reason) = if met {
                    (S::True, R::WithinRpo)
                } else {
                    (S::False, R::RpoExceeded)
                };
                let _ = ctx
                    .status
                    .patch(
                        &key.namespace,
                        &key.name,
                        json!({"currentLagSeconds": (lag * 10.0).round() / 10.0, "rpoMet": met}),
                        &[(
                            T::RpoMet,
                            cs,
                            reason,
                            format!("lag {lag:.0}s, rpo {}s", valid.rpo.as_secs()),
                        )],
                    )
                    .await;
            }
        }
        let requested = pair.annotations().get(SYNC_REQUEST_ANNOTATION).cloned();
        let request_pending = requested.is_some() && requested != status.last_sync_request;
        let due = schedule.next_start(last_capture, now_t);
        // While a Migration owns the pair, only its requested (final) sync runs.
        let migrating = status.phase.map(|p| p.as_str()) == Some("Migrating");
        if !request_pending && (migrating || now_t < due || now_t < retry_at) {
            tokio::time::sleep(TICK).await;
            continue;
        }
        // Sync now.
        let generation = committed
            .unwrap_or(0)
            .max(status.generation.map(|g| g.0).unwrap_or(0))
            + 1;
        let span = tracing::info_span!("sync", pair = %key, generation, epoch);
        let started = SystemTime::now();
        let result = tracing::Instrument::instrument(
            sync_once(&ctx, &mut client, &pair, &key, &valid, generation, epoch),
            span,
        )
        .await;
        match result {
            Ok((report, capture_time)) => {
                violated = false;
                last_capture = Some(capture_time);
                let duration = SystemTime::now()
                    .duration_since(started)
                    .unwrap_or_default();
                schedule.record(duration);
                let blocks: u64 = report.volumes.values().map(|v| v.blocks_scanned).sum();
                ctx.metrics.observe_sync(
                    &labels,
                    duration.as_secs_f64(),
                    report.bytes_shipped,
                    blocks,
                );
                let lag = SystemTime::now()
                    .duration_since(capture_time)
                    .unwrap_or_default()
                    .as_secs_f64();
                last_lag_written = lag;
                let mut fields = json!({
                    "generation": generation,
                    "lastSyncTime": rfc3339(SystemTime::now()),
                    "lastCaptureTime": rfc3339(capture_time),
                    "lastSyncDurationSeconds": (duration.as_secs_f64() * 1000.0).round() / 1000.0,
                    "lastSyncBytes": report.bytes_shipped + report.base_index_bytes,
                    "currentLagSeconds": (lag * 10.0).round() / 10.0,
                    "rpoMet": lag <= valid.rpo.as_secs_f64(),
                    "observedGeneration": pair.metadata.generation,
                });
                if request_pending {
                    fields["lastSyncRequest"] = json!(requested);
                }
                if !migrating {
                    fields["phase"] = json!("Replicating");
                }
                let _ = ctx.status.patch(&key.namespace, &key.name, fields, &[
                    (T::Synced, S::True, R::SyncSucceeded, format!("generation {generation} committed at {peer}: {} bytes in {:.1}s{}", report.bytes_shipped + report.base_index_bytes, duration.as_secs_f64(), if report.base_index_bytes > 0 { format!(" (of which {} bytes of {peer}'s index of its diverged seed)", report.base_index_bytes) } else { String::new() })),
                    (T::PeerReachable, S::True, R::PeerResponding, format!("replicator of site {peer} at {endpoint}")),
                    (T::RpoMet, S::True, R::WithinRpo, format!("lag {lag:.0}s, rpo {}s", valid.rpo.as_secs())),
                    (T::Ready, S::True, R::Protected, format!("generation {generation} is complete at {peer}")),
                ]).await;
                tracing::info!(pair = %key, generation, bytes = report.bytes_shipped, seconds = duration.as_secs_f64(), "generation shipped");
            }
            Err(message) => {
                retry_at = SystemTime::now() + RETRY;
                tracing::warn!(pair = %key, generation, error = %message, "sync failed");
                ctx.status
                    .event(&pair, true, "SyncFailed", "Sync", message.clone())
                    .await;
                let _ = ctx.status.patch(&key.namespace, &key.name, if migrating { json!({}) } else { json!({"phase": if committed.is_some() { "Degraded" } else { "Initializing" }}) }, &[(T::Synced, S::False, R::SyncFailed, message)]).await;
            }
        }
    }
}

async fn sync_once(
    ctx: &SiteContext,
    client: &mut ferry_schemas::proto::ReplicationClient<tonic::transport::Channel>,
    pair: &DRPair,
    key: &PairKey,
    valid: &ferry_schemas::validation::ValidPairSpec,
    generation: u64,
    epoch: u64,
) -> Result<(crate::source::ShipReport, SystemTime), String> {
    let captured = capture_generation(&ctx.client, &ctx.movers, key, valid, generation)
        .await
        .map_err(|e| format!("capture of generation {generation}: {e}"))?;
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
    captured.cleanup.run(&ctx.client, &ctx.movers).await;
    result
        .map(|report| (report, capture_time))
        .map_err(|e| format!("shipping generation {generation}: {e}"))
}

async fn wait_for_change(api: &Api<DRPair>, name: &str, generation: Option<i64>) {
    let changed = move |p: Option<&DRPair>| p.is_none_or(|p| p.metadata.generation != generation);
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        kube::runtime::wait::await_condition(api.clone(), name, changed),
    )
    .await;
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
            let reported = here.status.is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == T::StandbyApplied.as_str())
            });
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
            let bundle = crate::manifests::ManifestBundle::from_json_bytes(manifests_json)
                .map_err(|e| e.to_string())?;
            let objects = crate::manifests::transform(bundle.objects, &spec.transform)
                .map_err(|e| e.to_string())?;
            let mut objects = crate::manifests::standby(objects);
            objects.retain(|o| o["kind"] != "PersistentVolumeClaim");
            for object in &mut objects {
                object["metadata"]["namespace"] = json!(pair.namespace);
            }
            for object in crate::manifests::instantiation_order(objects)
                .iter()
                .flatten()
            {
                crate::manifests::apply_object(
                    self.status.client(),
                    object,
                    super::status::MANAGER,
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

#[tonic::async_trait]
impl DestinationObserver for SiteObserver {
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
            let params = kube::api::PatchParams::apply(super::status::MANAGER).force();
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
        let _ = self
            .status
            .patch(&pair.namespace, &pair.name, fields, &conditions)
            .await;
    }
}
