//! The worker of one DRPair active at this site: a small state machine run once per tick.
//!
//! Each tick goes through the same steps, each either handing the next one what it found or
//! ending the tick with what to do instead ([`Next`]):
//!
//! 1. [`Worker::ensure_active`]: the pair exists, is active here, and carries the
//!    peer-release finalizer; a pair being deleted is finalized instead
//!    ([`super::deletion`]);
//! 2. [`Worker::ensure_valid`]: the spec passes validation (else `Ready=False InvalidSpec`
//!    and a wait for the spec to change);
//! 3. [`Worker::ensure_initialised`]: `status.activeSite` and `status.epoch` are set; a
//!    fenced site ships nothing and only refreshes its lag;
//! 4. [`Worker::ensure_peer`]: the peer's replicator answers, with what it holds and its
//!    epoch (a newer epoch there means this site was superseded);
//! 5. [`Worker::refresh_lag`]: lag and RPO in metrics, status and Events (also when step 4
//!    found the peer silent, so the active site's lag keeps growing);
//! 6. [`Worker::maybe_sync`]: a sync when one is due or requested, and its outcome in status.
//!
//! Status writes never fail silently: a refused write is logged, counted
//! (`ferry_status_write_failures_total`) and kept to be sent again first thing next tick.

use std::time::{Duration, SystemTime};

use kube::{Api, ResourceExt};
use serde_json::{json, Map, Value};

use ferry_runtime::ConditionSet;
use ferry_schemas::conditions::{
    ConditionStatus as S, PairConditionReason as R, PairConditionType as T,
};
use ferry_schemas::contract::SYNC_REQUEST_ANNOTATION;
use ferry_schemas::drpair::{DRPairStatus, PairPhase};
use ferry_schemas::proto::ReplicationClient;
use ferry_schemas::validation::{join_errors, ValidPairSpec};
use ferry_schemas::DRPair;
use tonic::transport::Channel;

use super::pairs::{rfc3339, sync_once, SiteContext};
use crate::destination::PairKey;
use crate::metrics::PairLabels;
use crate::source::{committed_state, RpoSchedule};

/// How long to wait after a failed step before the next attempt.
pub const RETRY: Duration = Duration::from_secs(5);
/// How often lag and RPO are refreshed while no sync is due.
pub const TICK: Duration = Duration::from_secs(1);
/// `status.currentLagSeconds` is rewritten when the lag moved by this fraction of the RPO
/// (at least a second), and at once when `rpoMet` flips: 5 s for `rpo: 1m`.
pub const LAG_STEPS_PER_RPO: f64 = 12.0;
/// How long a clean overlap check stands while the namespace's DRPairs do not change: the
/// check captures every earlier pair's app (discovery and a list per kind each), which made
/// syncs cost O(pairs) captures in a namespace of many pairs (docs/benchmarks.md). Relabelled
/// app objects that bring two pairs to overlap are caught within this time.
pub const OVERLAP_RECHECK: Duration = Duration::from_secs(600);

/// How a tick ends.
#[derive(Debug)]
pub enum Next {
    /// The pair is gone or no longer active here: the worker ends.
    Stop,
    /// Tick again after this long.
    Wait(Duration),
    /// Tick again once the spec's generation differs from this one (or after 30 s).
    SpecChange(Option<i64>),
}

/// What [`Worker::ensure_peer`] found.
struct Peer {
    name: String,
    endpoint: String,
    client: ReplicationClient<Channel>,
    /// The newest generation the peer committed, if any.
    committed: Option<u64>,
}

/// A pair's worker: what it remembers between ticks.
pub struct Worker {
    ctx: SiteContext,
    key: PairKey,
    api: Api<DRPair>,
    labels: PairLabels,
    schedule: Option<RpoSchedule>,
    /// Capture time of the newest generation the peer committed, as far as this worker knows.
    last_capture: Option<SystemTime>,
    /// The lag last written to status, seconds (written again once it moved by a
    /// [`LAG_STEPS_PER_RPO`]th of the RPO, at least 1 s).
    last_lag_written: f64,
    /// `rpoMet` as last written (written again at once when it flips).
    last_met_written: Option<bool>,
    /// No sync before this (after a failed one).
    retry_at: SystemTime,
    /// An RPO violation was reported and no sync succeeded since.
    violated: bool,
    /// A status write that failed, to send again: fields and conditions, newest wins.
    unwritten: Option<(Map<String, Value>, Vec<ConditionSet>)>,
    /// The peer's endpoint and a client to it, kept across ticks so that each tick does not
    /// open a new TLS connection (the channel reconnects by itself); dropped after a failed
    /// call, so the next tick starts afresh.
    peer_client: Option<(String, ReplicationClient<Channel>)>,
    /// This pair and the earlier ones (uid and spec generation) when no overlap was last
    /// found, and when: the check captures every earlier pair's app, so it is repeated only
    /// when those pairs change or [`OVERLAP_RECHECK`] has passed.
    overlap_clear: Option<(PairsFingerprint, std::time::Instant)>,
}

