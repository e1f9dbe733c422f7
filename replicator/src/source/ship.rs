//! Ships one generation to the destination: Begin, the volume deltas chunk by chunk, Commit.
//!
//! The source's hash store holds, per volume, the block index of the generation the destination
//! last committed. A delta is planned against it only when the destination confirms that
//! generation is still its newest; otherwise the volume is sent as a full copy on the same path.
//! When the destination's newest generation is a *diverged* seed (an old primary's own volumes
//! after a failover), the source asks the destination for its scan of it (`BaseIndex`) and
//! plans against that, so only the blocks that differ between the two sites travel.
//! The new indexes are saved only after the destination acknowledges the commit, so a sync that
//! fails anywhere leaves the store describing the destination's committed generation.
//!
//! The volumes of a generation go in parallel, each on its own `Push` stream with a window of
//! chunks in flight, so reading, the wire and the destination's apply overlap instead of
//! taking turns. Every chunk is still acknowledged, in order: a chunk whose checksum fails at
//! the destination is sent again (with the ones after it), and a dropped connection is
//! re-established and resumed from the first chunk the destination has not staged.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use ferry_schemas::proto::replication::{
    chunk_ack, replication_client::ReplicationClient, BaseIndexRequest, BeginRequest, ChunkMessage,
    CommitRequest, StateRequest, StateResponse, SyncHeader, VolumeBegin, VolumeCommit,
};
use ferry_schemas::proto::PairRef;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::delta::{BlockIndex, Generation, HashStore, VolumeKey};
use crate::destination::{PairKey, VolumeSpec};
use crate::mover::{MoverSession, ReadItem};

/// How often a chunk may fail its checksum before the sync gives up.
const MAX_CHUNK_ATTEMPTS: u32 = 4;
/// How often a dropped connection is re-established within one volume's stream.
const MAX_RECONNECTS: u32 = 5;
/// Chunks in flight per volume stream (each at most 1 MiB): enough to keep the wire and the
/// destination's mover busy while acknowledgements travel back, and a bound on the memory a
/// stream holds for resends.
pub const WINDOW_CHUNKS: usize = 8;
/// The quick check trusts only files modified this long before the base generation's capture
/// time: more than a filesystem timestamp tick, and more than the capture's own duration.
pub const QUICK_CHECK_MARGIN: Duration = Duration::from_secs(2);
/// Volumes of one generation shipped at once (each reads through its own mover).
pub const PARALLEL_VOLUMES: usize = 4;

/// A volume to ship: what it is, and a mover session reading the generation's snapshot of it.
#[derive(Debug)]
pub struct SourceVolume {
    /// Name, mode and capacity.
    pub spec: VolumeSpec,
    /// Bytes the volume holds (for progress; 0 when unknown).
    pub size_bytes: u64,
    /// A session on the generation's point-in-time copy.
    pub session: MoverSession,
    /// What the CSI driver's changed block tracking says changed since a base generation
    /// (Block volumes); `None` when it was not asked (a Filesystem volume).
    pub changed: Option<ChangedBlocks>,
}

/// The answer of the CSI driver's changed block tracking (KEP-3314 `GetMetadataDelta`) for one
/// volume of a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangedBlocks {
    /// The byte ranges `(offset, length)` that differ from the volume's snapshot at
    /// `base_generation`.
    Known {
        /// The generation whose source snapshot was the base.
        base_generation: u64,
        /// Digest of this site's index of that generation (its hash store's), which the
        /// ranges apply to: a delta planned against any other index (the destination's scan
        /// of a diverged seed of the same number, say) must not use them.
        base_digest: [u8; 32],
        /// Changed byte ranges, ascending.
        extents: Vec<(u64, u64)>,
    },
    /// Not known: the whole volume is read.
    Unknown(FullScanReason),
}

