//! Chunking: turn a plan and the source snapshot into checksummed, size-bounded chunks.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::diff::{DeltaPlan, FileRef, Op, Step, StreamId};
use super::index::{BlockSize, VolumeDigest, VolumeKind};
use super::scan::VolumeSnapshot;

/// Default bound on a chunk body, in bytes (1 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// Default bound on one extent's uncompressed length, in bytes (256 KiB).
pub const DEFAULT_EXTENT_MAX_BYTES: u32 = 256 << 10;
/// Largest extent any sender may declare, in bytes (16 MiB): bounds what a receiver allocates
/// for one extent, whatever the chunk claims.
pub const MAX_EXTENT_BYTES: u32 = 16 << 20;
/// Default zstd level (RFC 8878 frames; level 1 is the fastest standard level).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Bytes of a serialised [`DeltaChunk`] besides its body: sequence number and checksum.
pub const ENVELOPE_BYTES: usize = 8 + 32;
/// BLAKE3 derive-key context of [`ChunkChecksum`].
pub const CHUNK_CHECKSUM_CONTEXT: &str = "ferry-replicator 2025-06-01 delta chunk v1";

/// Room reserved in a body for everything but its records.
const BODY_OVERHEAD_BYTES: usize = 256;

/// How chunks are cut and compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkOptions {
    /// Upper bound on a chunk's body, in bytes; the whole serialised chunk is at most
    /// [`ENVELOPE_BYTES`] more.
    pub max_body_bytes: usize,
    /// Upper bound on one extent's uncompressed length, in bytes; a positive multiple of the
    /// block size, at most [`MAX_EXTENT_BYTES`]. One extent is one zstd frame.
    pub extent_max_bytes: u32,
    /// zstd compression level, 1 to 19.
    pub zstd_level: i32,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            extent_max_bytes: DEFAULT_EXTENT_MAX_BYTES,
            zstd_level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

/// Why [`ChunkOptions`] cannot be used with a plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidChunkOptions {
    /// The extent bound is zero, not a multiple of the block size, or above
    /// [`MAX_EXTENT_BYTES`].
    #[error("extent bound {extent_max_bytes} bytes is not a positive multiple of the block size {block_size_bytes} up to 16 MiB")]
    ExtentNotBlockMultiple {
        /// The extent bound, in bytes.
        extent_max_bytes: u32,
        /// The plan's block size, in bytes.
        block_size_bytes: u32,
    },
    /// An incompressible extent would not fit in a body.
    #[error(
        "body bound {max_body_bytes} bytes leaves no room for a {extent_max_bytes}-byte extent"
    )]
    BodyTooSmall {
        /// The body bound, in bytes.
        max_body_bytes: usize,
        /// The extent bound, in bytes.
        extent_max_bytes: u32,
    },
    /// The zstd level is out of range.
    #[error("zstd level {level} is outside 1..=19")]
    ZstdLevel {
        /// The level.
        level: i32,
    },
}

impl ChunkOptions {
    /// Checks these options against a plan's block size.
    ///
    /// # Errors
    /// [`InvalidChunkOptions`] naming the bad field.
    pub fn validate(&self, block_size: BlockSize) -> Result<(), InvalidChunkOptions> {
        if self.extent_max_bytes == 0
            || self.extent_max_bytes % block_size.bytes() != 0
            || self.extent_max_bytes > MAX_EXTENT_BYTES
        {
            return Err(InvalidChunkOptions::ExtentNotBlockMultiple {
                extent_max_bytes: self.extent_max_bytes,
                block_size_bytes: block_size.bytes(),
            });
        }
        let needed = self.extent_max_bytes as usize + 2 * BODY_OVERHEAD_BYTES + 4096;
        if self.max_body_bytes < needed {
            return Err(InvalidChunkOptions::BodyTooSmall {
                max_body_bytes: self.max_body_bytes,
                extent_max_bytes: self.extent_max_bytes,
            });
        }
        if !(1..=19).contains(&self.zstd_level) {
            return Err(InvalidChunkOptions::ZstdLevel {
                level: self.zstd_level,
            });
        }
        Ok(())
    }
}