/// A pair and the DRPairs created before it in its namespace, as (uid, spec generation),
/// sorted.
type PairsFingerprint = Vec<(String, Option<i64>)>;

impl Worker {
    /// A worker for `key`.
    pub fn new(ctx: SiteContext, key: PairKey) -> Self {
        Self {
            api: Api::namespaced(ctx.client.clone(), &key.namespace),
            labels: PairLabels::new(&key.namespace, &key.name),
            ctx,
            key,
            schedule: None,
            last_capture: None,
            last_lag_written: -1.0,
            last_met_written: None,
            retry_at: SystemTime::UNIX_EPOCH,
            violated: false,
            unwritten: None,
            peer_client: None,
            overlap_clear: None,
        }
    }

    /// Ships the pair while it is active at this site.
    pub async fn run(mut self) {
        loop {
            self.flush_status().await;
            match self.tick().await {
                Next::Stop => return,
                Next::Wait(d) => tokio::time::sleep(d).await,
                Next::SpecChange(generation) => self.wait_for_spec_change(generation).await,
            }
        }
    }

    /// One pass through the steps.
    async fn tick(&mut self) -> Next {
        match self.steps().await {
            Ok(next) | Err(next) => next,
        }
    }

    async fn steps(&mut self) -> Result<Next, Next> {
        let (pair, status) = self.ensure_active().await?;
        let valid = self.ensure_valid(&pair, &status).await?;
        let epoch = self.ensure_initialised(&status).await?;
        if status.phase == Some(PairPhase::Fenced) {
            // The controller fenced this site (witness lease lost): ship nothing until it
            // holds the lease again. The copy at the peer keeps ageing all the same.
            self.refresh_lag(&pair, &valid, &status).await;
            return Err(Next::Wait(RETRY));
        }
        let peer = self.ensure_peer(&pair, &valid, epoch).await;
        // The lag grows whether or not the peer answers: an active site whose peer stopped
        // acknowledging must say so too.
        self.refresh_lag(&pair, &valid, &status).await;
        let mut peer = peer?;
        Ok(self
            .maybe_sync(&pair, &status, &valid, epoch, &mut peer)
            .await)
    }

    async fn ensure_active(&self) -> Result<(DRPair, DRPairStatus), Next> {
        let pair = match self.api.get_opt(&self.key.name).await {
            Ok(Some(pair)) => pair,
            Ok(None) => return Err(Next::Stop),
            Err(e) => {
                tracing::warn!(pair = %self.key, error = %e, "reading DRPair");
                return Err(Next::Wait(RETRY));
            }
        };
        let status = pair.status.clone().unwrap_or_default();
        let active = status
            .active_site
            .clone()
            .unwrap_or_else(|| pair.spec.primary_site.clone());
        if active != self.ctx.site {
            tracing::info!(pair = %self.key, active, "pair is no longer active here; stop shipping");
            super::capture::drop_bases(&self.ctx.client, &self.key).await;
            super::deletion::release_copy(&self.ctx, &pair, &self.key).await;
            return Err(Next::Stop);
        }
        if pair.metadata.deletion_timestamp.is_some() {
            return Err(super::deletion::finalize(&self.ctx, &self.api, &pair, &self.key).await);
        }
        super::deletion::ensure_finalizer(&self.api, &pair, &self.key).await;
        Ok((pair, status))
    }