/// Why a Block volume was read whole instead of through changed block tracking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullScanReason {
    /// Short, stable code for metrics: `no_service`, `no_base`, `unauthorised`, `error`,
    /// `resized`, `base_mismatch`, `scheduled` (a `spec.fullScanEvery` generation).
    pub code: &'static str,
    /// What happened, naming the object (for the DRPair status and the Event).
    pub message: String,
}

/// How a volume of a shipped generation was read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ReadMode {
    /// A Filesystem volume, or a full copy with no base: read whole, nothing to track.
    #[default]
    Whole,
    /// Only the changed extents the CSI driver reported were read.
    ChangedBlocks,
    /// A Block volume with a base, read whole because changed block tracking could not be
    /// used.
    FullScan(FullScanReason),
}

/// Test and chaos hooks: damage chunks on the wire, as a faulty network would.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// `(volume, seq)` of chunks that get one byte flipped on the wire until the destination
    /// has rejected them once (a transmission discarded unread, behind an earlier rejected
    /// chunk, does not count).
    pub corrupt_chunks: BTreeSet<(String, u64)>,
}

/// What one generation is.
#[derive(Debug, Clone)]
pub struct ShipRequest {
    /// The pair.
    pub pair: PairKey,
    /// The generation to ship (must be after the destination's newest).
    pub generation: u64,
    /// The pair's epoch at this (active) site.
    pub epoch: u64,
    /// This site's name.
    pub source_site: String,
    /// The DRPair as declared here (JSON), for the destination's copy.
    pub pair_json: Vec<u8>,
    /// Sanitised manifests (JSON array).
    pub manifests_json: Vec<u8>,
    /// When the capture was taken, seconds since the Unix epoch.
    pub capture_time_unix_seconds: f64,
    /// Whether filesystem volumes may skip files whose size and mtime match the previous
    /// generation's index (rsync's quick check); `false` reads every file, which catches a
    /// file rewritten in place with its old mtime restored. The replicator turns it off every
    /// `spec.fullScanEvery` generations.
    pub quick_check: bool,
}

/// Per-volume figures of a shipped generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeReport {
    /// Bytes the volume holds (what the scan read).
    pub bytes_scanned: u64,
    /// Blocks hashed.
    pub blocks_scanned: u64,
    /// Bytes of changed blocks, before compression.
    pub bytes_changed: u64,
    /// Chunk bytes sent on the wire (compressed payload plus framing), resends included.
    pub wire_bytes: u64,
    /// Whether this was a full copy (no usable base).
    pub full_copy: bool,
    /// Bytes taken from the previous index unread: files the quick check trusted, or blocks
    /// outside the changed extents.
    pub bytes_unread: u64,
    /// Whether changed block tracking was used, or why not.
    pub read_mode: ReadMode,
}

/// What a shipped generation cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShipReport {
    /// The committed generation.
    pub generation: u64,
    /// Per volume.
    pub volumes: BTreeMap<String, VolumeReport>,
    /// Chunk bytes sent, all volumes, resends included; plus manifests.
    pub bytes_shipped: u64,
    /// Chunks the destination refused as corrupt (and got again).
    pub chunks_rejected: u64,
    /// Bytes of block indexes the destination sent of a diverged seed (received, not sent).
    pub base_index_bytes: u64,
    /// Connections re-established mid-sync.
    pub reconnects: u32,
    /// Wall time from Begin to the commit acknowledgement.
    pub duration: Duration,
}

/// Why a sync failed; the previous generation stays the destination's newest.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The destination refused (stale epoch, generation or base): its message says why.
    #[error("destination refused: {0}")]
    Refused(String),
    /// The destination or network failed.
    #[error("destination failed: {0}")]
    Destination(tonic::Status),
    /// Reading the volume failed at the mover.
    #[error("reading volume {volume}: {source}")]
    Read {
        /// The volume.
        volume: String,
        /// The cause.
        #[source]
        source: crate::mover::SessionError,
    },
    /// A chunk kept failing its checksum.
    #[error("chunk {seq} of volume {volume} failed its checksum {attempts} times")]
    ChunkKeepsFailing {
        /// The volume.
        volume: String,
        /// The chunk.
        seq: u64,
        /// Attempts made.
        attempts: u32,
    },
    /// The source's hash store failed.
    #[error("hash store: {0}")]
    HashStore(#[from] crate::delta::IndexError),
}

