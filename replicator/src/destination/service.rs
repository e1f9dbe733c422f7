//! The destination's `Replication` gRPC service: stages a generation, verifies it and commits
//! it atomically.
//!
//! Per pair, one sync is live at a time. `Begin` checks the epoch and the base, resets staging
//! if a previous sync died half-way, and opens one mover per volume. `Push` hands each chunk to
//! its volume's mover and acknowledges it (or asks for it again when its checksum fails).
//! Each volume has its own lock, so the volumes of a generation (and other pairs) stage in
//! parallel; within a volume, chunks apply strictly in `seq` order.
//! `Commit` finishes and verifies every volume, takes the point-in-time copies, stores the
//! manifests and then writes the journal: that flushed write is the commit point. A crash
//! anywhere before it leaves the previous generation as the newest, untouched; the staging
//! copies are reset from it on the next `Begin`. `BaseIndex` scans a copy this site holds
//! but never received whole (a diverged seed), so the source can plan its delta against it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_schemas::drpair::DeletionPolicy;
use ferry_schemas::proto::replication::{
    chunk_ack, replication_server::Replication, BaseIndexRequest, BaseIndexResponse, BeginRequest,
    BeginResponse, ChunkAck, ChunkMessage, CommitRequest, CommitResponse, ReleasePolicy,
    ReleaseRequest, ReleaseResponse, StateRequest, StateResponse, SyncHeader, VolumeResume,
};
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::journal::{CommittedGeneration, Journal, PairRecord};
use super::replicas::{PairKey, ReplicaStore, VolumeSpec};
use crate::delta::{Generation, StreamId, VolumeDigest};
use crate::mover::{ApplyOutcome, MoverSession};

/// Why the destination refused or failed a sync: the reason is a stable CamelCase word used
/// for Events and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// `StaleEpoch`, `NotDemoted`, `ChunkCorrupt`, `BaseMismatch`, `StagingFailed` or
    /// `CommitFailed`.
    pub reason: &'static str,
    /// One line naming the cause.
    pub message: String,
}

/// What the destination tells the rest of its site: Events, status and metrics. All methods
/// have no-op defaults.
#[tonic::async_trait]
pub trait DestinationObserver: Send + Sync + 'static {
    /// The pair's epoch and active site as this site records them (its DRPair status), if
    /// any: a sync under an older epoch is refused even if the journal never saw the newer
    /// one, and so is a sync at this site's epoch from a site other than its active one.
    async fn site_view(&self, _pair: &PairKey) -> Option<SiteView> {
        None
    }
    /// A sync was refused or failed.
    async fn rejected(&self, _pair: &PairKey, _rejection: &Rejection) {}
    /// A generation committed, shipped by `source_site` (the active site of its epoch);
    /// `pair_json` is the DRPair as the source declared it and `manifests_json` the
    /// generation's manifests.
    async fn committed(
        &self,
        _pair: &PairKey,
        _source_site: &str,
        _generation: &CommittedGeneration,
        _pair_json: &[u8],
        _manifests_json: &[u8],
    ) {
    }
    /// The pair was deleted at its active site and this site's copy is being released under
    /// `release.policy` (called before the store removes anything). With `Retain` the site
    /// marks its DRPair `Detached`; with `Delete` it removes what else it made (its DRPair
    /// copy, a parked standby) and returns those objects as `Kind name`.
    ///
    /// # Errors
    /// A message naming the object that could not be updated or removed; the source keeps
    /// its finalizer and asks again.
    async fn released(&self, _pair: &PairKey, _release: &Release) -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }
}

/// A pair released by its active site (the `Release` RPC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The site the pair was deleted at.
    pub source_site: String,
    /// What happens to the copy here.
    pub policy: DeletionPolicy,
    /// Why, for conditions and Events ("DRPair deleted", "namespace deleted").
    pub reason: String,
    /// Generations still held here (empty after `Delete`), newest first.
    pub kept: Vec<u64>,
}

