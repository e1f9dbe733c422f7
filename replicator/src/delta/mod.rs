//! Volume deltas: hash a volume snapshot into a block index, diff it against the index of the
//! generation the destination last committed, and stream only what changed as checksummed,
//! size-bounded chunks that the destination applies idempotently.
//!
//! A volume is a block image (`volumeMode: Block`) or a file tree (`volumeMode: Filesystem`).
//! Both are cut into fixed blocks (4 KiB by default) hashed with BLAKE3; only blocks whose hash
//! changed are shipped, zstd-compressed (RFC 8878). For trees the metadata travels as ops:
//! mkdir, remove, rename, symlink, hard link, owner/mode/mtime. All-zero blocks are never
//! shipped, so holes stay holes.
//!
//! This module does not talk to the network, decide when to sync, or commit: the ship, stage
//! and commit stages do. It has one seam with them, the [`DeltaChunk`], which serialises with
//! serde and carries its own checksum.
//!
//! # Walkthrough: one sync of one volume
//!
//! Source side, generation `g` of volume `key`:
//!
//! 1. **Load the previous index.** [`HashStore::load`] returns the index of the last
//!    generation the destination committed, or says it is missing or damaged. Both of those
//!    mean a full copy: [`LoadedIndex::into_previous`] gives `None`.
//! 2. **Scan** the snapshot with [`scan()`]: one streaming read that hashes every block into a
//!    new [`BlockIndex`] for `g`.
//! 3. **Diff** with [`diff()`]`(previous, &new)`: a [`DeltaPlan`] listing ops and byte ranges to
//!    copy, from base `previous.generation` (or `None`) to `g`. The first sync is exactly this
//!    path with `previous = None`.
//! 4. **Stream** with [`ChunkStream`]: it reads only the planned ranges, compresses them and
//!    yields [`DeltaChunk`]s of at most [`ChunkOptions::max_body_bytes`], numbered from 0; the
//!    last one carries the new index's digest. Hand each to the transport as it comes.
//!
//! Destination side:
//!
//! 5. **Apply** with an [`Applier`] opened on the staging copy (which holds the base
//!    generation, or anything at all for a full copy) for the plan's [`StreamId`]. Each chunk
//!    is verified before anything in it is applied: on [`ApplyError::ChunkCorrupt`] re-request
//!    that chunk. After an interruption, resume by re-sending from [`Applier::next_seq`] (or
//!    earlier): re-applied chunks are harmless as long as every chunk after them follows.
//! 6. **Finish** with [`Applier::finish`]: checks the last chunk was applied, fsyncs, and
//!    (optionally) rescans the staging copy and compares its digest with the stream's.
//! 7. The commit stage promotes the staged generation and acknowledges it.
//!
//! Back on the source:
//!
//! 8. **Only after that acknowledgement**, [`HashStore::save`] the new index (it flushes before
//!    returning). If the sync fails anywhere before, the stored index still describes the
//!    destination's committed generation, and the next sync diffs against it again.
//!
//! ```
//! use ferry_replicator::delta::{
//!     collect_chunks, diff, scan, Applier, ChunkOptions, FinishOptions, Generation,
//!     HashStore, ScanOptions, VolumeKey, VolumeSnapshot,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let source = dir.path().join("source.img");
//! let staging = dir.path().join("staging.img");
//! std::fs::write(&source, vec![7u8; 64 * 1024])?;
//!
//! let store = HashStore::open(dir.path().join("hashes"))?;
//! let key = VolumeKey::new("shop", "data");
//! let snapshot = VolumeSnapshot::Image(source.clone());
//! for generation in [Generation(1), Generation(2)] {
//!     if generation == Generation(2) {
//!         // The app writes one byte: one 4 KiB block changes.
//!         let mut data = std::fs::read(&source)?;
//!         data[20_000] = 1;
//!         std::fs::write(&source, data)?;
//!     }
//!     // 1–3: previous index, scan, diff.
//!     let previous = store.load(&key)?.into_previous();
//!     let scanned = scan(&snapshot, &ScanOptions::default(), generation)?;
//!     let plan = diff(previous.as_ref(), &scanned.index);
//!     // 4–6: chunks to the destination, applied and verified there.
//!     let (chunks, summary) = collect_chunks(&plan, &snapshot, ChunkOptions::default())?;
//!     let mut applier = Applier::open(&staging, plan.kind, plan.stream)?;
//!     for chunk in &chunks {
//!         applier.apply(chunk)?;
//!     }
//!     applier.finish(FinishOptions::default())?;
//!     // 8: the destination committed; only now does the index move forward.
//!     store.save(&key, &scanned.index)?;
//!     if generation == Generation(2) {
//!         assert_eq!(summary.blocks_changed, 1);
//!     }
//! }
//! assert_eq!(std::fs::read(&staging)?, std::fs::read(&source)?);
//! # Ok(())
//! # }
//! ```
//!
//! # Invariants
//!
//! - A stored index describes a generation the destination has committed, never one in
//!   flight; the source saves it only after the commit is acknowledged.
//! - A missing, damaged (fails its checksum) or mismatched (other block size or volume kind)
//!   index means a full copy, through the same scan → diff → chunk → apply path.
//! - A chunk is applied entirely after its checksum verifies, or not at all before. Ops set
//!   state rather than change it, so re-applying a suffix of the stream converges.
//! - A plan's order: for trees, creates go parents before children and deletes children
//!   before parents; metadata comes last, children before parents.

pub mod apply;
pub mod chunk;
pub mod diff;
pub mod index;
pub mod relpath;
pub mod scan;

// The ship and stage stages drive these from worker threads.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Applier>();
    assert_send::<ChunkStream<'static>>();
    assert_send::<HashStore>();
};

pub use apply::{Applier, ApplyError, ApplyReport, FinishOptions};
pub use chunk::{
    collect_chunks, ChunkBody, ChunkChecksum, ChunkError, ChunkOptions, ChunkStream, Codec,
    CorruptChunk, DeltaChunk, DeltaSummary, Extent, InvalidChunkOptions, Record, StreamEnd,
};
pub use diff::{diff, DeltaPlan, FileRef, Op, PlanStats, Step, StreamId};
pub use index::{
    BlockHash, BlockIndex, BlockSize, EntryKind, FileEntry, Generation, HashStore, ImageIndex,
    IndexContent, IndexDamage, IndexError, InvalidBlockSize, LoadedIndex, Meta, Mtime,
    SymlinkTarget, TreeEntry, TreeIndex, VolumeDigest, VolumeKey, VolumeKind,
    DEFAULT_BLOCK_SIZE_BYTES,
};
pub use relpath::{InvalidRelPath, RelPath, STASH_DIR_NAME};
pub use scan::{
    scan, scan_against, scan_changed, ChangedScanError, QuickCheck, ScanError, ScanOptions,
    ScanStats, Scanned, VolumeSnapshot,
};