fn refused_or_failed(status: tonic::Status) -> ShipError {
    match status.code() {
        tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
            ShipError::Refused(status.message().to_string())
        }
        _ => ShipError::Destination(status),
    }
}

fn transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

async fn destination_state(
    client: &mut ReplicationClient<Channel>,
    pair: &PairKey,
) -> Result<StateResponse, ShipError> {
    Ok(client
        .state(StateRequest {
            pair: Some(PairRef {
                namespace: pair.namespace.clone(),
                name: pair.name.clone(),
            }),
        })
        .await
        .map_err(ShipError::Destination)?
        .into_inner())
}

/// The destination's newest committed generation and its epoch for `pair`.
///
/// # Errors
/// [`ShipError::Destination`] when the destination cannot be asked.
pub async fn committed_state(
    client: &mut ReplicationClient<Channel>,
    pair: &PairKey,
) -> Result<(Option<u64>, u64), ShipError> {
    let state = destination_state(client, pair).await?;
    Ok((state.generations.first().map(|g| g.generation), state.epoch))
}

/// The destination's own index of `volume` in its newest committed generation, which must be
/// `generation`; `None` when it holds no copy of that volume (a full copy then). Returns the
/// index and its size on the wire.
async fn base_index(
    client: &mut ReplicationClient<Channel>,
    header: &SyncHeader,
    volume: &SourceVolume,
    generation: u64,
) -> Result<Option<(BlockIndex, u64)>, ShipError> {
    let reply = client
        .base_index(BaseIndexRequest {
            header: Some(header.clone()),
            volume: Some(VolumeBegin {
                volume: volume.spec.volume.clone(),
                block: volume.spec.block,
                base_generation: None,
                size_bytes: volume.size_bytes,
                capacity: volume.spec.capacity.clone(),
            }),
        })
        .await;
    let reply = match reply {
        Ok(r) => r.into_inner(),
        Err(s)
            if s.code() == tonic::Code::FailedPrecondition
                && !s.message().starts_with("stale epoch") =>
        {
            return Ok(None)
        }
        Err(s) => return Err(refused_or_failed(s)),
    };
    let index: BlockIndex = postcard::from_bytes(&reply.index).map_err(|e| {
        ShipError::Refused(format!(
            "the destination's index of volume {} does not decode: {e}",
            volume.spec.volume
        ))
    })?;
    Ok(
        (reply.generation == generation && index.generation.0 == generation)
            .then_some((index, reply.index.len() as u64)),
    )
}

struct Stream {
    tx: mpsc::Sender<ChunkMessage>,
    acks: tonic::Streaming<ferry_schemas::proto::replication::ChunkAck>,
}

async fn open_stream(client: &mut ReplicationClient<Channel>) -> Result<Stream, tonic::Status> {
    let (tx, rx) = mpsc::channel(WINDOW_CHUNKS);
    let acks = client.push(ReceiverStream::new(rx)).await?.into_inner();
    Ok(Stream { tx, acks })
}