/// How an extent's bytes are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// Stored as is (compression would not have shrunk them).
    Raw,
    /// One zstd frame (RFC 8878) holding exactly `raw_len_bytes` bytes.
    Zstd,
}

/// Source bytes for one range of one file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// The file.
    pub file: FileRef,
    /// Where the bytes go, in bytes from the file's start.
    pub offset_bytes: u64,
    /// Uncompressed length, in bytes.
    pub raw_len_bytes: u32,
    /// Encoding of `data`.
    pub codec: Codec,
    /// The bytes, encoded per `codec`.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Extent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extent")
            .field("file", &self.file)
            .field("offset_bytes", &self.offset_bytes)
            .field("raw_len_bytes", &self.raw_len_bytes)
            .field("codec", &self.codec)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// One record of a chunk body, applied in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A data-free op.
    Op(Op),
    /// Data for a range.
    Extent(Extent),
}

/// Carried by the last chunk of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEnd {
    /// Number of chunks in the stream (this one's `seq` + 1).
    pub chunk_count: u64,
    /// Image or tree.
    pub kind: VolumeKind,
    /// Block size to rescan the target at when verifying.
    pub block_size: BlockSize,
    /// Digest the target must have once the stream is applied.
    pub target_digest: VolumeDigest,
}

/// The decoded body of a chunk, encoded on the wire with postcard (its v1 wire format:
/// varint integers, length-prefixed sequences and byte strings, enums as a varint index).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkBody {
    /// The stream it belongs to.
    pub stream: StreamId,
    /// Position in the stream, from 0.
    pub seq: u64,
    /// Records, applied in order.
    pub records: Vec<Record>,
    /// Present on the last chunk only.
    pub end: Option<StreamEnd>,
}

/// BLAKE3 derive-key hash (context [`CHUNK_CHECKSUM_CONTEXT`]) over a chunk's sequence number
/// (u64 little-endian) and body bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkChecksum(pub [u8; 32]);

impl ChunkChecksum {
    fn of(seq: u64, body: &[u8]) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key(CHUNK_CHECKSUM_CONTEXT);
        hasher.update(&seq.to_le_bytes());
        hasher.update(body);
        Self(*hasher.finalize().as_bytes())
    }
}

impl std::fmt::Debug for ChunkChecksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex: String = self.0[..8].iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "ChunkChecksum({hex})")
    }
}

/// One unit of transfer: a postcard-encoded [`ChunkBody`] with its sequence number and
/// checksum.
///
/// Wire form ([`to_bytes`](Self::to_bytes)): `seq` as u64 little-endian (8 bytes), the
/// checksum (32 bytes), then the body bytes. A transport with its own framing (a protobuf
/// message, say) can carry the three fields separately instead; the checksum covers `seq` and
/// `body` either way, so a flipped bit anywhere is caught by [`verify`](Self::verify) and the
/// chunk can be re-requested by `seq`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaChunk {
    /// Position in the stream, from 0.
    pub seq: u64,
    /// Postcard encoding of a [`ChunkBody`].
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Checksum over `seq` and `body`.
    pub checksum: ChunkChecksum,
}

impl std::fmt::Debug for DeltaChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaChunk")
            .field("seq", &self.seq)
            .field("body_len", &self.body.len())
            .field("checksum", &self.checksum)
            .finish()
    }
}

/// A chunk that must not be applied.
#[derive(Debug, thiserror::Error)]
pub enum CorruptChunk {
    /// Wire bytes shorter than the envelope.
    #[error("chunk bytes are truncated ({len_bytes} bytes)")]
    Truncated {
        /// Length received, in bytes.
        len_bytes: usize,
    },
    /// The checksum does not match `seq` and `body`.
    #[error("chunk {seq} fails its checksum")]
    ChecksumMismatch {
        /// Sequence number as received.
        seq: u64,
    },
    /// The checksum matched but the body does not decode (a sender bug, or an invalid path).
    #[error("chunk {seq} body does not decode")]
    Undecodable {
        /// Sequence number.
        seq: u64,
        /// Decoder error.
        #[source]
        source: postcard::Error,
    },
    /// The body names another sequence number than the envelope.
    #[error("chunk {seq} holds the body of chunk {body_seq}")]
    SeqMismatch {
        /// Envelope sequence number.
        seq: u64,
        /// Body sequence number.
        body_seq: u64,
    },
}