/// What a destination's site records of a pair: its epoch and the site active at it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteView {
    /// The epoch in the site's DRPair status (0 when none).
    pub epoch: u64,
    /// The active site in that status, if set.
    pub active_site: Option<String>,
    /// Whether that active site is this (the destination's) site.
    pub active_here: bool,
}

/// An observer that does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl DestinationObserver for NoObserver {}

struct LiveVolume {
    spec: VolumeSpec,
    session: MoverSession,
    next_seq: u64,
    /// Set once the sync this volume belongs to was committed or abandoned: a chunk that was
    /// already on its way must not reach the mover any more.
    retired: bool,
}

struct LiveSync {
    generation: u64,
    epoch: u64,
    /// Locked one by one: a chunk holds only its own volume while the mover applies it.
    volumes: BTreeMap<String, Arc<Mutex<LiveVolume>>>,
    pair_json: Vec<u8>,
    chunks_rejected: Arc<AtomicU64>,
}

impl LiveSync {
    /// Ends the sync: waits for any chunk being applied, then refuses every later one.
    async fn retire(&self) {
        for volume in self.volumes.values() {
            volume.lock().await.retired = true;
        }
    }
}

/// The destination service. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Destination {
    journal: Journal,
    replicas: Arc<dyn ReplicaStore>,
    observer: Arc<dyn DestinationObserver>,
    retain: usize,
    live: Arc<Mutex<HashMap<PairKey, LiveSync>>>,
    hashes: Option<crate::delta::HashStore>,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("journal", &self.journal)
            .field("retain", &self.retain)
            .finish_non_exhaustive()
    }
}

fn pair_of(header: Option<&SyncHeader>) -> Result<(PairKey, &SyncHeader), Status> {
    let header = header.ok_or_else(|| Status::invalid_argument("header: required"))?;
    let pair = header
        .pair
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("header.pair: required"))?;
    if pair.namespace.is_empty() || pair.name.is_empty() {
        return Err(Status::invalid_argument(
            "header.pair: namespace and name are required",
        ));
    }
    Ok((
        PairKey {
            namespace: pair.namespace.clone(),
            name: pair.name.clone(),
        },
        header,
    ))
}

fn internal(context: &str, error: impl std::fmt::Display) -> Status {
    Status::internal(format!("{context}: {error}"))
}

impl Destination {
    /// A destination journaling in `journal`, keeping replicas in `replicas` and the newest
    /// `retain` (≥ 1) generations per pair.
    pub fn new(
        journal: Journal,
        replicas: Arc<dyn ReplicaStore>,
        observer: Arc<dyn DestinationObserver>,
        retain: usize,
    ) -> Self {
        Self {
            journal,
            replicas,
            observer,
            retain: retain.max(1),
            live: Arc::default(),
            hashes: None,
        }
    }

    /// Also keeps, per volume, the block index of each committed generation in `hashes` (the
    /// site's source-side store), so that when the app later runs here and ships back, its
    /// first sync is a delta against the generation both sites hold.
    pub fn with_hashes(mut self, hashes: crate::delta::HashStore) -> Self {
        self.hashes = Some(hashes);
        self
    }

    /// Adopts the pair's seed (see [`ReplicaStore::seed`]) when it is newer than anything
    /// committed: it becomes the newest committed generation.
    async fn adopt_seed(&self, pair: &PairKey, record: &mut PairRecord) -> Result<(), Status> {
        let Some(seed) = self
            .replicas
            .seed(pair)
            .await
            .map_err(|e| internal("looking for a seed", e))?
        else {
            return Ok(());
        };
        let generation = seed.generation;
        if record.newest().is_some_and(|g| g.generation >= generation) {
            return Ok(());
        }
        tracing::info!(pair = %pair, generation, diverged = seed.diverged, "adopting the seed of this site's own volumes");
        record.committed.insert(
            0,
            CommittedGeneration {
                generation,
                epoch: record.epoch,
                capture_time_unix_seconds: 0.0,
                snapshots: seed.snapshots,
                diverged: seed.diverged,
            },
        );
        record.committed.truncate(self.retain);
        self.journal
            .store(&pair.to_string(), record)
            .map_err(|e| internal("journal", e))
    }