    async fn ensure_valid(
        &mut self,
        pair: &DRPair,
        status: &DRPairStatus,
    ) -> Result<ValidPairSpec, Next> {
        let sites: Vec<String> = match self.ctx.sites.names().await {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "listing Sites");
                return Err(Next::Wait(RETRY));
            }
        };
        match pair.spec.validate(Some(&sites)) {
            Ok(valid) => Ok(valid),
            Err(errors) => {
                let message = join_errors(&errors);
                self.status(
                    json!({"phase": "Error", "observedGeneration": pair.metadata.generation}),
                    vec![(T::Ready, S::False, R::InvalidSpec, message.clone())],
                )
                .await;
                if status.phase != Some(PairPhase::Error) {
                    self.ctx
                        .status
                        .event(pair, true, "InvalidSpec", "Validate", message)
                        .await;
                }
                Err(Next::SpecChange(pair.metadata.generation))
            }
        }
    }

    /// The pair's epoch, after setting the first one (1, this site active) where none is.
    async fn ensure_initialised(&mut self, status: &DRPairStatus) -> Result<u64, Next> {
        match (&status.active_site, status.epoch) {
            (Some(_), Some(epoch)) => Ok(epoch.0),
            _ => {
                let site = self.ctx.site.clone();
                self.status(
                    json!({"activeSite": site, "epoch": 1, "phase": "Initializing"}),
                    vec![(
                        T::Ready,
                        S::False,
                        R::NoCompleteGeneration,
                        "no complete generation at the destination yet".to_string(),
                    )],
                )
                .await;
                Err(Next::Wait(Duration::ZERO))
            }
        }
    }

    async fn ensure_peer(
        &mut self,
        pair: &DRPair,
        valid: &ValidPairSpec,
        epoch: u64,
    ) -> Result<Peer, Next> {
        let name = if valid.primary_site == self.ctx.site {
            valid.secondary_site.clone()
        } else {
            valid.primary_site.clone()
        };
        let unreachable =
            |message: String| (T::PeerReachable, S::False, R::PeerUnreachable, message);
        let endpoint = match self.ctx.sites.get(&name).await {
            Ok(Some(site)) => site.spec.replicator_endpoint.clone(),
            _ => {
                self.status(
                    json!({}),
                    vec![unreachable(format!("Site {name} not found"))],
                )
                .await;
                return Err(Next::Wait(RETRY));
            }
        };
        let mut client = match self.peer_client.take() {
            Some((cached, client)) if cached == endpoint => client,
            _ => match crate::transport::connect_peer(&endpoint, &self.ctx.tls) {
                Ok(client) => client,
                Err(e) => {
                    self.status(json!({}), vec![unreachable(format!("Site {name}: {e}"))])
                        .await;
                    return Err(Next::Wait(RETRY));
                }
            },
        };
        // What the destination holds: its newest generation, and its epoch.
        let (committed, peer_epoch) = match committed_state(&mut client, &self.key).await {
            Ok(state) => {
                self.peer_client = Some((endpoint.clone(), client.clone()));
                state
            }
            Err(e) => {
                self.status(
                    json!({"phase": "Degraded"}),
                    vec![unreachable(format!(
                        "replicator of site {name} at {endpoint}: {e}"
                    ))],
                )
                .await;
                return Err(Next::Wait(RETRY));
            }
        };
        if peer_epoch > epoch {
            let message = format!("site {name} holds epoch {peer_epoch}, newer than this site's {epoch}: this site was superseded; not shipping");
            self.ctx
                .status
                .event(pair, true, "StaleEpoch", "Sync", message.clone())
                .await;
            self.status(
                json!({}),
                vec![(T::Synced, S::False, R::SyncFailed, message)],
            )
            .await;
            return Err(Next::Wait(RETRY * 6));
        }
        if committed.is_none() {
            self.last_capture = None;
        }
        Ok(Peer {
            name,
            endpoint,
            client,
            committed,
        })
    }

    async fn refresh_lag(&mut self, pair: &DRPair, valid: &ValidPairSpec, status: &DRPairStatus) {
        let schedule = self
            .schedule
            .get_or_insert_with(|| RpoSchedule::new(valid.rpo));
        schedule.set_rpo(valid.rpo);
        // After a restart, until the peer answers, the status says when the newest
        // generation there was captured.
        let Some(capture) = self.last_capture.or(super::pairs::recorded_capture(status)) else {
            return;
        };
        let now = SystemTime::now();
        let lag = now
            .duration_since(capture)
            .unwrap_or_default()
            .as_secs_f64();
        self.ctx.metrics.set_lag(&self.labels, lag);
        let met = schedule.rpo_met(Some(capture), now);
        if !met && !self.violated {
            self.violated = true;
            self.ctx.metrics.rpo_violation(&self.labels);
            self.ctx
                .status
                .event(
                    pair,
                    true,
                    "RPOMissed",
                    "Sync",
                    format!("lag {lag:.0}s exceeds rpo {}s", valid.rpo.as_secs()),
                )
                .await;
        }
        // Paced to the RPO: one status write (a read and a patch) per pair per second made
        // the API server the bottleneck at a hundred pairs (docs/benchmarks.md).
        let step = (valid.rpo.as_secs_f64() / LAG_STEPS_PER_RPO).max(1.0);
        if self.last_met_written != Some(met) || (lag - self.last_lag_written).abs() >= step {
            self.last_lag_written = lag;
            self.last_met_written = Some(met);
            let (cs, reason) = if met {
                (S::True, R::WithinRpo)
            } else {
                (S::False, R::RpoExceeded)
            };
            self.status(
                json!({"currentLagSeconds": (lag * 10.0).round() / 10.0, "rpoMet": met}),
                vec![(
                    T::RpoMet,
                    cs,
                    reason,
                    format!("lag {lag:.0}s, rpo {}s", valid.rpo.as_secs()),
                )],
            )
            .await;
        }
    }

    async fn maybe_sync(
        &mut self,
        pair: &DRPair,
        status: &DRPairStatus,
        valid: &ValidPairSpec,
        epoch: u64,
        peer: &mut Peer,
    ) -> Next {
        let now = SystemTime::now();
        let requested = pair.annotations().get(SYNC_REQUEST_ANNOTATION).cloned();
        let request_pending = requested.is_some() && requested != status.last_sync_request;
        let Some(schedule) = self.schedule.as_mut() else {
            return Next::Wait(TICK);
        };
        let due = schedule.next_start(self.last_capture, now);
        // While a Migration owns the pair, only its requested (final) sync runs.
        let migrating = status.phase == Some(PairPhase::Migrating);
        if !request_pending && (migrating || now < due || now < self.retry_at) {
            return Next::Wait(TICK);
        }
        if let Some(next) = self.refuse_overlap(pair).await {
            return next;
        }
        let generation = peer
            .committed
            .unwrap_or(0)
            .max(status.generation.map(|g| g.0).unwrap_or(0))
            + 1;
        let span = tracing::info_span!("sync", pair = %self.key, generation, epoch);
        let started = SystemTime::now();
        let result = tracing::Instrument::instrument(
            sync_once(
                &self.ctx,
                &mut peer.client,
                pair,
                &self.key,
                valid,
                generation,
                epoch,
            ),
            span,
        )
        .await;
        let (peer_name, endpoint) = (peer.name.clone(), peer.endpoint.clone());
        match result {
            Ok((report, capture_time)) => {
                self.violated = false;
                self.last_capture = Some(capture_time);
                let duration = SystemTime::now()
                    .duration_since(started)
                    .unwrap_or_default();
                if let Some(schedule) = self.schedule.as_mut() {
                    schedule.record(duration);
                }
                let blocks: u64 = report.volumes.values().map(|v| v.blocks_scanned).sum();
                self.ctx.metrics.observe_sync(
                    &self.labels,
                    duration.as_secs_f64(),
                    report.bytes_shipped,
                    blocks,
                );
                let lag = SystemTime::now()
                    .duration_since(capture_time)
                    .unwrap_or_default()
                    .as_secs_f64();
                self.last_lag_written = lag;
                let shipped = report.bytes_shipped + report.base_index_bytes;
                let mut fields = json!({
                    "generation": generation,
                    "lastSyncTime": rfc3339(SystemTime::now()),
                    "lastCaptureTime": rfc3339(capture_time),
                    "lastSyncDurationSeconds": (duration.as_secs_f64() * 1000.0).round() / 1000.0,
                    "lastSyncBytes": shipped,
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
                let of_index = if report.base_index_bytes > 0 {
                    format!(
                        " (of which {} bytes of {peer_name}'s index of its diverged seed)",
                        report.base_index_bytes
                    )
                } else {
                    String::new()
                };
                let rpo = valid.rpo.as_secs();
                let mut conditions = vec![
                    (T::Synced, S::True, R::SyncSucceeded, format!("generation {generation} committed at {peer_name}: {shipped} bytes in {:.1}s{of_index}", duration.as_secs_f64())),
                    (T::PeerReachable, S::True, R::PeerResponding, format!("replicator of site {peer_name} at {endpoint}")),
                    (T::RpoMet, S::True, R::WithinRpo, format!("lag {lag:.0}s, rpo {rpo}s")),
                    (T::Ready, S::True, R::Protected, format!("generation {generation} is complete at {peer_name}")),
                ];
                if let Some(tracking) = self.changed_block_tracking(pair, &report).await {
                    conditions.push(tracking);
                }
                self.status(fields, conditions).await;
                tracing::info!(pair = %self.key, generation, bytes = report.bytes_shipped, seconds = duration.as_secs_f64(), "generation shipped");
            }
            Err(message) => {
                // Whatever broke, the next tick connects afresh.
                self.peer_client = None;
                self.retry_at = SystemTime::now() + RETRY;
                tracing::warn!(pair = %self.key, generation, error = %message, "sync failed");
                self.ctx
                    .status
                    .event(pair, true, "SyncFailed", "Sync", message.clone())
                    .await;
                let phase = if migrating {
                    json!({})
                } else if peer.committed.is_some() {
                    json!({"phase": "Degraded"})
                } else {
                    json!({"phase": "Initializing"})
                };
                self.status(phase, vec![(T::Synced, S::False, R::SyncFailed, message)])
                    .await;
            }
        }
        Next::Wait(Duration::ZERO)
    }

    /// Refuses to sync a pair that selects objects an earlier pair of the namespace protects
    /// (`Ready=False`, `OverlapsPair`, an Event); checked before each sync, as either pair's
    /// selector or the namespace's objects may change.
    async fn refuse_overlap(&mut self, pair: &DRPair) -> Option<Next> {
        let pairs = match self.api.list(&Default::default()).await {
            Ok(list) => list.items,
            Err(e) => {
                tracing::warn!(pair = %self.key, error = %e, "listing DRPairs for the overlap check");
                return None;
            }
        };
        // Only this pair and the ones created before it decide its verdict.
        let order = |p: &DRPair| {
            (
                p.metadata.creation_timestamp.clone().map(|t| t.0),
                p.name_any(),
            )
        };
        let mine = order(pair);
        let mut fingerprint: PairsFingerprint = pairs
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && order(p) <= mine)
            .map(|p| (p.uid().unwrap_or_default(), p.metadata.generation))
            .collect();
        fingerprint.sort();
        if let Some((clear, at)) = &self.overlap_clear {
            if *clear == fingerprint && at.elapsed() < OVERLAP_RECHECK {
                return None;
            }
        }
        let (other, shared) = match overlap(&self.ctx.client, pair).await {
            Ok(None) => {
                self.overlap_clear = Some((fingerprint, std::time::Instant::now()));
                return None;
            }
            Ok(Some(found)) => {
                self.overlap_clear = None;
                found
            }
            Err(e) => {
                // The sync's own capture reports a failing listing; do not hold it here.
                tracing::warn!(pair = %self.key, error = %e, "checking for overlapping pairs");
                return None;
            }
        };
        let message = format!(
            "selects what DRPair {other} (created first) already protects: {}; this pair does not replicate until they no longer overlap",
            shared.join(", ")
        );
        let reported = pair
            .status
            .as_ref()
            .and_then(|s| T::Ready.find(&s.conditions))
            .is_some_and(|c| c.reason == R::OverlapsPair.as_str());
        if !reported {
            self.ctx
                .status
                .event(pair, true, "OverlapsPair", "Validate", message.clone())
                .await;
        }
        self.status(
            json!({"phase": "Error"}),
            vec![(T::Ready, S::False, R::OverlapsPair, message)],
        )
        .await;
        Some(Next::Wait(RETRY * 6))
    }

    /// Writes status (fields and conditions); a failure is logged, counted and kept for
    /// [`Worker::flush_status`].
    async fn status(&mut self, fields: Value, conditions: Vec<ConditionSet>) {
        let (mut all_fields, mut all_conditions) = self.unwritten.take().unwrap_or_default();
        if let Value::Object(fields) = fields {
            all_fields.extend(fields);
        }
        for set in conditions {
            all_conditions.retain(|(t, ..)| *t != set.0);
            all_conditions.push(set);
        }
        let result = self
            .ctx
            .status
            .apply(
                &self.key.namespace,
                &self.key.name,
                Value::Object(all_fields.clone()),
                &all_conditions,
            )
            .await;
        if let Err(e) = result {
            tracing::warn!(pair = %self.key, error = %e, "writing DRPair status; retrying next tick");
            self.ctx.metrics.status_write_failed(&self.labels);
            self.unwritten = Some((all_fields, all_conditions));
        }
    }

    /// Sends a status write that failed earlier, if any.
    async fn flush_status(&mut self) {
        if self.unwritten.is_some() {
            self.status(json!({}), Vec::new()).await;
        }
    }

    async fn wait_for_spec_change(&self, generation: Option<i64>) {
        let changed = move |p: Option<&DRPair>| {
            p.is_none_or(|p| {
                p.metadata.generation != generation || p.metadata.deletion_timestamp.is_some()
            })
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(30),
            kube::runtime::wait::await_condition(self.api.clone(), &self.key.name, changed),
        )
        .await;
    }
}