impl DeltaChunk {
    /// Encodes `body` and checksums it.
    ///
    /// # Errors
    /// [`ChunkError::Encode`] if postcard cannot encode the body (not expected for these types).
    pub fn seal(body: &ChunkBody) -> Result<Self, ChunkError> {
        let bytes = postcard::to_stdvec(body).map_err(|source| ChunkError::Encode {
            seq: body.seq,
            source,
        })?;
        Ok(Self {
            seq: body.seq,
            checksum: ChunkChecksum::of(body.seq, &bytes),
            body: bytes,
        })
    }

    /// Checks the checksum; nothing else is read.
    ///
    /// # Errors
    /// [`CorruptChunk::ChecksumMismatch`].
    pub fn verify(&self) -> Result<(), CorruptChunk> {
        if ChunkChecksum::of(self.seq, &self.body) == self.checksum {
            Ok(())
        } else {
            Err(CorruptChunk::ChecksumMismatch { seq: self.seq })
        }
    }

    /// Verifies, then decodes the body.
    ///
    /// # Errors
    /// [`CorruptChunk`]: checksum mismatch, undecodable body, or sequence numbers disagreeing.
    pub fn open(&self) -> Result<ChunkBody, CorruptChunk> {
        self.verify()?;
        let body: ChunkBody =
            postcard::from_bytes(&self.body).map_err(|source| CorruptChunk::Undecodable {
                seq: self.seq,
                source,
            })?;
        if body.seq != self.seq {
            return Err(CorruptChunk::SeqMismatch {
                seq: self.seq,
                body_seq: body.seq,
            });
        }
        Ok(body)
    }

    /// Length of [`to_bytes`](Self::to_bytes)' output: what this chunk costs on the wire.
    pub fn encoded_len(&self) -> usize {
        ENVELOPE_BYTES + self.body.len()
    }

    /// The wire form described on [`DeltaChunk`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.checksum.0);
        out.extend_from_slice(&self.body);
        out
    }

    /// Parses the wire form. Only the envelope is checked here; call
    /// [`verify`](Self::verify) or [`open`](Self::open) before trusting it.
    ///
    /// # Errors
    /// [`CorruptChunk::Truncated`] when `bytes` is shorter than the envelope.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CorruptChunk> {
        if bytes.len() < ENVELOPE_BYTES {
            return Err(CorruptChunk::Truncated {
                len_bytes: bytes.len(),
            });
        }
        let (seq, rest) = bytes.split_at(8);
        let (checksum, body) = rest.split_at(32);
        let mut seq_bytes = [0u8; 8];
        seq_bytes.copy_from_slice(seq);
        let mut sum = [0u8; 32];
        sum.copy_from_slice(checksum);
        Ok(Self {
            seq: u64::from_le_bytes(seq_bytes),
            body: body.to_vec(),
            checksum: ChunkChecksum(sum),
        })
    }
}

/// Counters of one delta, filled in as chunks are produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeltaSummary {
    /// Blocks the new index describes.
    pub blocks_scanned: u64,
    /// Bytes the new index describes (image length, or distinct file bytes).
    pub bytes_scanned: u64,
    /// Blocks shipped as data.
    pub blocks_changed: u64,
    /// Blocks zeroed by op (no data shipped).
    pub blocks_zeroed: u64,
    /// Data bytes shipped, before compression.
    pub payload_raw_bytes: u64,
    /// Data bytes shipped, after compression.
    pub payload_compressed_bytes: u64,
    /// Chunks produced so far.
    pub chunks: u64,
    /// Serialised chunk bytes produced so far (envelopes, ops and data): the bytes on the wire.
    pub wire_bytes: u64,
}

impl DeltaSummary {
    /// `wire_bytes / bytes_scanned` (0 for an empty volume).
    pub fn wire_ratio(&self) -> f64 {
        if self.bytes_scanned == 0 {
            0.0
        } else {
            self.wire_bytes as f64 / self.bytes_scanned as f64
        }
    }
}