/// Ships `request` with `volumes` through `client`, planning deltas against `hashes`.
///
/// The volumes go in parallel (at most [`PARALLEL_VOLUMES`] at once), each on its own `Push`
/// stream with up to [`WINDOW_CHUNKS`] chunks in flight.
///
/// # Errors
/// [`ShipError`]; nothing is committed and `hashes` is unchanged unless this returns `Ok`.
pub async fn ship(
    client: &mut ReplicationClient<Channel>,
    hashes: &HashStore,
    request: &ShipRequest,
    volumes: Vec<SourceVolume>,
    faults: &Faults,
) -> Result<ShipReport, ShipError> {
    let started = Instant::now();
    let state = destination_state(client, &request.pair).await?;
    let newest = state.generations.first();
    let committed = newest.map(|g| g.generation);
    let header = SyncHeader::new(
        &request.pair.namespace,
        &request.pair.name,
        request.generation,
        request.epoch,
        &request.source_site,
    );
    let mut report = ShipReport {
        generation: request.generation,
        ..ShipReport::default()
    };
    // Plan each volume against the destination's committed generation, or send it whole. A
    // diverged seed holds writes this site never saw: only the destination's scan describes it.
    let mut planned: Vec<(SourceVolume, Option<BlockIndex>)> = Vec::with_capacity(volumes.len());
    // Files are trusted only if modified well before the base generation was captured; a
    // diverged seed's index holds the destination's mtimes: no quick check against it.
    let quick_check_before = newest
        .filter(|g| request.quick_check && !g.diverged && g.capture_time_unix_seconds > 0.0)
        .and_then(|g| Duration::try_from_secs_f64(g.capture_time_unix_seconds).ok())
        .and_then(|t| t.checked_sub(QUICK_CHECK_MARGIN))
        .map(|t| std::time::UNIX_EPOCH + t);
    for volume in volumes {
        let base = match newest {
            Some(g) if g.diverged => {
                let scanned = base_index(client, &header, &volume, g.generation).await?;
                report.base_index_bytes += scanned.as_ref().map_or(0, |(_, len)| *len);
                scanned.map(|(index, _)| index)
            }
            _ => {
                let key = VolumeKey::new(request.pair.to_string(), volume.spec.volume.clone());
                hashes
                    .load(&key)?
                    .into_previous()
                    .filter(|index| Some(index.generation.0) == committed)
            }
        };
        planned.push((volume, base));
    }
    let begin = BeginRequest {
        header: Some(header.clone()),
        volumes: planned
            .iter()
            .map(|(v, base)| VolumeBegin {
                volume: v.spec.volume.clone(),
                block: v.spec.block,
                base_generation: base.as_ref().map(|i| i.generation.0),
                size_bytes: v.size_bytes,
                capacity: v.spec.capacity.clone(),
            })
            .collect(),
        pair_json: request.pair_json.clone(),
        resume_only: false,
    };
    let resume = client
        .begin(begin.clone())
        .await
        .map_err(refused_or_failed)?
        .into_inner();
    let next_seq: BTreeMap<String, u64> = resume
        .volumes
        .into_iter()
        .map(|v| (v.volume, v.next_seq))
        .collect();
    let shipped: Vec<ShippedVolume> =
        futures::stream::iter(planned.into_iter().map(|(volume, base)| {
            let from_seq = next_seq.get(&volume.spec.volume).copied().unwrap_or(0);
            let link = Link {
                client: client.clone(),
                begin: &begin,
                header: &header,
                faults,
                quick_check_before,
            };
            ship_volume(link, volume, base, from_seq)
        }))
        .buffer_unordered(PARALLEL_VOLUMES)
        .try_collect()
        .await?;
    let mut indexes: BTreeMap<String, BlockIndex> = BTreeMap::new();
    for volume in shipped {
        report.bytes_shipped += volume.report.wire_bytes;
        report.chunks_rejected += volume.rejected;
        report.reconnects += volume.reconnects;
        report.volumes.insert(volume.name.clone(), volume.report);
        indexes.insert(volume.name, volume.index);
    }
    let commit = CommitRequest {
        header: Some(header),
        volumes: indexes
            .iter()
            .map(|(volume, index)| VolumeCommit {
                volume: volume.clone(),
                digest: index.digest().0.to_vec(),
            })
            .collect(),
        manifests_json: request.manifests_json.clone(),
        capture_time_unix_seconds: request.capture_time_unix_seconds,
    };
    report.bytes_shipped += request.manifests_json.len() as u64;
    let committed = client
        .commit(commit)
        .await
        .map_err(refused_or_failed)?
        .into_inner();
    report.chunks_rejected = report.chunks_rejected.max(committed.chunks_rejected);
    // Only now does the destination hold these indexes' generation.
    for (volume, index) in &indexes {
        hashes.save(
            &VolumeKey::new(request.pair.to_string(), volume.clone()),
            index,
        )?;
    }
    report.duration = started.elapsed();
    Ok(report)
}