/// The first DRPair of `pair`'s namespace created before it (by `creationTimestamp`, then
/// name) that protects some of the same objects or PVCs, with those objects (`Kind ns/name`).
///
/// # Errors
/// A capture's listing error, as text.
async fn overlap(
    client: &kube::Client,
    pair: &DRPair,
) -> Result<Option<(String, Vec<String>)>, String> {
    let namespace = pair.namespace().unwrap_or_default();
    let order = |p: &DRPair| {
        (
            p.metadata.creation_timestamp.clone().map(|t| t.0),
            p.name_any(),
        )
    };
    let mine_order = order(pair);
    let pairs: Api<DRPair> = Api::namespaced(client.clone(), &namespace);
    let earlier: Vec<DRPair> = pairs
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && order(p) < mine_order)
        .collect();
    if earlier.is_empty() {
        return Ok(None);
    }
    let protected = |p: &DRPair| {
        let p = p.clone();
        let namespace = namespace.clone();
        async move {
            let app = ferry_manifests::capture(client, &namespace, &p.spec.selector)
                .await
                .map_err(|e| e.to_string())?;
            let claims = p.spec.volumes.clone().unwrap_or(app.pvcs);
            let mut keys: std::collections::BTreeSet<String> = app
                .objects
                .iter()
                .map(|o| ferry_manifests::ObjectKey::of(o).to_string())
                .collect();
            keys.extend(
                claims
                    .iter()
                    .map(|c| format!("PersistentVolumeClaim {namespace}/{c}")),
            );
            Ok::<_, String>(keys)
        }
    };
    let mine = protected(pair).await?;
    for other in &earlier {
        let theirs = protected(other).await?;
        let shared: Vec<String> = mine.intersection(&theirs).cloned().collect();
        if !shared.is_empty() {
            return Ok(Some((other.name_any(), shared)));
        }
    }
    Ok(None)
}