/// Failures while producing chunks.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The options do not fit the plan.
    #[error("checking chunk options")]
    Options {
        /// What is wrong.
        #[source]
        source: InvalidChunkOptions,
    },
    /// The snapshot is an image and the plan a tree, or the reverse.
    #[error("plan for a {plan:?} applied to a {snapshot:?} snapshot")]
    KindMismatch {
        /// The plan's kind.
        plan: VolumeKind,
        /// The snapshot's kind.
        snapshot: VolumeKind,
    },
    /// Opening a source file failed.
    #[error("opening source {path}")]
    OpenSource {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading source bytes failed (including a file shorter than scanned).
    #[error("reading source block at byte {offset_bytes} of {path}")]
    ReadSource {
        /// The file.
        path: PathBuf,
        /// Offset of the read, in bytes.
        offset_bytes: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// zstd failed.
    #[error("compressing block at byte {offset_bytes} of {path}")]
    Compress {
        /// The file.
        path: PathBuf,
        /// Offset of the extent, in bytes.
        offset_bytes: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Encoding a body failed.
    #[error("encoding chunk {seq}")]
    Encode {
        /// The chunk.
        seq: u64,
        /// Cause.
        #[source]
        source: postcard::Error,
    },
    /// One op alone exceeds the body bound (a path or symlink target of about a MiB).
    #[error("encoding chunk {seq}: one record of {record_bytes} bytes exceeds the {max_body_bytes}-byte bound")]
    RecordTooLarge {
        /// The chunk.
        seq: u64,
        /// The record's encoded size, in bytes.
        record_bytes: usize,
        /// The bound, in bytes.
        max_body_bytes: usize,
    },
}

impl ChunkError {
    /// Stable, low-cardinality label for metrics and Events.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ChunkError::Options { .. } => "options",
            ChunkError::KindMismatch { .. } => "kind_mismatch",
            ChunkError::OpenSource { .. } => "open_source",
            ChunkError::ReadSource { .. } => "read_source",
            ChunkError::Compress { .. } => "compress",
            ChunkError::Encode { .. } => "encode",
            ChunkError::RecordTooLarge { .. } => "record_too_large",
        }
    }
}

/// Where a copy step has got to.
struct CopyCursor<'a> {
    file: &'a FileRef,
    next_offset: u64,
    end_offset: u64,
}

/// The chunks of one plan, produced lazily: an iterator yielding `Result<DeltaChunk, _>`.
///
/// Reads source data only for the plan's copy ranges, one extent at a time, so memory stays
/// around one chunk body whatever the volume size. Sequence numbers start at 0 and the last
/// chunk carries a [`StreamEnd`]; an empty plan still yields that one chunk. After an error
/// the iterator ends.
pub struct ChunkStream<'a> {
    plan: &'a DeltaPlan,
    source: PathBuf,
    options: ChunkOptions,
    next_step: usize,
    cursor: Option<CopyCursor<'a>>,
    pending: Option<(Record, usize)>,
    seq: u64,
    finished: bool,
    open: Option<(&'a FileRef, File)>,
    compressor: zstd::bulk::Compressor<'static>,
    read_buf: Vec<u8>,
    summary: DeltaSummary,
}

