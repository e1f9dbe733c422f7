//! Applying: write verified chunks into a target image or tree, idempotently, then verify it.
//!
//! Every op sets state instead of changing it relatively (write these bytes here, make this
//! path a symlink to that, remove this path if it is a directory), and renames go through a
//! stash directory that is only moved out of, so re-applying any suffix of an already applied
//! prefix of a stream converges to the same result. That is the resume contract: after an
//! interruption the source re-sends from [`Applier::next_seq`] (or earlier) and every chunk
//! after it.
//!
//! Paths are joined lexically under the target; symlinks inside the target are not resolved
//! specially, so a target must only be written by this applier (it is the destination's
//! staging copy).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::chunk::{Codec, CorruptChunk, DeltaChunk, Extent, Record, StreamEnd, MAX_EXTENT_BYTES};
use super::diff::{FileRef, Op, StreamId};
use super::index::{BlockIndex, EntryKind, Meta, VolumeDigest, VolumeKind};
use super::relpath::{RelPath, STASH_DIR_NAME};
use super::scan::{scan, ScanError, ScanOptions, VolumeSnapshot};

/// What [`Applier::finish`] does besides checking the stream is complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinishOptions {
    /// Rescan the target and compare its digest with the stream's (costs one full read).
    pub verify: bool,
    /// fsync what was written (files, then their directories) so it survives a crash.
    pub sync: bool,
}

impl Default for FinishOptions {
    fn default() -> Self {
        Self {
            verify: true,
            sync: true,
        }
    }
}

/// What [`Applier::finish`] reports.
#[derive(Clone, Debug)]
pub struct ApplyReport {
    /// Chunks applied, re-applied ones included.
    pub chunks_applied: u64,
    /// The target's digest when verification ran (then equal to the stream's).
    pub verified_digest: Option<VolumeDigest>,
    /// The target's block index when verification ran: the index of the new generation, which
    /// a site that later ships this volume back can diff against.
    pub verified_index: Option<BlockIndex>,
}