/// What one volume's stream needs of the sync: a client of its own (sharing the connection),
/// the Begin to repeat on a reconnect, the header, the faults to inject.
struct Link<'a> {
    client: ReplicationClient<Channel>,
    begin: &'a BeginRequest,
    header: &'a SyncHeader,
    faults: &'a Faults,
    quick_check_before: Option<std::time::SystemTime>,
}

/// One volume, shipped and acknowledged chunk by chunk.
struct ShippedVolume {
    name: String,
    index: BlockIndex,
    report: VolumeReport,
    rejected: u64,
    reconnects: u32,
}

/// A chunk read from the mover and not yet applied at the destination: kept for a resend.
struct Unacked {
    bytes: Vec<u8>,
    rejections: u32,
}

/// The sliding window of one volume's stream. The destination applies chunks strictly in
/// `seq` order and acknowledges every message it receives, in order: `Applied(seq)`, or
/// `ResendFrom(seq)` naming the chunk it expects (the one that failed its checksum, or the
/// first one missing).
#[derive(Default)]
struct Window {
    /// By seq; contiguous from the oldest chunk not yet applied.
    unacked: BTreeMap<u64, Unacked>,
    /// Seqs of the messages on the wire, oldest first (one acknowledgement each).
    in_flight: VecDeque<u64>,
    /// The seq to put on the wire next.
    next_send: u64,
    /// Every seq below this one is applied at the destination.
    applied_below: u64,
}

impl Window {
    /// Takes the acknowledgement of the oldest message on the wire. Returns whether the chunk
    /// was rejected (its checksum failed at the destination).
    fn acknowledge(&mut self, name: &str, result: chunk_ack::Result) -> Result<bool, ShipError> {
        let Some(sent) = self.in_flight.pop_front() else {
            return Err(ShipError::Refused(format!(
                "destination acknowledged a chunk of volume {name} that was not sent"
            )));
        };
        match result {
            chunk_ack::Result::Applied(seq) if seq == sent => {
                // In-order application: everything up to `seq` is staged.
                self.applied_below = self.applied_below.max(seq + 1);
                self.unacked = self.unacked.split_off(&self.applied_below);
                Ok(false)
            }
            chunk_ack::Result::Applied(other) => Err(ShipError::Refused(format!(
                "destination acknowledged chunk {other} of volume {name} while {sent} was sent"
            ))),
            chunk_ack::Result::ResendFrom(from) if from == sent => {
                if let Some(chunk) = self.unacked.get_mut(&from) {
                    chunk.rejections += 1;
                    if chunk.rejections >= MAX_CHUNK_ATTEMPTS {
                        return Err(ShipError::ChunkKeepsFailing {
                            volume: name.to_string(),
                            seq: from,
                            attempts: chunk.rejections,
                        });
                    }
                }
                self.next_send = self.next_send.min(from);
                Ok(true)
            }
            chunk_ack::Result::ResendFrom(from)
                if from < sent
                    && from >= self.applied_below
                    && self.unacked.contains_key(&from) =>
            {
                // Sent after a chunk the destination is still waiting for. Rewind only if that
                // chunk is neither on the wire nor due to be sent again already.
                if !self.in_flight.contains(&from) && self.next_send > from {
                    self.next_send = from;
                }
                Ok(false)
            }
            chunk_ack::Result::ResendFrom(from) => Err(ShipError::Refused(format!(
                "destination expects chunk {from} of volume {name}, not {sent}; \
                 the stream must restart"
            ))),
        }
    }