    /// The journal record of `pair` (for status and tests).
    ///
    /// # Errors
    /// A journal error as text.
    pub fn record(&self, pair: &PairKey) -> Result<PairRecord, String> {
        self.journal
            .load(&pair.to_string())
            .map_err(|e| e.to_string())
    }

    async fn reject(&self, pair: &PairKey, reason: &'static str, status: Status) -> Status {
        let rejection = Rejection {
            reason,
            message: status.message().to_string(),
        };
        tracing::warn!(pair = %pair, reason, message = %rejection.message, "sync rejected");
        self.observer.rejected(pair, &rejection).await;
        status
    }

    /// Refuses a sync under `header`'s epoch when it is older than what the journal or the
    /// site knows, or when it is the site's epoch but the site records another site as active
    /// at it: only the active site of an epoch ships under it (a returning old primary that
    /// learned the epoch number but not its demotion must not overwrite the new primary).
    async fn check_epoch(
        &self,
        pair: &PairKey,
        record: &PairRecord,
        header: &SyncHeader,
    ) -> Result<(), Status> {
        let site = self.observer.site_view(pair).await.unwrap_or_default();
        let known = record.epoch.max(site.epoch);
        let epoch = header.epoch;
        if epoch < known {
            let status = Status::failed_precondition(format!(
                "stale epoch {epoch} for pair {pair}: this site knows epoch {known}; \
                 the sender is no longer the active site"
            ));
            return Err(self.reject(pair, "StaleEpoch", status).await);
        }
        if site.active_here && epoch > site.epoch {
            // An old primary back after a failover: until its controller has demoted it (app
            // stopped, volumes kept as a seed), nothing may overwrite them.
            let status = Status::unavailable(format!(
                "this site still records itself as the active site of pair {pair} at epoch {}; \
                 it accepts epoch {epoch} once demoted",
                site.epoch
            ));
            return Err(self.reject(pair, "NotDemoted", status).await);
        }
        if let Some(active) = site
            .active_site
            .filter(|a| epoch == site.epoch && *a != header.source_site)
        {
            let status = Status::failed_precondition(format!(
                "stale epoch {epoch} for pair {pair}: site {active} is the active site at epoch \
                 {epoch}, not the sender {}",
                header.source_site
            ));
            return Err(self.reject(pair, "StaleEpoch", status).await);
        }
        Ok(())
    }

    /// The journal record of `pair` once `header`'s epoch is admitted and any seed adopted.
    async fn admit(&self, pair: &PairKey, header: &SyncHeader) -> Result<PairRecord, Status> {
        let mut record = self
            .journal
            .load(&pair.to_string())
            .map_err(|e| internal("journal", e))?;
        self.check_epoch(pair, &record, header).await?;
        self.adopt_seed(pair, &mut record).await?;
        Ok(record)
    }