/// Failures while applying; each names the step and the object.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Opening or creating the target failed.
    #[error("opening target {path}")]
    OpenTarget {
        /// The target.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The target is neither a regular file (images) nor a directory (trees).
    #[error("target {path} is not a regular file or directory as its volume kind needs")]
    UnsupportedTarget {
        /// The target.
        path: PathBuf,
    },
    /// The chunk failed verification; nothing from it was applied. Re-request it.
    #[error("verifying chunk {seq}")]
    ChunkCorrupt {
        /// The chunk.
        seq: u64,
        /// What is wrong.
        #[source]
        source: CorruptChunk,
    },
    /// A chunk arrived past the next expected one; nothing from it was applied.
    #[error("applying chunk {seq}: chunks up to {next_seq} were expected")]
    OutOfOrder {
        /// The chunk.
        seq: u64,
        /// The highest sequence number acceptable now.
        next_seq: u64,
    },
    /// The chunk belongs to another stream (other generations); nothing was applied.
    #[error("applying chunk {seq}: it belongs to stream {found:?}, not {expected:?}")]
    WrongStream {
        /// The chunk.
        seq: u64,
        /// The stream this applier was opened for.
        expected: StreamId,
        /// The chunk's stream.
        found: StreamId,
    },
    /// A record does not fit the target (an image op for a tree, a file op on the root...);
    /// nothing from the chunk was applied.
    #[error("applying chunk {seq}: record {record} does not apply to a {target:?} target")]
    RecordNotApplicable {
        /// The chunk.
        seq: u64,
        /// Position of the record in the chunk.
        record: usize,
        /// The target's kind.
        target: VolumeKind,
    },
    /// Truncating or extending a file failed.
    #[error("resizing {path} to {size_bytes} bytes")]
    Resize {
        /// The file.
        path: PathBuf,
        /// Requested length.
        size_bytes: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Clearing the tree before a full copy failed.
    #[error("clearing {path} before a full copy")]
    ClearTree {
        /// The entry that could not be removed.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Moving a rename source into the stash failed.
    #[error("stashing {path} for a rename")]
    Stash {
        /// The rename source.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Moving a stashed file to its new path failed.
    #[error("moving stashed file to {path}")]
    Unstash {
        /// The rename target.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Removing an entry failed.
    #[error("removing {path}")]
    Remove {
        /// The entry.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Creating a directory failed.
    #[error("creating directory {path}")]
    Mkdir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Creating a file failed.
    #[error("creating file {path}")]
    CreateFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Opening a file to update failed.
    #[error("opening {path} for update")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A file the delta updates in place is missing or of another kind: the target does not
    /// hold the stream's base generation. Apply a full copy instead.
    #[error("updating {path}: the target does not hold the base generation")]
    MissingBase {
        /// The file or entry.
        path: PathBuf,
    },
    /// Writing block data failed.
    #[error("writing block at byte {offset_bytes} of {path}")]
    WriteBlock {
        /// The file.
        path: PathBuf,
        /// Offset, in bytes.
        offset_bytes: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Zeroing (punching) a range failed.
    #[error("zeroing {len_bytes} bytes at byte {offset_bytes} of {path}")]
    ZeroRange {
        /// The file.
        path: PathBuf,
        /// Offset, in bytes.
        offset_bytes: u64,
        /// Length, in bytes.
        len_bytes: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Decompressing an extent failed.
    #[error("decompressing block at byte {offset_bytes} of {path}")]
    Decompress {
        /// The file.
        path: PathBuf,
        /// Offset, in bytes.
        offset_bytes: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An extent declares more than [`MAX_EXTENT_BYTES`] (a sender bug); nothing is allocated.
    #[error("decoding block at byte {offset_bytes} of {path}: {raw_len_bytes} bytes declared, above the limit")]
    ExtentTooLarge {
        /// The file.
        path: PathBuf,
        /// Offset, in bytes.
        offset_bytes: u64,
        /// Declared length, in bytes.
        raw_len_bytes: u32,
    },
    /// An extent decoded to another length than it declares (a sender bug).
    #[error("decoding block at byte {offset_bytes} of {path}: {actual_bytes} bytes, {expected_bytes} declared")]
    ExtentLength {
        /// The file.
        path: PathBuf,
        /// Offset, in bytes.
        offset_bytes: u64,
        /// Declared length, in bytes.
        expected_bytes: u64,
        /// Decoded length, in bytes.
        actual_bytes: u64,
    },
    /// Creating a symlink failed.
    #[error("creating symlink {path}")]
    Symlink {
        /// The link.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Creating a hard link failed.
    #[error("creating hard link {path}")]
    HardLink {
        /// The new name.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Setting owner, mode or mtime failed.
    #[error("setting metadata of {path}")]
    SetMeta {
        /// The entry.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// [`Applier::finish`] before the last chunk was applied, or after re-applying an earlier
    /// chunk without the ones following it.
    #[error("finishing stream: next chunk is {next_seq}, stream has {chunk_count:?} chunks")]
    StreamIncomplete {
        /// The sequence number expected next.
        next_seq: u64,
        /// Chunk count, if the last chunk was seen.
        chunk_count: Option<u64>,
    },
    /// fsync failed.
    #[error("syncing {path}")]
    Sync {
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Rescanning the target for verification failed.
    #[error("rescanning target for verification")]
    Verify {
        /// Cause.
        #[source]
        source: ScanError,
    },
    /// The target's digest differs from the stream's: the target is not the new generation.
    #[error("verifying target: digest {actual} differs from expected {expected}")]
    VerifyMismatch {
        /// The stream's digest.
        expected: VolumeDigest,
        /// The target's.
        actual: VolumeDigest,
    },
}

impl ApplyError {
    /// Stable, low-cardinality label for metrics and Events.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ApplyError::OpenTarget { .. } => "open_target",
            ApplyError::UnsupportedTarget { .. } => "unsupported_target",
            ApplyError::ChunkCorrupt { .. } => "chunk_corrupt",
            ApplyError::OutOfOrder { .. } => "out_of_order",
            ApplyError::WrongStream { .. } => "wrong_stream",
            ApplyError::RecordNotApplicable { .. } => "record_not_applicable",
            ApplyError::Resize { .. } => "resize",
            ApplyError::ClearTree { .. } => "clear_tree",
            ApplyError::Stash { .. } => "stash",
            ApplyError::Unstash { .. } => "unstash",
            ApplyError::Remove { .. } => "remove",
            ApplyError::Mkdir { .. } => "mkdir",
            ApplyError::CreateFile { .. } => "create_file",
            ApplyError::OpenFile { .. } => "open_file",
            ApplyError::MissingBase { .. } => "missing_base",
            ApplyError::WriteBlock { .. } => "write_block",
            ApplyError::ZeroRange { .. } => "zero_range",
            ApplyError::Decompress { .. } => "decompress",
            ApplyError::ExtentTooLarge { .. } => "extent_too_large",
            ApplyError::ExtentLength { .. } => "extent_length",
            ApplyError::Symlink { .. } => "symlink",
            ApplyError::HardLink { .. } => "hard_link",
            ApplyError::SetMeta { .. } => "set_meta",
            ApplyError::StreamIncomplete { .. } => "stream_incomplete",
            ApplyError::Sync { .. } => "sync",
            ApplyError::Verify { .. } => "verify",
            ApplyError::VerifyMismatch { .. } => "verify_mismatch",
        }
    }
}

/// Applies the chunks of one stream to one target, in order.
///
/// Accepts any chunk up to [`next_seq`](Self::next_seq): earlier ones are re-applied
/// harmlessly (a resumed stream re-sends), later ones are refused. Each chunk is verified
/// before anything in it is applied.
pub struct Applier {
    target: PathBuf,
    kind: VolumeKind,
    stream: StreamId,
    next_seq: u64,
    last_applied: Option<u64>,
    end: Option<StreamEnd>,
    image: Option<File>,
    open: Option<(RelPath, File)>,
    decompressor: zstd::bulk::Decompressor<'static>,
    dirty_files: BTreeSet<PathBuf>,
    dirty_dirs: BTreeSet<PathBuf>,
    chunks_applied: u64,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("target", &self.target)
            .field("kind", &self.kind)
            .field("stream", &self.stream)
            .field("next_seq", &self.next_seq)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl Applier {
    /// Opens `target` to receive `stream`: an image file (created empty if missing) or a tree
    /// root directory (created if missing).
    ///
    /// # Errors
    /// [`ApplyError::OpenTarget`], or [`ApplyError::UnsupportedTarget`] when the target exists
    /// as something else (block devices are not supported yet).
    pub fn open(
        target: impl Into<PathBuf>,
        kind: VolumeKind,
        stream: StreamId,
    ) -> Result<Self, ApplyError> {
        let target = target.into();
        let open_err = |source| ApplyError::OpenTarget {
            path: target.clone(),
            source,
        };
        let image = match kind {
            VolumeKind::BlockImage => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&target)
                    .map_err(open_err)?;
                if !file.metadata().map_err(open_err)?.is_file() {
                    return Err(ApplyError::UnsupportedTarget { path: target });
                }
                Some(file)
            }
            VolumeKind::FileTree => {
                fs::create_dir_all(&target).map_err(open_err)?;
                if !fs::symlink_metadata(&target).map_err(open_err)?.is_dir() {
                    return Err(ApplyError::UnsupportedTarget { path: target });
                }
                None
            }
        };
        let decompressor = zstd::bulk::Decompressor::new().map_err(open_err)?;
        Ok(Self {
            target,
            kind,
            stream,
            next_seq: 0,
            last_applied: None,
            end: None,
            image,
            open: None,
            decompressor,
            dirty_files: BTreeSet::new(),
            dirty_dirs: BTreeSet::new(),
            chunks_applied: 0,
        })
    }

    /// The highest sequence number acceptable now: one past the highest applied. A resumed
    /// stream re-sends from here (or earlier).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The stream this applier accepts.
    pub fn stream(&self) -> StreamId {
        self.stream
    }

    /// Verifies `chunk` and applies its records.
    ///
    /// # Errors
    /// Before anything is applied: [`ApplyError::ChunkCorrupt`] (re-request the chunk),
    /// [`ApplyError::OutOfOrder`], [`ApplyError::WrongStream`],
    /// [`ApplyError::RecordNotApplicable`]. While applying: the variant naming the failed
    /// step; the target may then be partly updated, and re-applying from this chunk on is
    /// safe.
    #[tracing::instrument(name = "delta", skip_all, fields(step = "apply", seq = chunk.seq, generation = self.stream.generation.0))]
    pub fn apply(&mut self, chunk: &DeltaChunk) -> Result<(), ApplyError> {
        let seq = chunk.seq;
        let body = chunk
            .open()
            .map_err(|source| ApplyError::ChunkCorrupt { seq, source })?;
        if seq > self.next_seq {
            return Err(ApplyError::OutOfOrder {
                seq,
                next_seq: self.next_seq,
            });
        }
        if body.stream != self.stream {
            return Err(ApplyError::WrongStream {
                seq,
                expected: self.stream,
                found: body.stream,
            });
        }
        for (i, record) in body.records.iter().enumerate() {
            if !self.applicable(record) {
                return Err(ApplyError::RecordNotApplicable {
                    seq,
                    record: i,
                    target: self.kind,
                });
            }
        }
        if body.end.is_some_and(|end| end.kind != self.kind) {
            return Err(ApplyError::RecordNotApplicable {
                seq,
                record: body.records.len(),
                target: self.kind,
            });
        }
        for record in body.records {
            match record {
                Record::Op(op) => self.apply_op(op)?,
                Record::Extent(extent) => self.apply_extent(extent)?,
            }
        }
        if let Some(end) = body.end {
            self.end = Some(end);
        }
        self.last_applied = Some(seq);
        self.next_seq = self.next_seq.max(seq.saturating_add(1));
        self.chunks_applied += 1;
        Ok(())
    }

    /// Checks the whole stream was applied, then optionally syncs and verifies the target.
    ///
    /// # Errors
    /// [`ApplyError::StreamIncomplete`] unless the last chunk applied was the stream's last;
    /// [`ApplyError::Sync`]; [`ApplyError::Verify`] or [`ApplyError::VerifyMismatch`].
    #[tracing::instrument(name = "delta", skip_all, fields(step = "finish", generation = self.stream.generation.0))]
    pub fn finish(mut self, options: FinishOptions) -> Result<ApplyReport, ApplyError> {
        let incomplete = ApplyError::StreamIncomplete {
            next_seq: self.next_seq,
            chunk_count: self.end.map(|end| end.chunk_count),
        };
        let Some(end) = self.end else {
            return Err(incomplete);
        };
        let last_seq = end.chunk_count.checked_sub(1);
        if self.next_seq != end.chunk_count || last_seq.is_none() || self.last_applied != last_seq {
            return Err(incomplete);
        }
        self.open = None;
        if options.sync {
            self.sync()?;
        }
        let verified_index = if options.verify {
            let snapshot = match self.kind {
                VolumeKind::BlockImage => VolumeSnapshot::Image(self.target.clone()),
                VolumeKind::FileTree => VolumeSnapshot::Tree(self.target.clone()),
            };
            let scanned = scan(
                &snapshot,
                &ScanOptions::new(end.block_size),
                self.stream.generation,
            )
            .map_err(|source| ApplyError::Verify { source })?;
            let actual = scanned.index.digest();
            if actual != end.target_digest {
                return Err(ApplyError::VerifyMismatch {
                    expected: end.target_digest,
                    actual,
                });
            }
            Some(scanned.index)
        } else {
            None
        };
        Ok(ApplyReport {
            chunks_applied: self.chunks_applied,
            verified_digest: verified_index.as_ref().map(|i| i.digest()),
            verified_index,
        })
    }

    fn sync(&mut self) -> Result<(), ApplyError> {
        if let Some(image) = &self.image {
            image.sync_all().map_err(|source| ApplyError::Sync {
                path: self.target.clone(),
                source,
            })?;
        }
        // Files first, then the directories naming them.
        let files = std::mem::take(&mut self.dirty_files);
        let dirs = std::mem::take(&mut self.dirty_dirs);
        for path in files.iter().chain(dirs.iter()) {
            match File::open(path) {
                Ok(file) => file.sync_all().map_err(|source| ApplyError::Sync {
                    path: path.clone(),
                    source,
                })?,
                // Removed (or its parent replaced by a file) later in the stream: nothing
                // to make durable.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) => {}
                Err(source) => {
                    return Err(ApplyError::Sync {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    fn applicable(&self, record: &Record) -> bool {
        let image_ref = |file: &FileRef| match file {
            FileRef::Image => self.kind == VolumeKind::BlockImage,
            FileRef::Path(path) => self.kind == VolumeKind::FileTree && !path.is_root(),
        };
        let tree_path = |path: &RelPath| self.kind == VolumeKind::FileTree && !path.is_root();
        match record {
            Record::Extent(extent) => image_ref(&extent.file),
            Record::Op(op) => match op {
                Op::ResetImage | Op::ResizeImage { .. } => self.kind == VolumeKind::BlockImage,
                Op::ZeroRange { file, .. } => image_ref(file),
                Op::ClearTree | Op::DropStash => self.kind == VolumeKind::FileTree,
                Op::SetMeta { .. } => self.kind == VolumeKind::FileTree,
                Op::Stash { from: path, .. }
                | Op::Unstash { to: path, .. }
                | Op::Remove { path, .. }
                | Op::Mkdir { path }
                | Op::CreateFile { path, .. }
                | Op::ResizeFile { path, .. }
                | Op::Symlink { path, .. } => tree_path(path),
                Op::HardLink { path, target } => tree_path(path) && tree_path(target),
            },
        }
    }

    fn abs(&self, path: &RelPath) -> PathBuf {
        path.under(&self.target)
    }

    fn stash_slot(&self, slot: u32) -> PathBuf {
        self.target.join(STASH_DIR_NAME).join(slot.to_string())
    }

    fn touch_parent(&mut self, abs: &Path) {
        if let Some(parent) = abs.parent() {
            self.dirty_dirs.insert(parent.to_path_buf());
        }
    }

    fn apply_op(&mut self, op: Op) -> Result<(), ApplyError> {
        // Structural ops may replace the cached file; extents reopen as needed.
        if !matches!(op, Op::ZeroRange { .. } | Op::ResizeFile { .. }) {
            self.open = None;
        }
        match op {
            Op::ResetImage => self.resize_image(0),
            Op::ResizeImage { size_bytes } => self.resize_image(size_bytes),
            Op::ClearTree => self.clear_tree(),
            Op::Stash { from, slot } => {
                let src = self.abs(&from);
                let err = |source| ApplyError::Stash {
                    path: src.clone(),
                    source,
                };
                if !lstat(&src).map_err(err)?.is_some_and(|md| md.is_file()) {
                    // Already stashed. (Renames only move regular files, and whatever else a
                    // later op of this stream put at `from` is not a regular file.)
                    return Ok(());
                }
                let stash = self.target.join(STASH_DIR_NAME);
                match fs::create_dir(&stash) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(err(e)),
                }
                fs::rename(&src, self.stash_slot(slot)).map_err(err)?;
                self.touch_parent(&src);
                Ok(())
            }
            Op::Remove { path, kind } => {
                let abs = self.abs(&path);
                let err = |source| ApplyError::Remove {
                    path: abs.clone(),
                    source,
                };
                match lstat(&abs).map_err(err)? {
                    Some(md) if kind_of(&md) == Some(kind) => {
                        if kind == EntryKind::Dir {
                            fs::remove_dir_all(&abs).map_err(err)?;
                        } else {
                            fs::remove_file(&abs).map_err(err)?;
                        }
                        self.touch_parent(&abs);
                    }
                    // Gone already, or replaced by what a later op of this stream made.
                    _ => {}
                }
                Ok(())
            }
            Op::Mkdir { path } => {
                let abs = self.abs(&path);
                match fs::create_dir(&abs) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && is_dir(&abs) => {}
                    Err(source) => return Err(ApplyError::Mkdir { path: abs, source }),
                }
                self.touch_parent(&abs);
                Ok(())
            }
            Op::Unstash { slot, to } => {
                let src = self.stash_slot(slot);
                let dst = self.abs(&to);
                let err = |source| ApplyError::Unstash {
                    path: dst.clone(),
                    source,
                };
                if lstat(&src).map_err(err)?.is_none() {
                    return Ok(()); // Already moved.
                }
                fs::rename(&src, &dst).map_err(err)?;
                self.touch_parent(&dst);
                Ok(())
            }
            Op::DropStash => {
                let stash = self.target.join(STASH_DIR_NAME);
                match fs::remove_dir_all(&stash) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(ApplyError::Remove {
                            path: stash,
                            source,
                        })
                    }
                }
                self.dirty_dirs.insert(self.target.clone());
                Ok(())
            }
            Op::CreateFile { path, size_bytes } => {
                let abs = self.abs(&path);
                let err = |source| ApplyError::CreateFile {
                    path: abs.clone(),
                    source,
                };
                if let Some(md) = lstat(&abs).map_err(err)? {
                    if !md.is_dir() {
                        // A fresh inode: hard links to the old one must not see new data.
                        fs::remove_file(&abs).map_err(err)?;
                    }
                }
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&abs)
                    .map_err(err)?;
                file.set_len(size_bytes)
                    .map_err(|source| ApplyError::Resize {
                        path: abs.clone(),
                        size_bytes,
                        source,
                    })?;
                self.touch_parent(&abs);
                self.dirty_files.insert(abs);
                self.open = Some((path, file));
                Ok(())
            }
            Op::ResizeFile { path, size_bytes } => {
                let abs = self.abs(&path);
                self.with_file(&FileRef::Path(path), |file| file.set_len(size_bytes))?
                    .map_err(|source| ApplyError::Resize {
                        path: abs,
                        size_bytes,
                        source,
                    })
            }
            Op::ZeroRange {
                file,
                offset_bytes,
                len_bytes,
            } => {
                let path = match &file {
                    FileRef::Image => self.target.clone(),
                    FileRef::Path(rel) => self.abs(rel),
                };
                self.with_file(&file, |handle| zero_range(handle, offset_bytes, len_bytes))?
                    .map_err(|source| ApplyError::ZeroRange {
                        path,
                        offset_bytes,
                        len_bytes,
                        source,
                    })
            }
            Op::Symlink { path, target } => {
                let abs = self.abs(&path);
                let err = |source| ApplyError::Symlink {
                    path: abs.clone(),
                    source,
                };
                let target = OsStr::from_bytes(&target.0);
                if let Some(md) = lstat(&abs).map_err(err)? {
                    if md.file_type().is_symlink() && fs::read_link(&abs).map_err(err)? == target {
                        return Ok(());
                    }
                    if md.is_dir() {
                        return Err(ApplyError::MissingBase { path: abs });
                    }
                    fs::remove_file(&abs).map_err(err)?;
                }
                std::os::unix::fs::symlink(target, &abs).map_err(err)?;
                self.touch_parent(&abs);
                Ok(())
            }
            Op::HardLink { path, target } => {
                let abs = self.abs(&path);
                let target_abs = self.abs(&target);
                let err = |source| ApplyError::HardLink {
                    path: abs.clone(),
                    source,
                };
                let Some(target_md) = lstat(&target_abs).map_err(err)? else {
                    return Err(ApplyError::MissingBase { path: target_abs });
                };
                if let Some(md) = lstat(&abs).map_err(err)? {
                    if (md.dev(), md.ino()) == (target_md.dev(), target_md.ino()) {
                        return Ok(());
                    }
                    if md.is_dir() {
                        return Err(ApplyError::MissingBase { path: abs });
                    }
                    fs::remove_file(&abs).map_err(err)?;
                }
                fs::hard_link(&target_abs, &abs).map_err(err)?;
                self.touch_parent(&abs);
                Ok(())
            }
            Op::SetMeta { path, kind, meta } => {
                let abs = self.abs(&path);
                set_meta(&abs, kind, &meta).map_err(|source| ApplyError::SetMeta {
                    path: abs.clone(),
                    source,
                })?;
                if kind == EntryKind::Dir {
                    self.dirty_dirs.insert(abs);
                } else {
                    self.touch_parent(&abs);
                }
                Ok(())
            }
        }
    }

    fn resize_image(&mut self, size_bytes: u64) -> Result<(), ApplyError> {
        let path = self.target.clone();
        self.with_file(&FileRef::Image, |file| file.set_len(size_bytes))?
            .map_err(|source| ApplyError::Resize {
                path,
                size_bytes,
                source,
            })
    }

    fn clear_tree(&mut self) -> Result<(), ApplyError> {
        let listing = fs::read_dir(&self.target).map_err(|source| ApplyError::ClearTree {
            path: self.target.clone(),
            source,
        })?;
        for item in listing {
            let item = item.map_err(|source| ApplyError::ClearTree {
                path: self.target.clone(),
                source,
            })?;
            let path = item.path();
            let result = match item.file_type() {
                Ok(file_type) if file_type.is_dir() => fs::remove_dir_all(&path),
                Ok(_) => fs::remove_file(&path),
                Err(e) => Err(e),
            };
            result.map_err(|source| ApplyError::ClearTree { path, source })?;
        }
        self.dirty_dirs.insert(self.target.clone());
        Ok(())
    }

    /// Runs `op` on the image, or on tree file `file` (opened for writing, and kept open for
    /// the extents that usually follow).
    ///
    /// # Errors
    /// [`ApplyError::MissingBase`] when the tree file does not exist, [`ApplyError::OpenFile`]
    /// when it cannot be opened; `op`'s own result is returned inside `Ok`.
    fn with_file<R>(
        &mut self,
        file: &FileRef,
        op: impl FnOnce(&File) -> R,
    ) -> Result<R, ApplyError> {
        let path = match file {
            FileRef::Image => {
                self.dirty_files.insert(self.target.clone());
                return match &self.image {
                    Some(image) => Ok(op(image)),
                    None => Err(ApplyError::UnsupportedTarget {
                        path: self.target.clone(),
                    }),
                };
            }
            FileRef::Path(path) => path,
        };
        let handle = match self.open.take() {
            Some((open, handle)) if open == *path => handle,
            _ => {
                let abs = self.abs(path);
                let handle = match OpenOptions::new().write(true).open(&abs) {
                    Ok(handle) => handle,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(ApplyError::MissingBase { path: abs });
                    }
                    Err(source) => return Err(ApplyError::OpenFile { path: abs, source }),
                };
                self.dirty_files.insert(abs);
                handle
            }
        };
        let result = op(&handle);
        self.open = Some((path.clone(), handle));
        Ok(result)
    }

    fn apply_extent(&mut self, extent: Extent) -> Result<(), ApplyError> {
        let Extent {
            file,
            offset_bytes,
            raw_len_bytes,
            codec,
            data,
        } = extent;
        let path = match &file {
            FileRef::Image => self.target.clone(),
            FileRef::Path(rel) => self.abs(rel),
        };
        if raw_len_bytes > MAX_EXTENT_BYTES {
            return Err(ApplyError::ExtentTooLarge {
                path,
                offset_bytes,
                raw_len_bytes,
            });
        }
        let expected = u64::from(raw_len_bytes);
        let bytes = match codec {
            Codec::Raw => data,
            Codec::Zstd => self
                .decompressor
                .decompress(&data, raw_len_bytes as usize)
                .map_err(|source| ApplyError::Decompress {
                    path: path.clone(),
                    offset_bytes,
                    source,
                })?,
        };
        if bytes.len() as u64 != expected {
            return Err(ApplyError::ExtentLength {
                path,
                offset_bytes,
                expected_bytes: expected,
                actual_bytes: bytes.len() as u64,
            });
        }
        self.with_file(&file, |handle| handle.write_all_at(&bytes, offset_bytes))?
            .map_err(|source| ApplyError::WriteBlock {
                path,
                offset_bytes,
                source,
            })
    }
}

/// `lstat`, with "not found" as `None` (also when a parent is not a directory, as happens when
/// a replayed op names a path whose parent a later op turned into a file).
fn lstat(path: &Path) -> io::Result<Option<fs::Metadata>> {
    match fs::symlink_metadata(path) {
        Ok(md) => Ok(Some(md)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn is_dir(path: &Path) -> bool {
    matches!(lstat(path), Ok(Some(md)) if md.is_dir())
}

fn kind_of(md: &fs::Metadata) -> Option<EntryKind> {
    let file_type = md.file_type();
    if file_type.is_dir() {
        Some(EntryKind::Dir)
    } else if file_type.is_symlink() {
        Some(EntryKind::Symlink)
    } else if file_type.is_file() {
        Some(EntryKind::File)
    } else {
        None
    }
}

/// Zeroes a range: punches a hole (so it takes no space) where the filesystem supports it,
/// writes zeros otherwise.
fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    use rustix::io::Errno;
    match fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => Ok(()),
        Err(e) if e == Errno::OPNOTSUPP || e == Errno::NOSYS || e == Errno::INVAL => {
            static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(ZEROS.len() as u64);
                file.write_all_at(&ZEROS[..n as usize], offset + done)?;
                done += n;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Sets owner, then mode (a chown clears setuid/setgid), then mtime, without following
/// symlinks.
fn set_meta(path: &Path, kind: EntryKind, meta: &Meta) -> io::Result<()> {
    use rustix::fs::{utimensat, AtFlags, Timespec, Timestamps, CWD, UTIME_OMIT};
    let Some(md) = lstat(path)? else {
        return Err(io::Error::from(io::ErrorKind::NotFound));
    };
    let chowned = (md.uid(), md.gid()) != (meta.uid, meta.gid);
    if chowned {
        std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))?;
    }
    if kind != EntryKind::Symlink && (chowned || md.mode() & 0o7777 != meta.mode) {
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))?;
    }
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: meta.mtime.secs,
            tv_nsec: meta.mtime.nanos.into(),
        },
    };
    utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::chunk::{collect_chunks, ChunkBody, ChunkOptions};
    use crate::delta::diff::diff;
    use crate::delta::index::Generation;

    struct Fixture {
        _dir: tempfile::TempDir,
        target: PathBuf,
        chunks: Vec<DeltaChunk>,
        stream: StreamId,
    }

    /// A full-copy stream of a 1 MiB patterned image, cut into several chunks.
    fn image_stream() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src.img");
        let mut data = vec![0u8; 1 << 20];
        blake3::Hasher::new().finalize_xof().fill(&mut data);
        fs::write(&source, &data).unwrap();
        let snapshot = VolumeSnapshot::Image(source);
        let scanned = scan(&snapshot, &ScanOptions::default(), Generation(1)).unwrap();
        let plan = diff(None, &scanned.index);
        let options = ChunkOptions {
            max_body_bytes: 128 << 10,
            extent_max_bytes: 64 << 10,
            zstd_level: 1,
        };
        let (chunks, _) = collect_chunks(&plan, &snapshot, options).unwrap();
        assert!(
            chunks.len() > 4,
            "want several chunks, got {}",
            chunks.len()
        );
        Fixture {
            target: dir.path().join("dst.img"),
            _dir: dir,
            chunks,
            stream: plan.stream,
        }
    }

    #[test]
    fn corrupt_chunk_is_refused_and_nothing_applied() {
        let f = image_stream();
        let mut applier = Applier::open(&f.target, VolumeKind::BlockImage, f.stream).unwrap();
        let mut bad = f.chunks[0].clone();
        let middle = bad.body.len() / 2;
        bad.body[middle] ^= 0x01;
        let err = applier.apply(&bad).unwrap_err();
        assert!(
            matches!(err, ApplyError::ChunkCorrupt { seq: 0, .. }),
            "{err:?}"
        );
        assert_eq!(fs::metadata(&f.target).unwrap().len(), 0, "target touched");
        assert_eq!(applier.next_seq(), 0);
        // The re-sent good copy goes through.
        applier.apply(&f.chunks[0]).unwrap();
        assert_eq!(applier.next_seq(), 1);
    }

    #[test]
    fn out_of_order_wrong_stream_and_incomplete_are_refused() {
        let f = image_stream();
        let mut applier = Applier::open(&f.target, VolumeKind::BlockImage, f.stream).unwrap();
        let err = applier.apply(&f.chunks[2]).unwrap_err();
        assert!(
            matches!(
                err,
                ApplyError::OutOfOrder {
                    seq: 2,
                    next_seq: 0
                }
            ),
            "{err:?}"
        );

        let mut other = Applier::open(
            &f.target,
            VolumeKind::BlockImage,
            StreamId {
                base: Some(Generation(7)),
                generation: Generation(8),
            },
        )
        .unwrap();
        let err = other.apply(&f.chunks[0]).unwrap_err();
        assert_eq!(err.metric_label(), "wrong_stream");

        for chunk in &f.chunks[..f.chunks.len() - 1] {
            applier.apply(chunk).unwrap();
        }
        let err = applier.finish(FinishOptions::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ApplyError::StreamIncomplete {
                    chunk_count: None,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn replaying_a_middle_chunk_requires_the_rest() {
        let f = image_stream();
        let mut applier = Applier::open(&f.target, VolumeKind::BlockImage, f.stream).unwrap();
        for chunk in &f.chunks {
            applier.apply(chunk).unwrap();
        }
        applier.apply(&f.chunks[1]).unwrap();
        let err = applier.finish(FinishOptions::default()).unwrap_err();
        assert!(
            matches!(err, ApplyError::StreamIncomplete { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn image_records_are_not_applicable_to_a_tree() {
        let f = image_stream();
        let tree_target = f.target.with_extension("d");
        let mut applier = Applier::open(&tree_target, VolumeKind::FileTree, f.stream).unwrap();
        let err = applier.apply(&f.chunks[0]).unwrap_err();
        assert!(
            matches!(
                err,
                ApplyError::RecordNotApplicable {
                    seq: 0,
                    record: 0,
                    target: VolumeKind::FileTree
                }
            ),
            "{err:?}"
        );
        assert_eq!(fs::read_dir(&tree_target).unwrap().count(), 0);
    }

    #[test]
    fn ops_on_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let stream = StreamId {
            base: None,
            generation: Generation(1),
        };
        let body = ChunkBody {
            stream,
            seq: 0,
            records: vec![Record::Op(Op::Remove {
                path: RelPath::root(),
                kind: EntryKind::Dir,
            })],
            end: None,
        };
        let chunk = DeltaChunk::seal(&body).unwrap();
        let mut applier = Applier::open(dir.path(), VolumeKind::FileTree, stream).unwrap();
        let err = applier.apply(&chunk).unwrap_err();
        assert_eq!(err.metric_label(), "record_not_applicable");
        assert!(dir.path().is_dir());
    }

    #[test]
    fn extent_with_wrong_declared_length_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let stream = StreamId {
            base: None,
            generation: Generation(1),
        };
        let body = ChunkBody {
            stream,
            seq: 0,
            records: vec![Record::Extent(Extent {
                file: FileRef::Image,
                offset_bytes: 0,
                raw_len_bytes: 10,
                codec: Codec::Zstd,
                data: zstd::bulk::compress(&[1u8; 8], 1).unwrap(),
            })],
            end: None,
        };
        let mut applier =
            Applier::open(dir.path().join("img"), VolumeKind::BlockImage, stream).unwrap();
        let err = applier
            .apply(&DeltaChunk::seal(&body).unwrap())
            .unwrap_err();
        assert!(
            matches!(
                err,
                ApplyError::ExtentLength {
                    expected_bytes: 10,
                    actual_bytes: 8,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn extent_declaring_a_huge_length_is_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let stream = StreamId {
            base: None,
            generation: Generation(1),
        };
        let body = ChunkBody {
            stream,
            seq: 0,
            records: vec![Record::Extent(Extent {
                file: FileRef::Image,
                offset_bytes: 0,
                raw_len_bytes: u32::MAX,
                codec: Codec::Zstd,
                data: zstd::bulk::compress(&[1u8; 8], 1).unwrap(),
            })],
            end: None,
        };
        let mut applier =
            Applier::open(dir.path().join("img"), VolumeKind::BlockImage, stream).unwrap();
        let err = applier
            .apply(&DeltaChunk::seal(&body).unwrap())
            .unwrap_err();
        assert_eq!(err.metric_label(), "extent_too_large", "{err:?}");
    }

    #[test]
    fn zero_range_reads_back_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, vec![0xAB; 3 * 4096]).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        zero_range(&file, 4096, 4096).unwrap();
        let data = fs::read(&path).unwrap();
        assert_eq!(data.len(), 3 * 4096);
        assert!(data[..4096].iter().all(|b| *b == 0xAB));
        assert!(data[4096..8192].iter().all(|b| *b == 0));
        assert!(data[8192..].iter().all(|b| *b == 0xAB));
    }
}