impl Worker {
    /// The `ChangedBlockTracking` condition for a shipped generation, with its metrics and, when
    /// a volume newly falls back to a full scan, a `FullScan` Event. `None` when no Block
    /// volume had a base to compare with (Filesystem volumes, a first sync).
    async fn changed_block_tracking(
        &self,
        pair: &DRPair,
        report: &crate::source::ShipReport,
    ) -> Option<(T, S, R, String)> {
        use crate::source::ReadMode;
        let mut read = Vec::new();
        let mut whole = Vec::new();
        for (volume, v) in &report.volumes {
            match &v.read_mode {
                ReadMode::Whole => {}
                ReadMode::ChangedBlocks => {
                    self.ctx.metrics.changed_blocks_read(&self.labels);
                    let bytes_read = v.bytes_scanned.saturating_sub(v.bytes_unread);
                    read.push(format!(
                        "{volume}: {bytes_read} of {} bytes read",
                        v.bytes_scanned
                    ));
                }
                ReadMode::FullScan(reason) => {
                    self.ctx.metrics.full_scan(&self.labels, reason.code);
                    whole.push(format!("{volume} read whole: {}", reason.message));
                }
            }
        }
        if whole.is_empty() && read.is_empty() {
            return None;
        }
        if whole.is_empty() {
            return Some((
                T::ChangedBlockTracking,
                S::True,
                R::ChangedBlocksRead,
                format!("changed block tracking: {}", read.join("; ")),
            ));
        }
        let reasons = whole.join("; ");
        let mut message = reasons.clone();
        if !read.is_empty() {
            message.push_str(&format!("; changed block tracking: {}", read.join("; ")));
        }
        // An Event when the reasons are new, not on every sync of a driver without the service
        // (the tracked volumes' byte counts change every sync).
        let reported = pair.status.as_ref().is_some_and(|s| {
            T::ChangedBlockTracking
                .find(&s.conditions)
                .is_some_and(|c| {
                    c.message == reasons || c.message.starts_with(&format!("{reasons}; "))
                })
        });
        if !reported {
            self.ctx
                .status
                .event(pair, true, "FullScan", "Sync", message.clone())
                .await;
        }
        Some((T::ChangedBlockTracking, S::False, R::FullScan, message))
    }
}