    /// A new stream after a reconnect, from the destination's `next_seq`.
    fn resume(&mut self, name: &str, next_seq: u64) -> Result<(), ShipError> {
        if next_seq < self.applied_below {
            return Err(ShipError::Refused(format!(
                "destination lost staged chunks of volume {name}: it expects chunk {next_seq} \
                 after acknowledging up to {}; the stream must restart",
                self.applied_below - 1
            )));
        }
        self.in_flight.clear();
        self.applied_below = next_seq;
        self.unacked = self.unacked.split_off(&next_seq);
        self.next_send = next_seq;
        Ok(())
    }
}

async fn ship_volume(
    mut link: Link<'_>,
    mut volume: SourceVolume,
    base: Option<BlockIndex>,
    from_seq: u64,
) -> Result<ShippedVolume, ShipError> {
    let name = volume.spec.volume.clone();
    let read_failed = |source| ShipError::Read {
        volume: name.clone(),
        source,
    };
    let generation = link.header.generation;
    // Changed block tracking applies to a delta against the very generation it was asked about.
    let mut read_mode = ReadMode::Whole;
    let mut changed = None;
    if let (Some(base), Some(answer)) = (&base, volume.changed.take()) {
        match answer {
            ChangedBlocks::Known {
                base_generation,
                base_digest,
                extents,
            } if base_generation == base.generation.0 && base_digest == base.digest().0 => {
                changed = Some(extents)
            }
            ChangedBlocks::Known {
                base_generation, ..
            } => {
                read_mode = ReadMode::FullScan(FullScanReason {
                    code: "base_mismatch",
                    message: format!(
                        "changed blocks were reported against this site's generation \
                         {base_generation}; the delta's base is the destination's generation {} \
                         (another index: a diverged seed, or a generation this site did not ship)",
                        base.generation.0
                    ),
                })
            }
            ChangedBlocks::Unknown(reason) => read_mode = ReadMode::FullScan(reason),
        }
    }
    let index = volume
        .session
        .read(
            Generation(generation),
            base.as_ref(),
            from_seq,
            volume.spec.block,
            link.quick_check_before,
            changed.as_deref(),
        )
        .await
        .map_err(read_failed)?;
    let mut shipped = ShippedVolume {
        name: name.clone(),
        index,
        report: VolumeReport {
            full_copy: base.is_none(),
            read_mode,
            ..VolumeReport::default()
        },
        rejected: 0,
        reconnects: 0,
    };
    drop(base);
    let mut stream = open_stream(&mut link.client)
        .await
        .map_err(ShipError::Destination)?;
    let mut window = Window {
        next_send: from_seq,
        applied_below: from_seq,
        ..Window::default()
    };
    let mut read_done = false;
    loop {
        // Fill the window: chunks due again first, then new ones from the mover.
        let mut closed = false;
        while window.in_flight.len() < WINDOW_CHUNKS {
            let seq = window.next_send;
            if let std::collections::btree_map::Entry::Vacant(slot) = window.unacked.entry(seq) {
                if read_done {
                    break;
                }
                match volume.session.next_chunk().await.map_err(read_failed)? {
                    ReadItem::Chunk(bytes) => {
                        let got = crate::delta::DeltaChunk::from_bytes(&bytes)
                            .map(|c| c.seq)
                            .map_err(|e| {
                                read_failed(crate::mover::SessionError::Mover(format!(
                                    "mover sent a bad chunk: {e}"
                                )))
                            })?;
                        if got < seq {
                            // Staged already (the destination said so on a resume).
                            continue;
                        }
                        if got > seq {
                            return Err(read_failed(crate::mover::SessionError::Mover(format!(
                                "mover sent chunk {got} where {seq} was due"
                            ))));
                        }
                        slot.insert(Unacked {
                            bytes,
                            rejections: 0,
                        });
                    }
                    ReadItem::Done(summary) => {
                        shipped.report.bytes_scanned = summary.bytes_scanned;
                        shipped.report.blocks_scanned = summary.blocks_scanned;
                        shipped.report.bytes_changed = summary.bytes_changed;
                        shipped.report.bytes_unread = summary.bytes_unread;
                        if summary.changed_block_tracking {
                            shipped.report.read_mode = ReadMode::ChangedBlocks;
                        } else if !summary.changed_block_tracking_fallback.is_empty() {
                            shipped.report.read_mode = ReadMode::FullScan(FullScanReason {
                                code: if summary.changed_block_tracking_fallback.contains("resized")
                                {
                                    "resized"
                                } else {
                                    "error"
                                },
                                message: summary.changed_block_tracking_fallback,
                            });
                        }
                        read_done = true;
                        continue;
                    }
                }
            }
            let chunk = window.unacked.get_mut(&seq).expect("inserted above");
            let mut wire = chunk.bytes.clone();
            if chunk.rejections == 0 && link.faults.corrupt_chunks.contains(&(name.clone(), seq)) {
                let last = wire.len() - 1;
                wire[last] ^= 0x5a;
            }
            let wire_len = wire.len() as u64;
            let message = ChunkMessage {
                header: Some(link.header.clone()),
                volume: name.clone(),
                seq,
                chunk: wire,
            };
            if stream.tx.send(message).await.is_err() {
                // The stream ended: its acknowledgements say why (a refusal, or a drop).
                closed = true;
                break;
            }
            shipped.report.wire_bytes += wire_len;
            window.in_flight.push_back(seq);
            window.next_send = seq + 1;
        }
        if window.in_flight.is_empty() && !closed {
            if read_done && window.unacked.is_empty() {
                break;
            }
            return Err(ShipError::Refused(format!(
                "volume {name}: chunk {} is due but nothing is in flight",
                window.next_send
            )));
        }
        let status = match next_ack(&mut stream).await {
            Ok(result) => {
                if window.acknowledge(&name, result)? {
                    shipped.rejected += 1;
                }
                continue;
            }
            Err(status) => status,
        };
        if !transient(&status) || shipped.reconnects >= MAX_RECONNECTS {
            return Err(refused_or_failed(status));
        }
        // Re-establish, and ask the destination where this volume stands.
        shipped.reconnects += 1;
        tracing::warn!(volume = %name, error = %status, "connection lost; resuming");
        tokio::time::sleep(Duration::from_millis(200 * u64::from(shipped.reconnects))).await;
        // Resume only: if the destination no longer holds this sync (it restarted, or
        // abandoned it), a fresh Begin would reset the other volumes' staging under them.
        let resumed = link
            .client
            .begin(BeginRequest {
                resume_only: true,
                ..link.begin.clone()
            })
            .await
            .map_err(refused_or_failed)?
            .into_inner();
        let next_seq = resumed
            .volumes
            .iter()
            .find(|v| v.volume == name)
            .map_or(0, |v| v.next_seq);
        window.resume(&name, next_seq)?;
        stream = open_stream(&mut link.client)
            .await
            .map_err(ShipError::Destination)?;
    }
    Ok(shipped)
}