impl std::fmt::Debug for ChunkStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStream")
            .field("stream", &self.plan.stream)
            .field("seq", &self.seq)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl<'a> ChunkStream<'a> {
    /// Prepares to stream `plan`, reading data from `source` (the snapshot that was scanned).
    ///
    /// # Errors
    /// [`ChunkError::Options`] for options that do not fit the plan's block size,
    /// [`ChunkError::KindMismatch`], or [`ChunkError::Compress`] if zstd cannot start.
    pub fn new(
        plan: &'a DeltaPlan,
        source: &VolumeSnapshot,
        options: ChunkOptions,
    ) -> Result<Self, ChunkError> {
        options
            .validate(plan.block_size)
            .map_err(|source| ChunkError::Options { source })?;
        if source.kind() != plan.kind {
            return Err(ChunkError::KindMismatch {
                plan: plan.kind,
                snapshot: source.kind(),
            });
        }
        let compressor =
            zstd::bulk::Compressor::new(options.zstd_level).map_err(|e| ChunkError::Compress {
                path: source.path().to_path_buf(),
                offset_bytes: 0,
                source: e,
            })?;
        Ok(Self {
            plan,
            source: source.path().to_path_buf(),
            options,
            next_step: 0,
            cursor: None,
            pending: None,
            seq: 0,
            finished: false,
            open: None,
            compressor,
            read_buf: Vec::new(),
            summary: DeltaSummary {
                blocks_scanned: plan.stats.blocks_scanned,
                bytes_scanned: plan.stats.bytes_scanned,
                blocks_changed: plan.stats.blocks_changed,
                blocks_zeroed: plan.stats.blocks_zeroed,
                ..DeltaSummary::default()
            },
        })
    }

    /// Counters so far; final once the iterator has returned `None`.
    pub fn summary(&self) -> DeltaSummary {
        self.summary
    }

    fn source_path(&self, file: &FileRef) -> PathBuf {
        match file {
            FileRef::Image => self.source.clone(),
            FileRef::Path(path) => path.under(&self.source),
        }
    }

    /// The next record and its encoded size, or `None` when the plan is exhausted.
    fn next_record(&mut self) -> Result<Option<(Record, usize)>, ChunkError> {
        loop {
            if let Some(cursor) = &mut self.cursor {
                if cursor.next_offset < cursor.end_offset {
                    let (file, offset) = (cursor.file, cursor.next_offset);
                    let len =
                        (cursor.end_offset - offset).min(u64::from(self.options.extent_max_bytes));
                    cursor.next_offset += len;
                    // `len` is at most `extent_max_bytes`, a u32.
                    let record = self.read_extent(file, offset, len as u32)?;
                    let size = record_size(&record, self.seq)?;
                    return Ok(Some((record, size)));
                }
                self.cursor = None;
            }
            let plan = self.plan;
            let Some(step) = plan.steps.get(self.next_step) else {
                return Ok(None);
            };
            self.next_step += 1;
            match step {
                Step::Op(op) => {
                    let record = Record::Op(op.clone());
                    let size = record_size(&record, self.seq)?;
                    return Ok(Some((record, size)));
                }
                Step::Copy {
                    file,
                    offset_bytes,
                    len_bytes,
                } => {
                    self.cursor = Some(CopyCursor {
                        file,
                        next_offset: *offset_bytes,
                        end_offset: offset_bytes.saturating_add(*len_bytes),
                    });
                }
            }
        }
    }

    /// Reads and compresses `len` bytes at `offset` of `file_ref`.
    fn read_extent(
        &mut self,
        file_ref: &'a FileRef,
        offset: u64,
        len: u32,
    ) -> Result<Record, ChunkError> {
        let path = self.source_path(file_ref);
        // Consecutive extents mostly come from one file: keep it open between calls.
        let file = match self.open.take() {
            Some((open, file)) if open == file_ref => file,
            _ => File::open(&path).map_err(|source| ChunkError::OpenSource {
                path: path.clone(),
                source,
            })?,
        };
        let len = len as usize;
        self.read_buf.resize(len, 0);
        let read = file.read_exact_at(&mut self.read_buf, offset);
        self.open = Some((file_ref, file));
        read.map_err(|source| ChunkError::ReadSource {
            path: path.clone(),
            offset_bytes: offset,
            source,
        })?;
        let compressed =
            self.compressor
                .compress(&self.read_buf)
                .map_err(|source| ChunkError::Compress {
                    path: path.clone(),
                    offset_bytes: offset,
                    source,
                })?;
        let (codec, data) = if compressed.len() < len {
            (Codec::Zstd, compressed)
        } else {
            (Codec::Raw, self.read_buf.clone())
        };
        self.summary.payload_raw_bytes += len as u64;
        self.summary.payload_compressed_bytes += data.len() as u64;
        Ok(Record::Extent(Extent {
            file: file_ref.clone(),
            offset_bytes: offset,
            raw_len_bytes: len as u32,
            codec,
            data,
        }))
    }

    fn build_chunk(&mut self) -> Result<DeltaChunk, ChunkError> {
        let seq = self.seq;
        let limit = self.options.max_body_bytes - BODY_OVERHEAD_BYTES;
        let mut records = Vec::new();
        let mut used = 0usize;
        let mut exhausted = false;
        loop {
            let next = match self.pending.take() {
                Some(pending) => Some(pending),
                None => self.next_record()?,
            };
            let Some((record, size)) = next else {
                exhausted = true;
                break;
            };
            if size > limit {
                return Err(ChunkError::RecordTooLarge {
                    seq,
                    record_bytes: size,
                    max_body_bytes: self.options.max_body_bytes,
                });
            }
            if used + size > limit {
                self.pending = Some((record, size));
                break;
            }
            used += size;
            records.push(record);
        }
        let end = exhausted.then(|| StreamEnd {
            chunk_count: seq + 1,
            kind: self.plan.kind,
            block_size: self.plan.block_size,
            target_digest: self.plan.target_digest,
        });
        let body = ChunkBody {
            stream: self.plan.stream,
            seq,
            records,
            end,
        };
        let chunk = DeltaChunk::seal(&body)?;
        debug_assert!(chunk.body.len() <= self.options.max_body_bytes);
        self.finished = exhausted;
        self.seq += 1;
        self.summary.chunks += 1;
        self.summary.wire_bytes += chunk.encoded_len() as u64;
        tracing::trace!(
            seq,
            records = body.records.len(),
            body_bytes = chunk.body.len(),
            last = exhausted,
            "chunk"
        );
        Ok(chunk)
    }
}