    /// Scans one volume of the newest committed generation's copy through a mover on the
    /// staging volume (reset to that copy) and returns its block index: what a source plans
    /// against when the copy is a diverged seed. Any live sync of the pair is abandoned.
    async fn scan_base(&self, request: BaseIndexRequest) -> Result<BaseIndexResponse, Status> {
        let (pair, header) = pair_of(request.header.as_ref())?;
        let volume = request
            .volume
            .ok_or_else(|| Status::invalid_argument("volume: required"))?;
        let record = self.admit(&pair, header).await?;
        let newest = record.newest().cloned().ok_or_else(|| {
            Status::failed_precondition(format!("pair {pair} has no committed generation here"))
        })?;
        let copy = newest.snapshots.get(&volume.volume).ok_or_else(|| {
            Status::failed_precondition(format!(
                "volume {} is not in generation {} of pair {pair}",
                volume.volume, newest.generation
            ))
        })?;
        self.abandon(&pair).await;
        self.replicas
            .release(&pair)
            .await
            .map_err(|e| internal("releasing movers", e))?;
        let spec = VolumeSpec {
            volume: volume.volume.clone(),
            block: volume.block,
            capacity: volume.capacity.clone(),
        };
        let mut session = self
            .replicas
            .stage(&pair, &spec, Some(copy), true)
            .await
            .map_err(|e| internal("staging the base copy", e))?;
        let index = session
            .index(Generation(newest.generation), volume.block)
            .await
            .map_err(|e| internal(&format!("scanning volume {}", volume.volume), e))?;
        drop(session);
        self.replicas
            .release(&pair)
            .await
            .map_err(|e| internal("releasing movers", e))?;
        tracing::info!(pair = %pair, volume = %volume.volume, generation = newest.generation, "scanned the base copy for the source");
        Ok(BaseIndexResponse {
            generation: newest.generation,
            index: postcard::to_stdvec(&index).map_err(|e| internal("encoding the index", e))?,
        })
    }