/// The acknowledgement of the oldest message on the stream.
async fn next_ack(stream: &mut Stream) -> Result<chunk_ack::Result, tonic::Status> {
    match stream.acks.message().await? {
        Some(ack) => ack
            .result
            .ok_or_else(|| tonic::Status::internal("empty chunk acknowledgement")),
        None => Err(tonic::Status::unavailable("push stream ended")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chunk_ack::Result::{Applied, ResendFrom};

    /// A window with chunks `0..n` read and on the wire.
    fn sent(n: u64) -> Window {
        let mut window = Window::default();
        for seq in 0..n {
            window.unacked.insert(
                seq,
                Unacked {
                    bytes: vec![seq as u8],
                    rejections: 0,
                },
            );
            window.in_flight.push_back(seq);
        }
        window.next_send = n;
        window
    }

    #[test]
    fn in_order_acknowledgements_release_the_chunks_kept_for_resends() {
        let mut window = sent(3);
        assert!(!window.acknowledge("v", Applied(0)).unwrap());
        assert!(!window.acknowledge("v", Applied(1)).unwrap());
        assert_eq!(window.unacked.keys().copied().collect::<Vec<_>>(), [2]);
        assert!(!window.acknowledge("v", Applied(2)).unwrap());
        assert!(window.unacked.is_empty() && window.in_flight.is_empty());
        assert_eq!((window.applied_below, window.next_send), (3, 3));
    }

    #[test]
    fn a_rejected_chunk_rewinds_once_and_the_chunks_behind_it_are_sent_again() {
        let mut window = sent(4);
        // Chunk 1 fails its checksum; 2 and 3 arrive out of order behind it.
        assert!(!window.acknowledge("v", Applied(0)).unwrap());
        assert!(
            window.acknowledge("v", ResendFrom(1)).unwrap(),
            "a rejection"
        );
        assert_eq!(window.next_send, 1, "rewound to the rejected chunk");
        // The sender puts 1 on the wire again before the stale acknowledgements arrive.
        window.in_flight.push_back(1);
        window.next_send = 2;
        assert!(!window.acknowledge("v", ResendFrom(1)).unwrap());
        assert!(!window.acknowledge("v", ResendFrom(1)).unwrap());
        assert_eq!(
            window.next_send, 2,
            "no second rewind while 1 is on the wire"
        );
        assert!(!window.acknowledge("v", Applied(1)).unwrap());
        assert_eq!(window.unacked.keys().copied().collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn a_stale_acknowledgement_rewinds_when_the_awaited_chunk_is_not_on_the_wire() {
        let mut window = sent(3);
        window.in_flight.pop_front(); // 0's acknowledgement was lost with its rejection
        window.unacked.get_mut(&0).unwrap().rejections = 1;
        assert!(!window.acknowledge("v", ResendFrom(0)).unwrap());
        assert_eq!(window.next_send, 0);
    }

    #[test]
    fn a_chunk_that_keeps_failing_ends_the_sync_naming_it() {
        let mut window = sent(1);
        for attempt in 1..MAX_CHUNK_ATTEMPTS {
            assert!(
                window.acknowledge("disk", ResendFrom(0)).unwrap(),
                "{attempt}"
            );
            window.in_flight.push_back(0);
        }
        match window.acknowledge("disk", ResendFrom(0)) {
            Err(ShipError::ChunkKeepsFailing {
                volume,
                seq,
                attempts,
            }) => assert_eq!(
                (volume.as_str(), seq, attempts),
                ("disk", 0, MAX_CHUNK_ATTEMPTS)
            ),
            other => panic!("expected ChunkKeepsFailing, got {other:?}"),
        }
    }

    #[test]
    fn answers_that_do_not_fit_the_stream_are_refused() {
        let mut window = sent(2);
        assert!(matches!(
            window.acknowledge("v", Applied(1)),
            Err(ShipError::Refused(m)) if m.contains("acknowledged chunk 1 of volume v while 0")
        ));
        let mut window = sent(2);
        assert!(matches!(
            window.acknowledge("v", ResendFrom(5)),
            Err(ShipError::Refused(m)) if m.contains("expects chunk 5")
        ));
        let mut window = Window::default();
        assert!(matches!(
            window.acknowledge("v", Applied(0)),
            Err(ShipError::Refused(m)) if m.contains("not sent")
        ));
    }

    #[test]
    fn a_resume_continues_from_the_destination_and_never_goes_back() {
        let mut window = sent(4);
        window.acknowledge("v", Applied(0)).unwrap();
        // The destination staged 1 and 2 but their acknowledgements were lost.
        window.resume("v", 3).unwrap();
        assert!(window.in_flight.is_empty());
        assert_eq!(window.unacked.keys().copied().collect::<Vec<_>>(), [3]);
        assert_eq!((window.next_send, window.applied_below), (3, 3));
        // A destination that forgot acknowledged chunks cannot be resumed.
        match window.resume("v", 1) {
            Err(ShipError::Refused(m)) => assert!(m.contains("lost staged chunks"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
