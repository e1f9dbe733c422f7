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
//! Chunks go one at a time and each is acknowledged: a chunk whose checksum fails at the
//! destination is sent again, and a dropped connection is re-established and resumed from the
//! first chunk the destination has not staged.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ferry_schemas::proto::replication::{
    chunk_ack, replication_client::ReplicationClient, BaseIndexRequest, BeginRequest, ChunkMessage,
    CommitRequest, StateRequest, StateResponse, SyncHeader, VolumeBegin, VolumeCommit,
};
use ferry_schemas::proto::PairRef;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::delta::{BlockIndex, Generation, HashStore, VolumeKey};
use crate::destination::{PairKey, VolumeSpec};
use crate::mover::{MoverSession, ReadItem};

/// How often a chunk may fail its checksum before the sync gives up.
const MAX_CHUNK_ATTEMPTS: u32 = 4;
/// How often a dropped connection is re-established within one sync.
const MAX_RECONNECTS: u32 = 5;

/// A volume to ship: what it is, and a mover session reading the generation's snapshot of it.
#[derive(Debug)]
pub struct SourceVolume {
    /// Name, mode and capacity.
    pub spec: VolumeSpec,
    /// Bytes the volume holds (for progress; 0 when unknown).
    pub size_bytes: u64,
    /// A session on the generation's point-in-time copy.
    pub session: MoverSession,
}

/// Test and chaos hooks: damage chunks on the wire, as a faulty network would.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// `(volume, seq)` of chunks whose first transmission gets one byte flipped.
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
    let (tx, rx) = mpsc::channel(4);
    let acks = client.push(ReceiverStream::new(rx)).await?.into_inner();
    Ok(Stream { tx, acks })
}