    /// Retains or deletes this site's copy of a pair its active site deleted. Refused under
    /// an epoch older than this site knows (a superseded site cannot remove the copy of the
    /// site that replaced it) and at the pair's active site. Idempotent.
    async fn release_pair(&self, request: ReleaseRequest) -> Result<ReleaseResponse, Status> {
        let pair = request
            .pair
            .ok_or_else(|| Status::invalid_argument("pair: required"))?;
        let key = PairKey {
            namespace: pair.namespace,
            name: pair.name,
        };
        if request.source_site.is_empty() {
            return Err(Status::invalid_argument("source_site: required"));
        }
        let policy = match ReleasePolicy::try_from(request.policy) {
            Ok(ReleasePolicy::Retain) => DeletionPolicy::Retain,
            Ok(ReleasePolicy::Delete) => DeletionPolicy::Delete,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "policy: unknown value {}",
                    request.policy
                )))
            }
        };
        let record = self
            .journal
            .load(&key.to_string())
            .map_err(|e| internal("journal", e))?;
        let site = self.observer.site_view(&key).await.unwrap_or_default();
        let known = record.epoch.max(site.epoch);
        if request.epoch < known {
            return Err(Status::failed_precondition(format!(
                "stale epoch {} for pair {key}: this site knows epoch {known}; site {} is no longer the active site and cannot release this copy",
                request.epoch, request.source_site
            )));
        }
        if site.active_here && site.epoch >= request.epoch {
            return Err(Status::failed_precondition(format!(
                "pair {key} is active at this site (epoch {}); site {} cannot release it",
                site.epoch, request.source_site
            )));
        }
        // A sync that was under way is abandoned: nothing more arrives for the pair.
        self.abandon(&key).await;
        self.replicas
            .release(&key)
            .await
            .map_err(|e| internal("stopping movers", e))?;
        let kept: Vec<u64> = match policy {
            DeletionPolicy::Retain => record.committed.iter().map(|g| g.generation).collect(),
            DeletionPolicy::Delete => Vec::new(),
        };
        let release = Release {
            source_site: request.source_site.clone(),
            policy,
            reason: request.reason.clone(),
            kept: kept.clone(),
        };
        // The site's part first (its DRPair copy), then the store's: a failure anywhere
        // leaves the journal as it was, so the source's retry finds the pair again.
        let mut removed = self
            .observer
            .released(&key, &release)
            .await
            .map_err(Status::internal)?;
        if policy == DeletionPolicy::Delete {
            removed.extend(
                self.replicas
                    .remove_pair(&key)
                    .await
                    .map_err(|e| internal("removing the replicas", e))?,
            );
            if let Some(hashes) = &self.hashes {
                hashes
                    .remove_pair(&key.to_string())
                    .map_err(|e| internal("removing block indexes", e))?;
            }
            self.journal
                .remove(&key.to_string())
                .map_err(|e| internal("journal", e))?;
        }
        tracing::info!(pair = %key, from = %request.source_site, policy = %policy, kept = ?kept, removed = removed.len(), "pair released by its active site");
        Ok(ReleaseResponse {
            generations_kept: kept,
            removed,
        })
    }

    async fn begin_sync(&self, request: BeginRequest) -> Result<BeginResponse, Status> {
        let (pair, header) = pair_of(request.header.as_ref())?;
        let key = pair.to_string();
        let mut record = self.admit(&pair, header).await?;
        let committed = record.newest().map(|g| g.generation);
        if committed.is_some_and(|c| header.generation <= c) {
            return Err(Status::failed_precondition(format!(
                "generation {} of pair {pair} is not after the committed generation {}",
                header.generation,
                committed.unwrap_or(0)
            )));
        }
        for volume in &request.volumes {
            if volume.base_generation.is_some() && volume.base_generation != committed {
                let status = Status::failed_precondition(format!(
                    "volume {}: base generation {:?} is not the committed generation {:?}; \
                     send a full copy",
                    volume.volume, volume.base_generation, committed
                ));
                return Err(self.reject(&pair, "BaseMismatch", status).await);
            }
        }
        let mut live = self.live.lock().await;
        if let Some(sync) = live.get(&pair) {
            if sync.generation == header.generation && sync.epoch == header.epoch {
                // A reconnect: resume where each volume's stream stands.
                let volumes: Vec<_> = sync.volumes.values().cloned().collect();
                drop(live);
                let mut resume = Vec::with_capacity(volumes.len());
                for volume in volumes {
                    let volume = volume.lock().await;
                    resume.push(VolumeResume {
                        volume: volume.spec.volume.clone(),
                        next_seq: volume.next_seq,
                    });
                }
                return Ok(BeginResponse {
                    volumes: resume,
                    committed_generation: committed,
                });
            }
        }
        if request.resume_only {
            return Err(Status::failed_precondition(format!(
                "no live sync of generation {} of pair {pair} to resume: start it again",
                header.generation
            )));
        }
        // Any other live sync of this pair is abandoned; its staging is torn.
        let abandoned = live.remove(&pair);
        drop(live);
        let torn = abandoned.is_some() || record.staging.is_some();
        if let Some(sync) = abandoned {
            sync.retire().await;
        }
        self.replicas
            .release(&pair)
            .await
            .map_err(|e| internal("releasing movers", e))?;
        if header.epoch > record.epoch {
            record.epoch = header.epoch;
        }
        record.staging = Some(header.generation);
        self.journal
            .store(&key, &record)
            .map_err(|e| internal("journal", e))?;
        let keep: Vec<u64> = record.committed.iter().map(|g| g.generation).collect();
        self.replicas
            .prune(&pair, &keep)
            .await
            .map_err(|e| internal("pruning uncommitted copies", e))?;
        let mut volumes = BTreeMap::new();
        for volume in request.volumes {
            let spec = VolumeSpec {
                volume: volume.volume.clone(),
                block: volume.block,
                capacity: volume.capacity.clone(),
            };
            let base_copy = record
                .newest()
                .filter(|_| volume.base_generation.is_some())
                .and_then(|g| g.snapshots.get(&volume.volume))
                .map(String::as_str);
            // A full copy starts from empty; a delta from the committed copy.
            let reset = torn || volume.base_generation.is_none();
            let mut session = match self.replicas.stage(&pair, &spec, base_copy, reset).await {
                Ok(session) => session,
                Err(e) => {
                    let status = Status::unavailable(format!(
                        "staging volume {} of pair {pair}: {e}",
                        volume.volume
                    ));
                    return Err(self.reject(&pair, "StagingFailed", status).await);
                }
            };
            let stream = StreamId {
                base: volume.base_generation.map(Generation),
                generation: Generation(header.generation),
            };
            session
                .open(stream, volume.block)
                .await
                .map_err(|e| internal("opening the staging volume", e))?;
            volumes.insert(
                volume.volume.clone(),
                Arc::new(Mutex::new(LiveVolume {
                    spec,
                    session,
                    next_seq: 0,
                    retired: false,
                })),
            );
        }
        let resume = volumes
            .keys()
            .map(|volume| VolumeResume {
                volume: volume.clone(),
                next_seq: 0,
            })
            .collect();
        let replaced = self.live.lock().await.insert(
            pair,
            LiveSync {
                generation: header.generation,
                epoch: header.epoch,
                volumes,
                pair_json: request.pair_json,
                chunks_rejected: Arc::default(),
            },
        );
        if let Some(replaced) = replaced {
            // A concurrent Begin of the same pair staged meanwhile: it is superseded.
            replaced.retire().await;
        }
        tracing::debug!(generation = header.generation, "staging ready");
        Ok(BeginResponse {
            volumes: resume,
            committed_generation: committed,
        })
    }

    async fn push_chunk(&self, message: ChunkMessage) -> Result<ChunkAck, Status> {
        let (pair, header) = pair_of(message.header.as_ref())?;
        let live = self.live.lock().await;
        let Some(sync) = live.get(&pair) else {
            return Err(Status::failed_precondition(format!(
                "no sync of pair {pair} is in progress: call Begin first"
            )));
        };
        if sync.generation != header.generation || sync.epoch != header.epoch {
            return Err(Status::failed_precondition(format!(
                "chunk for generation {} epoch {} but the live sync of {pair} is generation {} \
                 epoch {}",
                header.generation, header.epoch, sync.generation, sync.epoch
            )));
        }
        let Some(volume) = sync.volumes.get(&message.volume).cloned() else {
            return Err(Status::invalid_argument(format!(
                "volume {:?} is not part of generation {}",
                message.volume, sync.generation
            )));
        };
        let rejected = sync.chunks_rejected.clone();
        // Only this volume stays locked while its mover applies the chunk.
        drop(live);
        let mut volume = volume.lock().await;
        if volume.retired {
            return Err(Status::failed_precondition(format!(
                "the sync of generation {} of pair {pair} has ended",
                header.generation
            )));
        }
        let ack = |result| ChunkAck {
            volume: message.volume.clone(),
            result: Some(result),
        };
        if message.seq < volume.next_seq {
            // Already staged (a resumed stream re-sent it): nothing to do.
            return Ok(ack(chunk_ack::Result::Applied(message.seq)));
        }
        if message.seq > volume.next_seq {
            return Ok(ack(chunk_ack::Result::ResendFrom(volume.next_seq)));
        }
        let ChunkMessage {
            volume: name,
            chunk,
            ..
        } = message;
        let ack = |result| ChunkAck {
            volume: name.clone(),
            result: Some(result),
        };
        let expected = volume.next_seq;
        match volume.session.apply(chunk).await {
            Ok(ApplyOutcome::Applied(seq)) => {
                volume.next_seq = seq + 1;
                Ok(ack(chunk_ack::Result::Applied(seq)))
            }
            // The chunk's own seq may be what was damaged: ask for the one expected.
            Ok(ApplyOutcome::Corrupt(_)) => {
                let seq = expected;
                drop(volume);
                rejected.fetch_add(1, Ordering::Relaxed);
                let rejection = Rejection {
                    reason: "ChunkCorrupt",
                    message: format!(
                        "chunk {seq} of volume {name} failed its checksum; re-requested"
                    ),
                };
                tracing::warn!(pair = %pair, message = %rejection.message, "corrupt chunk");
                self.observer.rejected(&pair, &rejection).await;
                Ok(ack(chunk_ack::Result::ResendFrom(seq)))
            }
            Err(e) => {
                // The staged volume is torn: the whole sync must start again from its base.
                volume.retired = true;
                drop(volume);
                self.abandon_generation(&pair, header.generation, header.epoch)
                    .await;
                let status =
                    Status::internal(format!("applying to volume {name} of pair {pair}: {e}"));
                Err(self.reject(&pair, "StagingFailed", status).await)
            }
        }
    }

    /// Ends any live sync of `pair`.
    async fn abandon(&self, pair: &PairKey) {
        let sync = self.live.lock().await.remove(pair);
        if let Some(sync) = sync {
            sync.retire().await;
        }
    }

    /// Ends the live sync of `pair` if it is still of `generation` at `epoch` (a newer Begin
    /// may have replaced it meanwhile).
    async fn abandon_generation(&self, pair: &PairKey, generation: u64, epoch: u64) {
        let mut live = self.live.lock().await;
        if live
            .get(pair)
            .is_some_and(|s| s.generation == generation && s.epoch == epoch)
        {
            let sync = live.remove(pair);
            drop(live);
            if let Some(sync) = sync {
                sync.retire().await;
            }
        }
    }

    async fn commit_sync(&self, request: CommitRequest) -> Result<CommitResponse, Status> {
        let (pair, header) = pair_of(request.header.as_ref())?;
        let key = pair.to_string();
        let sync = {
            let mut live = self.live.lock().await;
            let Some(sync) = live.get(&pair) else {
                return Err(Status::failed_precondition(format!(
                    "no sync of pair {pair} is in progress"
                )));
            };
            // A stale commit leaves the live sync alone.
            if sync.generation != header.generation || sync.epoch != header.epoch {
                return Err(Status::failed_precondition(format!(
                    "commit of generation {} does not match the live sync (generation {})",
                    header.generation, sync.generation
                )));
            }
            live.remove(&pair).expect("present above")
        };
        // Waits for chunks still being applied; none is accepted after this.
        sync.retire().await;
        let mut record = self
            .journal
            .load(&key)
            .map_err(|e| internal("journal", e))?;
        // The epoch may have moved on while the generation streamed.
        self.check_epoch(&pair, &record, header).await?;
        let digests: BTreeMap<&str, &[u8]> = request
            .volumes
            .iter()
            .map(|v| (v.volume.as_str(), v.digest.as_slice()))
            .collect();
        let mut indexes = BTreeMap::new();
        let mut verified = BTreeMap::new();
        let mut specs: Vec<VolumeSpec> = Vec::with_capacity(sync.volumes.len());
        for (name, volume) in &sync.volumes {
            let mut volume = volume.lock().await;
            specs.push(volume.spec.clone());
            let digest: [u8; 32] = digests
                .get(name.as_str())
                .and_then(|d| (*d).try_into().ok())
                .ok_or_else(|| {
                    Status::invalid_argument(format!("volumes: no 32-byte digest for {name}"))
                })?;
            verified.insert(name.clone(), VolumeDigest(digest));
            match volume.session.finish(VolumeDigest(digest)).await {
                Ok(Some(index)) => {
                    indexes.insert(name.clone(), index);
                }
                Ok(None) => {}
                Err(e) => {
                    let status = Status::data_loss(format!(
                        "volume {name} of pair {pair} did not verify: {e}; generation {} discarded",
                        header.generation
                    ));
                    return Err(self.reject(&pair, "CommitFailed", status).await);
                }
            }
        }
        tracing::debug!(pair = %pair, generation = header.generation, "volumes verified");
        drop(sync.volumes);
        let fail = |e: super::replicas::ReplicaError| {
            Status::unavailable(format!(
                "committing generation {} of pair {pair}: {e}",
                header.generation
            ))
        };
        self.replicas.release(&pair).await.map_err(fail)?;
        let snapshots = self
            .replicas
            .snapshot(&pair, header.generation, &specs, &verified)
            .await
            .map_err(fail)?;
        tracing::debug!(pair = %pair, generation = header.generation, "copies taken");
        self.replicas
            .store_manifests(&pair, header.generation, &request.manifests_json)
            .await
            .map_err(fail)?;
        let generation = CommittedGeneration {
            generation: header.generation,
            epoch: header.epoch,
            capture_time_unix_seconds: request.capture_time_unix_seconds,
            snapshots,
            diverged: false,
        };
        record.committed.insert(0, generation.clone());
        record.committed.truncate(self.retain);
        record.staging = None;
        // The commit point.
        self.journal
            .store(&key, &record)
            .map_err(|e| internal("journal", e))?;
        tracing::info!(pair = %pair, generation = header.generation, "generation committed");
        if let Some(hashes) = &self.hashes {
            for (volume, index) in &indexes {
                let key = crate::delta::VolumeKey::new(pair.to_string(), volume.clone());
                if let Err(e) = hashes.save(&key, index) {
                    tracing::warn!(pair = %pair, volume, error = %e, "keeping the generation's index");
                }
            }
        }
        let keep: Vec<u64> = record.committed.iter().map(|g| g.generation).collect();
        if let Err(e) = self.replicas.prune(&pair, &keep).await {
            tracing::warn!(pair = %pair, error = %e, "pruning old generations failed; retrying next commit");
        }
        self.observer
            .committed(
                &pair,
                &header.source_site,
                &generation,
                &sync.pair_json,
                &request.manifests_json,
            )
            .await;
        Ok(CommitResponse {
            committed_generation: header.generation,
            chunks_rejected: sync.chunks_rejected.load(Ordering::Relaxed),
        })
    }
}