fn record_size(record: &Record, seq: u64) -> Result<usize, ChunkError> {
    postcard::experimental::serialized_size(record)
        .map_err(|source| ChunkError::Encode { seq, source })
}

impl Iterator for ChunkStream<'_> {
    type Item = Result<DeltaChunk, ChunkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let result = self.build_chunk();
        if result.is_err() {
            self.finished = true;
        }
        Some(result)
    }
}

/// Collects a whole stream; convenient when chunks are not shipped one by one.
///
/// # Errors
/// The first [`ChunkError`].
pub fn collect_chunks(
    plan: &DeltaPlan,
    source: &VolumeSnapshot,
    options: ChunkOptions,
) -> Result<(Vec<DeltaChunk>, DeltaSummary), ChunkError> {
    let mut stream = ChunkStream::new(plan, source, options)?;
    let chunks = stream.by_ref().collect::<Result<Vec<_>, _>>()?;
    Ok((chunks, stream.summary()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::diff::diff;
    use crate::delta::index::Generation;
    use crate::delta::scan::{scan, ScanOptions};

    fn image_plan(data: &[u8]) -> (tempfile::TempDir, VolumeSnapshot, DeltaPlan) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, data).unwrap();
        let snapshot = VolumeSnapshot::Image(path);
        let scanned = scan(&snapshot, &ScanOptions::default(), Generation(1)).unwrap();
        let plan = diff(None, &scanned.index);
        (dir, snapshot, plan)
    }

    fn pseudo_random(len: usize, seed: u8) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new_keyed(&[seed; 32])
            .finalize_xof()
            .fill(&mut out);
        out
    }

    #[test]
    fn chunks_respect_the_body_bound_and_end_once() {
        let data = pseudo_random(3 << 20, 1);
        let (_dir, snapshot, plan) = image_plan(&data);
        let options = ChunkOptions {
            max_body_bytes: 300 << 10,
            extent_max_bytes: 64 << 10,
            zstd_level: 3,
        };
        let (chunks, summary) = collect_chunks(&plan, &snapshot, options).unwrap();
        assert!(
            chunks.len() >= 10,
            "3 MiB of random data in {} chunks",
            chunks.len()
        );
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(
                chunk.body.len() <= options.max_body_bytes,
                "chunk {i}: {}",
                chunk.body.len()
            );
            let body = chunk.open().unwrap();
            assert_eq!(body.seq, i as u64);
            assert_eq!(
                body.end.is_some(),
                i + 1 == chunks.len(),
                "end only on the last chunk"
            );
        }
        assert_eq!(summary.payload_raw_bytes, data.len() as u64);
        assert_eq!(summary.chunks, chunks.len() as u64);
        assert_eq!(
            summary.wire_bytes,
            chunks.iter().map(|c| c.encoded_len() as u64).sum::<u64>()
        );
    }

    #[test]
    fn compressible_data_ships_compressed() {
        let data: Vec<u8> = (0..(1 << 20)).map(|i| b"ferry "[i % 6]).collect();
        let (_dir, snapshot, plan) = image_plan(&data);
        let (chunks, summary) = collect_chunks(&plan, &snapshot, ChunkOptions::default()).unwrap();
        assert!(
            summary.payload_compressed_bytes * 20 < summary.payload_raw_bytes,
            "{summary:?}"
        );
        let codecs: Vec<Codec> = chunks
            .iter()
            .flat_map(|c| c.open().unwrap().records)
            .filter_map(|r| match r {
                Record::Extent(e) => Some(e.codec),
                Record::Op(_) => None,
            })
            .collect();
        assert!(codecs.iter().all(|c| *c == Codec::Zstd), "{codecs:?}");
    }

    #[test]
    fn empty_plan_yields_one_end_chunk() {
        let (_dir, snapshot, plan) = image_plan(&[]);
        let (chunks, _) = collect_chunks(&plan, &snapshot, ChunkOptions::default()).unwrap();
        assert_eq!(chunks.len(), 1);
        let body = chunks[0].open().unwrap();
        assert_eq!(body.end.unwrap().chunk_count, 1);
        assert_eq!(body.end.unwrap().target_digest, plan.target_digest);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let data = pseudo_random(64 << 10, 2);
        let (_dir, snapshot, plan) = image_plan(&data);
        let (chunks, _) = collect_chunks(&plan, &snapshot, ChunkOptions::default()).unwrap();
        let wire = chunks[0].to_bytes();
        assert_eq!(DeltaChunk::from_bytes(&wire).unwrap(), chunks[0]);
        // Every position: seq, checksum and body bytes alike.
        for at in (0..wire.len())
            .step_by(97)
            .chain([0, 7, 8, 39, 40, wire.len() - 1])
        {
            let mut bad = wire.clone();
            bad[at] ^= 0x10;
            let chunk = DeltaChunk::from_bytes(&bad).unwrap();
            assert!(chunk.verify().is_err(), "flip at byte {at} went unnoticed");
            assert!(chunk.open().is_err(), "flip at byte {at} decoded");
        }
        assert!(matches!(
            DeltaChunk::from_bytes(&wire[..20]),
            Err(CorruptChunk::Truncated { len_bytes: 20 })
        ));
    }

    #[test]
    fn options_validation_table() {
        let bs = BlockSize::new(4096).unwrap();
        let base = ChunkOptions::default();
        let cases = [
            ("defaults", base, true),
            (
                "extent not a block multiple",
                ChunkOptions {
                    extent_max_bytes: 6000,
                    ..base
                },
                false,
            ),
            (
                "zero extent",
                ChunkOptions {
                    extent_max_bytes: 0,
                    ..base
                },
                false,
            ),
            (
                "extent above the receivers' bound",
                ChunkOptions {
                    max_body_bytes: 64 << 20,
                    extent_max_bytes: 32 << 20,
                    ..base
                },
                false,
            ),
            (
                "body smaller than an extent",
                ChunkOptions {
                    max_body_bytes: 200 << 10,
                    ..base
                },
                false,
            ),
            (
                "level 0",
                ChunkOptions {
                    zstd_level: 0,
                    ..base
                },
                false,
            ),
            (
                "level 3",
                ChunkOptions {
                    zstd_level: 3,
                    ..base
                },
                true,
            ),
        ];
        for (name, options, ok) in cases {
            assert_eq!(options.validate(bs).is_ok(), ok, "{name}");
        }
    }

    #[test]
    fn kind_mismatch_is_refused() {
        let (dir, _snapshot, plan) = image_plan(b"abc");
        let err = ChunkStream::new(
            &plan,
            &VolumeSnapshot::Tree(dir.path().to_path_buf()),
            ChunkOptions::default(),
        )
        .unwrap_err();
        assert_eq!(err.metric_label(), "kind_mismatch");
    }
}