/// Ships `request` with `volumes` through `client`, planning deltas against `hashes`.
///
/// # Errors
/// [`ShipError`]; nothing is committed and `hashes` is unchanged unless this returns `Ok`.
pub async fn ship(
    client: &mut ReplicationClient<Channel>,
    hashes: &HashStore,
    request: &ShipRequest,
    mut volumes: Vec<SourceVolume>,
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
    let mut previous: BTreeMap<String, Option<BlockIndex>> = BTreeMap::new();
    for volume in &volumes {
        let base = match newest {
            Some(g) if g.diverged => {
                let scanned = base_index(client, &header, volume, g.generation).await?;
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
        previous.insert(volume.spec.volume.clone(), base);
    }
    let begin = BeginRequest {
        header: Some(header.clone()),
        volumes: volumes
            .iter()
            .map(|v| VolumeBegin {
                volume: v.spec.volume.clone(),
                block: v.spec.block,
                base_generation: previous[&v.spec.volume].as_ref().map(|i| i.generation.0),
                size_bytes: v.size_bytes,
                capacity: v.spec.capacity.clone(),
            })
            .collect(),
        pair_json: request.pair_json.clone(),
    };
    let resume = client
        .begin(begin.clone())
        .await
        .map_err(refused_or_failed)?
        .into_inner();
    let mut next_seq: BTreeMap<String, u64> = resume
        .volumes
        .into_iter()
        .map(|v| (v.volume, v.next_seq))
        .collect();
    let mut stream = open_stream(client).await.map_err(ShipError::Destination)?;
    let mut indexes: BTreeMap<String, BlockIndex> = BTreeMap::new();
    for volume in volumes.iter_mut() {
        let name = volume.spec.volume.clone();
        let base = previous[&name].as_ref();
        let from_seq = next_seq.get(&name).copied().unwrap_or(0);
        let index = volume
            .session
            .read(
                Generation(request.generation),
                base,
                from_seq,
                volume.spec.block,
            )
            .await
            .map_err(|source| ShipError::Read {
                volume: name.clone(),
                source,
            })?;
        let mut vreport = VolumeReport {
            full_copy: base.is_none(),
            ..VolumeReport::default()
        };
        loop {
            let item = volume
                .session
                .next_chunk()
                .await
                .map_err(|source| ShipError::Read {
                    volume: name.clone(),
                    source,
                })?;
            let bytes = match item {
                ReadItem::Chunk(bytes) => bytes,
                ReadItem::Done(summary) => {
                    vreport.bytes_scanned = summary.bytes_scanned;
                    vreport.blocks_scanned = summary.blocks_scanned;
                    vreport.bytes_changed = summary.bytes_changed;
                    break;
                }
            };
            let seq = crate::delta::DeltaChunk::from_bytes(&bytes)
                .map(|c| c.seq)
                .map_err(|e| ShipError::Read {
                    volume: name.clone(),
                    source: crate::mover::SessionError::Mover(format!(
                        "mover sent a bad chunk: {e}"
                    )),
                })?;
            let mut attempts = 0u32;
            loop {
                attempts += 1;
                let mut wire = bytes.clone();
                if attempts == 1 && faults.corrupt_chunks.contains(&(name.clone(), seq)) {
                    let last = wire.len() - 1;
                    wire[last] ^= 0x5a;
                }
                vreport.wire_bytes += wire.len() as u64;
                let message = ChunkMessage {
                    header: Some(header.clone()),
                    volume: name.clone(),
                    seq,
                    chunk: wire,
                };
                let ack = match send_and_ack(&mut stream, message).await {
                    Ok(ack) => ack,
                    Err(status) if transient(&status) && report.reconnects < MAX_RECONNECTS => {
                        // Re-establish, and ask the destination where this volume stands.
                        report.reconnects += 1;
                        tracing::warn!(pair = %request.pair, volume = %name, seq, error = %status, "connection lost; resuming");
                        tokio::time::sleep(Duration::from_millis(
                            200 * u64::from(report.reconnects),
                        ))
                        .await;
                        let resumed = client
                            .begin(begin.clone())
                            .await
                            .map_err(refused_or_failed)?
                            .into_inner();
                        next_seq = resumed
                            .volumes
                            .into_iter()
                            .map(|v| (v.volume, v.next_seq))
                            .collect();
                        stream = open_stream(client).await.map_err(ShipError::Destination)?;
                        if next_seq.get(&name).copied().unwrap_or(0) > seq {
                            break;
                        }
                        attempts -= 1;
                        continue;
                    }
                    Err(status) => return Err(refused_or_failed(status)),
                };
                match ack {
                    chunk_ack::Result::Applied(applied) if applied == seq => break,
                    chunk_ack::Result::Applied(other) => {
                        return Err(ShipError::Refused(format!(
                            "destination acknowledged chunk {other} while {seq} was sent"
                        )))
                    }
                    chunk_ack::Result::ResendFrom(from) if from == seq => {
                        report.chunks_rejected += 1;
                        if attempts >= MAX_CHUNK_ATTEMPTS {
                            return Err(ShipError::ChunkKeepsFailing {
                                volume: name.clone(),
                                seq,
                                attempts,
                            });
                        }
                    }
                    chunk_ack::Result::ResendFrom(from) => {
                        return Err(ShipError::Refused(format!(
                            "destination expects chunk {from} of volume {name}, not {seq}; \
                             the stream must restart"
                        )))
                    }
                }
            }
        }
        report.bytes_shipped += vreport.wire_bytes;
        report.volumes.insert(name.clone(), vreport);
        indexes.insert(name, index);
    }
    drop(stream);
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

async fn send_and_ack(
    stream: &mut Stream,
    message: ChunkMessage,
) -> Result<chunk_ack::Result, tonic::Status> {
    if stream.tx.send(message).await.is_err() {
        return Err(tonic::Status::unavailable("push stream closed"));
    }
    match stream.acks.message().await? {
        Some(ack) => ack
            .result
            .ok_or_else(|| tonic::Status::internal("empty chunk acknowledgement")),
        None => Err(tonic::Status::unavailable("push stream ended")),
    }
}