#[tonic::async_trait]
impl Replication for Destination {
    async fn begin(
        &self,
        request: Request<BeginRequest>,
    ) -> Result<Response<BeginResponse>, Status> {
        self.begin_sync(request.into_inner())
            .await
            .map(Response::new)
    }

    type PushStream = ReceiverStream<Result<ChunkAck, Status>>;

    async fn push(
        &self,
        request: Request<Streaming<ChunkMessage>>,
    ) -> Result<Response<Self::PushStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(message) = inbound.next().await {
                let reply = match message {
                    Ok(message) => this.push_chunk(message).await,
                    // The sender went away mid-stream: the live sync stays, for a resume.
                    Err(_) => break,
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        self.commit_sync(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn state(
        &self,
        request: Request<StateRequest>,
    ) -> Result<Response<StateResponse>, Status> {
        let request = request.into_inner();
        let pair = request
            .pair
            .ok_or_else(|| Status::invalid_argument("pair: required"))?;
        let key = PairKey {
            namespace: pair.namespace,
            name: pair.name,
        };
        let mut record = self
            .journal
            .load(&key.to_string())
            .map_err(|e| internal("journal", e))?;
        self.adopt_seed(&key, &mut record).await?;
        let site = self.observer.site_view(&key).await.unwrap_or_default();
        Ok(Response::new(StateResponse {
            epoch: record.epoch.max(site.epoch),
            generations: record
                .committed
                .iter()
                .map(|g| ferry_schemas::proto::replication::CommittedGeneration {
                    generation: g.generation,
                    epoch: g.epoch,
                    capture_time_unix_seconds: g.capture_time_unix_seconds,
                    snapshots: g.snapshots.clone().into_iter().collect(),
                    diverged: g.diverged,
                })
                .collect(),
        }))
    }

    async fn base_index(
        &self,
        request: Request<BaseIndexRequest>,
    ) -> Result<Response<BaseIndexResponse>, Status> {
        self.scan_base(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        self.release_pair(request.into_inner())
            .await
            .map(Response::new)
    }
}
