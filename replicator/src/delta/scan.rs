//! Scanning: read a block image or a file tree once, streaming, and hash it into a block index.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::num::NonZeroUsize;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::index::{
    BlockHash, BlockIndex, BlockSize, FileEntry, Generation, ImageIndex, IndexContent, Meta, Mtime,
    SymlinkTarget, TreeEntry, TreeIndex, VolumeKind,
};
use super::relpath::{InvalidRelPath, RelPath, STASH_DIR_NAME};

/// A point-in-time copy of one volume, as the source reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeSnapshot {
    /// A block image: a regular file (or block device) read from offset 0 to its end.
    Image(PathBuf),
    /// A file tree: a directory, walked without following symlinks.
    Tree(PathBuf),
}

impl VolumeSnapshot {
    /// Image or tree.
    pub fn kind(&self) -> VolumeKind {
        match self {
            VolumeSnapshot::Image(_) => VolumeKind::BlockImage,
            VolumeSnapshot::Tree(_) => VolumeKind::FileTree,
        }
    }

    /// The image file or the tree's root directory.
    pub fn path(&self) -> &Path {
        match self {
            VolumeSnapshot::Image(path) | VolumeSnapshot::Tree(path) => path,
        }
    }
}

/// How to scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanOptions {
    /// Block size to hash at; must match the previous index's for a delta (otherwise the diff
    /// falls back to a full copy).
    pub block_size: BlockSize,
    /// Threads hashing each read buffer in parallel (reading stays on the calling thread).
    pub hash_threads: NonZeroUsize,
}

impl ScanOptions {
    /// Options with `block_size` and one hashing thread per available CPU.
    pub fn new(block_size: BlockSize) -> Self {
        Self {
            block_size,
            hash_threads: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
        }
    }
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self::new(BlockSize::default())
    }
}

/// Counters from one scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Blocks hashed (for trees, hard-linked files count once).
    pub blocks_scanned: u64,
    /// Bytes read and hashed.
    pub bytes_scanned: u64,
    /// Blocks found all-zero (holes, or written zeros: the same thing for replication).
    pub zero_blocks: u64,
    /// Bytes in holes of sparse files and images, known zero from the filesystem
    /// (`SEEK_HOLE`/`SEEK_DATA`) and never read; counted in `zero_blocks`, not in
    /// `bytes_scanned`.
    pub bytes_skipped: u64,
    /// Regular files seen, every hard link counted.
    pub files: u64,
    /// Directories seen, the root included.
    pub dirs: u64,
    /// Symlinks seen.
    pub symlinks: u64,
    /// FIFOs, sockets and device nodes: not replicated (see [`scan`]).
    pub skipped_special: u64,
    /// Files taken unread from the previous index by the quick check (see [`scan_against`]).
    pub files_unread: u64,
    /// Bytes of those files: not read, not hashed, not in `bytes_scanned`.
    pub bytes_unread: u64,
}

/// A scan's result: the new index and counters.
#[derive(Clone, Debug)]
pub struct Scanned {
    /// Index of the snapshot, describing `generation`.
    pub index: BlockIndex,
    /// Counters.
    pub stats: ScanStats,
}

/// Scan failures; each names the step and the object.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// Opening an image or a file in a tree failed.
    #[error("opening {path} for scanning")]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading a block failed.
    #[error("reading block at byte {offset_bytes} of {path}")]
    ReadBlock {
        /// The file.
        path: PathBuf,
        /// Offset of the read, in bytes.
        offset_bytes: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Listing a directory failed.
    #[error("listing directory {path}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `lstat` failed.
    #[error("reading metadata of {path}")]
    Stat {
        /// The entry.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading a symlink's target failed.
    #[error("reading symlink {path}")]
    ReadLink {
        /// The symlink.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A tree snapshot's root is not a directory.
    #[error("tree root {path} is not a directory")]
    NotADirectory {
        /// The root.
        path: PathBuf,
    },
    /// The tree holds the name the apply side reserves (see [`STASH_DIR_NAME`]).
    #[error("tree {root} holds the reserved name {STASH_DIR_NAME}")]
    ReservedName {
        /// The tree's root.
        root: PathBuf,
    },
    /// A directory entry's name cannot be a [`RelPath`] component.
    #[error("entry name under {path}")]
    InvalidName {
        /// The directory holding it.
        path: PathBuf,
        /// Cause.
        #[source]
        source: InvalidRelPath,
    },
}

impl ScanError {
    /// Stable, low-cardinality label for metrics and Events.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ScanError::Open { .. } => "open",
            ScanError::ReadBlock { .. } => "read_block",
            ScanError::ReadDir { .. } => "read_dir",
            ScanError::Stat { .. } => "stat",
            ScanError::ReadLink { .. } => "read_link",
            ScanError::NotADirectory { .. } => "not_a_directory",
            ScanError::ReservedName { .. } => "reserved_name",
            ScanError::InvalidName { .. } => "invalid_name",
        }
    }
}

/// Reads `snapshot` once and hashes every block into a [`BlockIndex`] for `generation`.
///
/// Memory stays bounded by one 4 MiB read buffer plus the index itself (32 bytes per block:
/// 8 MiB per GiB at 4 KiB blocks). All-zero blocks are recognised (and not hashed) so holes
/// stay holes downstream. Holes of sparse regular files are not even read: the filesystem
/// says where data is (`lseek` `SEEK_DATA`/`SEEK_HOLE`, Linux lseek(2)); block devices and
/// filesystems without that support are read whole.
///
/// Trees are walked without following symlinks, in sorted order. Hard links within the tree
/// are hashed once and recorded as a link group ([`FileEntry::hardlink_of`]). FIFOs, sockets
/// and device nodes are skipped with a warning and counted in
/// [`ScanStats::skipped_special`]. The snapshot must not change while scanned (it is a
/// snapshot); if it does, the destination's verification catches it.
///
/// # Errors
/// [`ScanError`] naming the file and step that failed.
pub fn scan(
    snapshot: &VolumeSnapshot,
    options: &ScanOptions,
    generation: Generation,
) -> Result<Scanned, ScanError> {
    scan_against(snapshot, options, generation, None)
}

/// What the quick check of [`scan_against`] compares with.
#[derive(Clone, Copy, Debug)]
pub struct QuickCheck<'a> {
    /// The index of the same volume at an earlier generation (same block size, or ignored).
    pub previous: &'a BlockIndex,
    /// Only files modified before this are trusted: the earlier generation's capture time
    /// minus a margin. A write in the same clock tick as that capture can leave the mtime
    /// as it was (the "racy git" problem), so such files are always read.
    pub modified_before: Mtime,
}

/// [`scan`], with rsync's and restic's quick check for file trees: a regular file whose
/// path, size in bytes and modification time (to the nanosecond) equal its entry in
/// `quick.previous`, and whose mtime is before `quick.modified_before`, is not read; its
/// block hashes are taken from there, and it is counted in [`ScanStats::files_unread`] and
/// [`ScanStats::bytes_unread`]. Files with several hard links are always read. Block images
/// ignore the quick check (a write does not always change an image's mtime).
///
/// A file rewritten in place with its old size and mtime restored looks unchanged: only a
/// scan without the quick check catches it, which is why the replicator does one every
/// `spec.fullScanEvery` generations.
///
/// # Errors
/// [`ScanError`] naming the file and step that failed.
#[tracing::instrument(name = "delta", skip_all, fields(step = "scan", generation = generation.0, path = %snapshot.path().display()))]
pub fn scan_against(
    snapshot: &VolumeSnapshot,
    options: &ScanOptions,
    generation: Generation,
    quick: Option<QuickCheck<'_>>,
) -> Result<Scanned, ScanError> {
    let mut hasher = BlockHasher::new(options);
    let mut stats = ScanStats::default();
    let content = match snapshot {
        VolumeSnapshot::Image(path) => {
            let mut file = File::open(path).map_err(|source| ScanError::Open {
                path: path.clone(),
                source,
            })?;
            let mut blocks = Vec::new();
            let size_bytes = hasher.hash_file(&mut file, path, &mut blocks, &mut stats)?;
            IndexContent::Image(ImageIndex { size_bytes, blocks })
        }
        VolumeSnapshot::Tree(root) => {
            let quick = quick
                .filter(|q| q.previous.block_size == options.block_size)
                .and_then(|q| match &q.previous.content {
                    IndexContent::Tree(tree) => Some((tree, q.modified_before)),
                    IndexContent::Image(_) => None,
                });
            IndexContent::Tree(scan_tree(root, &mut hasher, &mut stats, quick)?)
        }
    };
    tracing::debug!(?stats, "scanned");
    Ok(Scanned {
        index: BlockIndex {
            generation,
            block_size: options.block_size,
            content,
        },
        stats,
    })
}

/// Why [`scan_changed`] cannot trust a changed-extents list against a previous index: the
/// caller scans everything instead, and reports this as the reason.
#[derive(Debug, thiserror::Error)]
pub enum ChangedScanError {
    /// The previous index is not a usable base for this image.
    #[error("{0}")]
    Unusable(String),
    /// Reading the image failed.
    #[error(transparent)]
    Scan(#[from] ScanError),
}

/// Scans block image `path` reading only `changed`: byte ranges `(offset, length)` that differ
/// from the image `previous` describes, as a CSI driver's changed block tracking reports them
/// (KEP-3314 `GetMetadataDelta`). Each range is widened to whole blocks and hashed; every
/// other block keeps its hash from `previous`. The result equals [`scan`]'s as long as the
/// driver's list is complete, which is the driver's promise. Nothing downstream can catch a
/// driver that under-reports (the destination verifies what it was sent, which is the base
/// plus these ranges), so the replicator reads volumes whole every `spec.fullScanEvery`
/// generations.
///
/// # Errors
/// [`ChangedScanError::Unusable`] when `previous` is not an image index of the same size and
/// block size (the volume was resized, or the base is another generation's layout), or a
/// range ends past the image; [`ChangedScanError::Scan`] when a read fails.
pub fn scan_changed(
    path: &Path,
    options: &ScanOptions,
    generation: Generation,
    previous: &BlockIndex,
    changed: &[(u64, u64)],
) -> Result<Scanned, ChangedScanError> {
    let unusable = |why: String| Err(ChangedScanError::Unusable(why));
    let IndexContent::Image(base) = &previous.content else {
        return unusable("the base index describes a file tree, not an image".into());
    };
    if previous.block_size != options.block_size {
        return unusable(format!(
            "the base index has {}-byte blocks, this scan {}",
            previous.block_size.bytes(),
            options.block_size.bytes()
        ));
    }
    let mut file = File::open(path).map_err(|source| ScanError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    // The end, not the metadata's length: a block device's metadata says 0.
    let size =
        io::Seek::seek(&mut file, io::SeekFrom::End(0)).map_err(|source| ScanError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    if size != base.size_bytes {
        return unusable(format!(
            "the volume is {size} bytes, its base generation {} was {} (resized)",
            previous.generation.0, base.size_bytes
        ));
    }
    let bs = options.block_size.bytes_u64();
    if base.blocks.len() as u64 != size.div_ceil(bs) {
        return unusable(format!(
            "the base index holds {} block hashes for {size} bytes",
            base.blocks.len()
        ));
    }
    // Whole blocks, merged and in order, so each block is hashed once.
    let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(changed.len());
    for &(offset, length) in changed {
        let end = offset.saturating_add(length);
        if end > size {
            return unusable(format!(
                "a changed extent ends at byte {end}, past the volume's {size} bytes"
            ));
        }
        if length == 0 {
            continue;
        }
        ranges.push((
            offset / bs * bs,
            end.div_ceil(bs).saturating_mul(bs).min(size),
        ));
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut hasher = BlockHasher::new(options);
    let mut stats = ScanStats::default();
    let mut blocks = base.blocks.clone();
    let mut fresh = Vec::new();
    for (start, end) in merged {
        fresh.clear();
        hasher.hash_range(&file, path, start, end, &mut fresh, &mut stats)?;
        let first = (start / bs) as usize;
        blocks[first..first + fresh.len()].copy_from_slice(&fresh);
    }
    tracing::debug!(?stats, "scanned changed extents");
    Ok(Scanned {
        index: BlockIndex {
            generation,
            block_size: options.block_size,
            content: IndexContent::Image(ImageIndex {
                size_bytes: size,
                blocks,
            }),
        },
        stats,
    })
}

fn meta_of(md: &fs::Metadata) -> Meta {
    Meta {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: Mtime {
            secs: md.mtime(),
            // The kernel reports 0..1e9; clamp rather than trust blindly.
            nanos: u32::try_from(md.mtime_nsec()).unwrap_or(0).min(999_999_999),
        },
    }
}

/// A file with several links: its content, hashed once, and the paths seen so far.
struct LinkedInode {
    size_bytes: u64,
    blocks: Vec<BlockHash>,
    paths: Vec<RelPath>,
}

/// The previous index's entry for `rel` when it is a regular file of the same size and mtime,
/// modified before the cut-off.
fn unchanged<'a>(
    quick: Option<(&'a TreeIndex, Mtime)>,
    rel: &RelPath,
    md: &fs::Metadata,
    meta: &Meta,
) -> Option<&'a FileEntry> {
    let (previous, before) = quick?;
    let mtime = (meta.mtime.secs, meta.mtime.nanos);
    match previous.entries.get(rel)? {
        TreeEntry::File(entry)
            if md.nlink() == 1
                && entry.hardlink_of.is_none()
                && entry.size_bytes == md.len()
                && entry.meta.mtime == meta.mtime
                && mtime < (before.secs, before.nanos) =>
        {
            Some(entry)
        }
        _ => None,
    }
}

fn scan_tree(
    root: &Path,
    hasher: &mut BlockHasher,
    stats: &mut ScanStats,
    quick: Option<(&TreeIndex, Mtime)>,
) -> Result<TreeIndex, ScanError> {
    let root_md = fs::symlink_metadata(root).map_err(|source| ScanError::Stat {
        path: root.to_path_buf(),
        source,
    })?;
    if !root_md.is_dir() {
        return Err(ScanError::NotADirectory {
            path: root.to_path_buf(),
        });
    }
    let mut entries = BTreeMap::new();
    entries.insert(
        RelPath::root(),
        TreeEntry::Dir {
            meta: meta_of(&root_md),
        },
    );
    stats.dirs += 1;

    // Files with more than one link, by (device, inode): content hashed once, paths gathered.
    let mut linked: HashMap<(u64, u64), LinkedInode> = HashMap::new();
    let mut dirs = vec![RelPath::root()];
    while let Some(dir) = dirs.pop() {
        let dir_abs = dir.under(root);
        let mut names = Vec::new();
        let listing = fs::read_dir(&dir_abs).map_err(|source| ScanError::ReadDir {
            path: dir_abs.clone(),
            source,
        })?;
        for item in listing {
            let item = item.map_err(|source| ScanError::ReadDir {
                path: dir_abs.clone(),
                source,
            })?;
            names.push(item.file_name());
        }
        names.sort();
        for name in names {
            if dir.is_root() && name.as_bytes() == STASH_DIR_NAME.as_bytes() {
                return Err(ScanError::ReservedName {
                    root: root.to_path_buf(),
                });
            }
            let rel = dir.join(&name).map_err(|source| ScanError::InvalidName {
                path: dir_abs.clone(),
                source,
            })?;
            let abs = dir_abs.join(&name);
            let md = fs::symlink_metadata(&abs).map_err(|source| ScanError::Stat {
                path: abs.clone(),
                source,
            })?;
            let meta = meta_of(&md);
            let file_type = md.file_type();
            if file_type.is_dir() {
                stats.dirs += 1;
                entries.insert(rel.clone(), TreeEntry::Dir { meta });
                dirs.push(rel);
            } else if file_type.is_symlink() {
                stats.symlinks += 1;
                let target = fs::read_link(&abs).map_err(|source| ScanError::ReadLink {
                    path: abs.clone(),
                    source,
                })?;
                entries.insert(
                    rel,
                    TreeEntry::Symlink {
                        meta,
                        target: SymlinkTarget(target.as_os_str().as_bytes().to_vec()),
                    },
                );
            } else if file_type.is_file() {
                stats.files += 1;
                let inode = (md.dev(), md.ino());
                let (size_bytes, blocks) = if let Some(seen) = linked.get_mut(&inode) {
                    seen.paths.push(rel.clone());
                    (seen.size_bytes, seen.blocks.clone())
                } else if let Some(entry) = unchanged(quick, &rel, &md, &meta) {
                    stats.files_unread += 1;
                    stats.bytes_unread += entry.size_bytes;
                    (entry.size_bytes, entry.blocks.clone())
                } else {
                    let mut file = File::open(&abs).map_err(|source| ScanError::Open {
                        path: abs.clone(),
                        source,
                    })?;
                    let mut blocks = Vec::new();
                    let size = hasher.hash_file(&mut file, &abs, &mut blocks, stats)?;
                    if md.nlink() > 1 {
                        linked.insert(
                            inode,
                            LinkedInode {
                                size_bytes: size,
                                blocks: blocks.clone(),
                                paths: vec![rel.clone()],
                            },
                        );
                    }
                    (size, blocks)
                };
                entries.insert(
                    rel,
                    TreeEntry::File(FileEntry {
                        meta,
                        size_bytes,
                        blocks,
                        hardlink_of: None,
                    }),
                );
            } else {
                stats.skipped_special += 1;
                tracing::warn!(path = %abs.display(), "skipping special file (fifo, socket or device)");
            }
        }
    }

    for LinkedInode { mut paths, .. } in linked.into_values() {
        if paths.len() < 2 {
            continue;
        }
        paths.sort();
        let primary = paths[0].clone();
        for member in &paths[1..] {
            if let Some(TreeEntry::File(file)) = entries.get_mut(member) {
                file.hardlink_of = Some(primary.clone());
            }
        }
    }
    Ok(TreeIndex { entries })
}

/// Bytes per read; a multiple of every valid block size.
const READ_BUFFER_BYTES: usize = 4 << 20;
/// Below this many blocks in a buffer, hashing on one thread beats spawning.
const PARALLEL_MIN_BLOCKS: usize = 64;

/// Reads streams into one reusable buffer and hashes them block by block.
struct BlockHasher {
    block_size: usize,
    threads: usize,
    full_zero: BlockHash,
    buffer: Vec<u8>,
}

impl BlockHasher {
    fn new(options: &ScanOptions) -> Self {
        let block_size = options.block_size.bytes() as usize;
        Self {
            block_size,
            threads: options.hash_threads.get(),
            full_zero: BlockHash::of(&vec![0; block_size]),
            buffer: Vec::new(),
        }
    }

    /// Hashes regular file `file` from offset 0 to its end like [`Self::hash_stream`], but
    /// reads only its data extents: blocks wholly inside holes get the all-zero hash without
    /// a read. Returns the file's size. Anything else (a block device, no `SEEK_DATA`) is read
    /// whole.
    fn hash_file(
        &mut self,
        file: &mut File,
        path: &Path,
        blocks: &mut Vec<BlockHash>,
        stats: &mut ScanStats,
    ) -> Result<u64, ScanError> {
        let size = match file.metadata() {
            Ok(md) if md.is_file() => md.len(),
            _ => return self.hash_stream(file, path, blocks, stats),
        };
        let Some(extents) = data_extents(file, size, self.block_size as u64) else {
            return self.hash_stream(file, path, blocks, stats);
        };
        let bs = self.block_size as u64;
        let mut pos = 0u64;
        for (start, end) in extents.into_iter().chain([(size, size)]) {
            // Skipped, never read: [pos, start) lies in a hole (a whole number of blocks, or
            // the file's tail).
            if start > pos {
                let count = (start - pos).div_ceil(bs);
                blocks.resize(blocks.len() + count as usize, self.full_zero);
                if start == size && size % bs != 0 {
                    // The file ends in a hole inside a short last block: hash it at its
                    // length, as reading it would.
                    if let Some(last) = blocks.last_mut() {
                        *last = BlockHash::of(&vec![0; (size % bs) as usize]);
                    }
                }
                stats.blocks_scanned += count;
                stats.zero_blocks += count;
                stats.bytes_skipped += start - pos;
            }
            if end > start {
                self.hash_range(file, path, start, end, blocks, stats)?;
            }
            pos = end.max(pos);
        }
        Ok(size)
    }

    /// Hashes bytes `start..end` of regular file `file` (block-aligned `start`), appending
    /// one hash per block to `blocks`. Each hashing thread reads its own stripes of
    /// [`READ_BUFFER_BYTES`] with `pread` and hashes them, so reading (a copy out of the page
    /// cache) runs in parallel too instead of one thread reading while the others wait.
    ///
    /// # Errors
    /// [`ScanError::ReadBlock`] naming the offset, also when the file ends early (it shrank
    /// under the scan, so it is not a snapshot).
    fn hash_range(
        &mut self,
        file: &File,
        path: &Path,
        start: u64,
        end: u64,
        blocks: &mut Vec<BlockHash>,
        stats: &mut ScanStats,
    ) -> Result<(), ScanError> {
        use std::os::unix::fs::FileExt;
        let len = end - start;
        let first = blocks.len();
        let count = (len as usize).div_ceil(self.block_size);
        blocks.resize(first + count, self.full_zero);
        let stripe_blocks = READ_BUFFER_BYTES / self.block_size;
        let stripes: Vec<(usize, &mut [BlockHash])> = blocks[first..]
            .chunks_mut(stripe_blocks)
            .enumerate()
            .collect();
        let threads = self.threads.clamp(1, stripes.len().max(1));
        let mut lanes: Vec<Vec<(usize, &mut [BlockHash])>> =
            (0..threads).map(|_| Vec::new()).collect();
        for (i, stripe) in stripes {
            lanes[i % threads].push((i, stripe));
        }
        let (block_size, full_zero) = (self.block_size, self.full_zero);
        let hash_lane = |lane: Vec<(usize, &mut [BlockHash])>| -> Result<u64, ScanError> {
            let mut buffer = vec![0u8; READ_BUFFER_BYTES.min(len as usize)];
            let mut zeros = 0;
            for (i, out) in lane {
                let offset = start + (i * READ_BUFFER_BYTES) as u64;
                let want = (end - offset).min(READ_BUFFER_BYTES as u64) as usize;
                file.read_exact_at(&mut buffer[..want], offset)
                    .map_err(|source| ScanError::ReadBlock {
                        path: path.to_path_buf(),
                        offset_bytes: offset,
                        source,
                    })?;
                zeros += hash_blocks(&buffer[..want], block_size, full_zero, out);
            }
            Ok(zeros)
        };
        let zeros = std::thread::scope(|scope| {
            let mut lanes = lanes.into_iter();
            let own = lanes.next().unwrap_or_default();
            let handles: Vec<_> = lanes
                .map(|lane| scope.spawn(move || hash_lane(lane)))
                .collect();
            let mut zeros = hash_lane(own)?;
            for handle in handles {
                // A panic while hashing is a bug; re-raise it on the caller's thread.
                zeros += handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            }
            Ok::<u64, ScanError>(zeros)
        })?;
        stats.blocks_scanned += count as u64;
        stats.zero_blocks += zeros;
        stats.bytes_scanned += len;
        Ok(())
    }

    /// Hashes `reader` to its end, appending one hash per block to `blocks`; returns the
    /// number of bytes read.
    fn hash_stream(
        &mut self,
        reader: &mut impl Read,
        path: &Path,
        blocks: &mut Vec<BlockHash>,
        stats: &mut ScanStats,
    ) -> Result<u64, ScanError> {
        if self.buffer.is_empty() {
            self.buffer = vec![0; READ_BUFFER_BYTES];
        }
        let mut offset = 0u64;
        loop {
            let filled = fill(reader, &mut self.buffer).map_err(|source| ScanError::ReadBlock {
                path: path.to_path_buf(),
                offset_bytes: offset,
                source,
            })?;
            if filled == 0 {
                break;
            }
            let data = &self.buffer[..filled];
            let first = blocks.len();
            let count = filled.div_ceil(self.block_size);
            blocks.resize(first + count, self.full_zero);
            let zeros = hash_blocks_parallel(
                data,
                self.block_size,
                self.full_zero,
                &mut blocks[first..],
                self.threads,
            );
            stats.blocks_scanned += count as u64;
            stats.zero_blocks += zeros;
            stats.bytes_scanned += filled as u64;
            offset += filled as u64;
            if filled < self.buffer.len() {
                break;
            }
        }
        Ok(offset)
    }
}

/// The data extents of regular file `file` of `size` bytes, widened to whole blocks of
/// `block` bytes (the file's end excepted) and merged, in order; `None` when the filesystem
/// cannot say (then the caller reads everything).
fn data_extents(file: &File, size: u64, block: u64) -> Option<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(file, SeekFrom::Data(pos)) {
            Ok(start) => start,
            // No data past `pos`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return None,
        };
        let end = seek(file, SeekFrom::Hole(start)).ok()?.min(size);
        if end <= start {
            return None;
        }
        let (start, end) = (
            start / block * block,
            end.div_ceil(block).saturating_mul(block).min(size),
        );
        match extents.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => extents.push((start, end)),
        }
        pos = end;
    }
    Some(extents)
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn hash_blocks_parallel(
    data: &[u8],
    block_size: usize,
    full_zero: BlockHash,
    out: &mut [BlockHash],
    threads: usize,
) -> u64 {
    if threads <= 1 || out.len() < PARALLEL_MIN_BLOCKS {
        return hash_blocks(data, block_size, full_zero, out);
    }
    let per_thread = out.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut parts = out
            .chunks_mut(per_thread)
            .zip(data.chunks(per_thread * block_size));
        let (first_out, first_data) = parts.next().unwrap_or_default();
        let handles: Vec<_> = parts
            .map(|(out, data)| scope.spawn(move || hash_blocks(data, block_size, full_zero, out)))
            .collect();
        let mut zeros = hash_blocks(first_data, block_size, full_zero, first_out);
        for handle in handles {
            // A panic while hashing is a bug; re-raise it on the caller's thread.
            zeros += handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        }
        zeros
    })
}

/// Hashes each `block_size` piece of `data` into `out`; returns how many were all-zero.
fn hash_blocks(data: &[u8], block_size: usize, full_zero: BlockHash, out: &mut [BlockHash]) -> u64 {
    let mut zeros = 0;
    for (block, slot) in data.chunks(block_size).zip(out.iter_mut()) {
        if is_zero(block) {
            zeros += 1;
            *slot = if block.len() == block_size {
                full_zero
            } else {
                BlockHash::of(block)
            };
        } else {
            *slot = BlockHash::of(block);
        }
    }
    zeros
}

/// Whether every byte of `data` is zero.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed-size pieces lets the compiler vectorise while still stopping early at
    // the first non-zero piece (most data blocks fail on the first piece).
    data.chunks(64)
        .all(|piece| piece.iter().fold(0u8, |acc, b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn options(block: u32, threads: usize) -> ScanOptions {
        ScanOptions {
            block_size: BlockSize::new(block).unwrap(),
            hash_threads: NonZeroUsize::new(threads).unwrap(),
        }
    }

    #[test]
    fn is_zero_table() {
        let mut late = vec![0u8; 4096];
        late[4095] = 1;
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("empty", vec![], true),
            ("one zero", vec![0], true),
            ("page of zeros", vec![0; 4096], true),
            ("odd length zeros", vec![0; 4099], true),
            (
                "first byte set",
                {
                    let mut v = vec![0; 4096];
                    v[0] = 0x80;
                    v
                },
                false,
            ),
            ("last byte set", late, false),
        ];
        for (name, data, zero) in cases {
            assert_eq!(is_zero(&data), zero, "{name}");
        }
    }

    /// A sparse file of `size` bytes holding `data` at each offset, and the same bytes written
    /// densely (zeros and all) beside it.
    fn sparse_and_dense(dir: &Path, size: u64, data: &[(u64, &[u8])]) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::FileExt;
        let sparse = dir.join("sparse.img");
        let f = File::create(&sparse).unwrap();
        f.set_len(size).unwrap();
        let mut dense = vec![0u8; size as usize];
        for (offset, bytes) in data {
            f.write_all_at(bytes, *offset).unwrap();
            dense[*offset as usize..*offset as usize + bytes.len()].copy_from_slice(bytes);
        }
        let dense_path = dir.join("dense.img");
        fs::write(&dense_path, &dense).unwrap();
        (sparse, dense_path)
    }

    #[test]
    fn holes_are_skipped_unread_and_index_like_written_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64u64 << 20;
        let block = vec![7u8; 4096];
        let odd = vec![9u8; 10_000]; // spans three blocks, unaligned
        let (sparse, dense) = sparse_and_dense(
            dir.path(),
            size,
            &[(0, &block), (20 << 20, &odd), (size - 100, &block[..100])],
        );
        let run = |path: &Path| {
            scan(
                &VolumeSnapshot::Image(path.to_path_buf()),
                &options(4096, 2),
                Generation(1),
            )
            .unwrap()
        };
        let (s, d) = (run(&sparse), run(&dense));
        assert_eq!(s.index, d.index, "a hole indexes as written zeros");
        assert_eq!(s.stats.blocks_scanned, d.stats.blocks_scanned);
        assert_eq!(s.stats.zero_blocks, d.stats.zero_blocks);
        assert_eq!(d.stats.bytes_scanned, size);
        // Only the extents holding data were read: a few blocks, not 64 MiB. (ext4, XFS,
        // btrfs and tmpfs all report holes.)
        assert!(
            s.stats.bytes_scanned <= 1 << 20,
            "read {} bytes of a {size}-byte image holding 10 KiB",
            s.stats.bytes_scanned
        );
        assert_eq!(s.stats.bytes_scanned + s.stats.bytes_skipped, size);

        // A sparse file in a tree too.
        let tree = dir.path().join("tree");
        fs::create_dir(&tree).unwrap();
        fs::rename(&sparse, tree.join("f")).unwrap();
        let t = scan(
            &VolumeSnapshot::Tree(tree),
            &options(4096, 1),
            Generation(1),
        )
        .unwrap();
        assert!(t.stats.bytes_skipped > size / 2, "{:?}", t.stats);
    }

    #[test]
    fn a_file_ending_in_a_hole_inside_a_short_block_indexes_like_its_dense_twin() {
        let dir = tempfile::tempdir().unwrap();
        // 1 MiB + 1000 bytes: the last block is 1000 bytes long, and lies in the hole.
        let size = (1u64 << 20) + 1000;
        let (sparse, dense) = sparse_and_dense(dir.path(), size, &[(0, &[5u8; 4096])]);
        let run = |path: &Path| {
            scan(
                &VolumeSnapshot::Image(path.to_path_buf()),
                &options(4096, 1),
                Generation(1),
            )
            .unwrap()
        };
        let (s, d) = (run(&sparse), run(&dense));
        assert!(s.stats.bytes_skipped > 0, "{:?}", s.stats);
        assert_eq!(s.index, d.index);
        assert_eq!(s.index.digest(), d.index.digest());
    }

    #[test]
    fn image_hashes_match_per_block_blake3() {
        // Sizes around block and buffer boundaries, on 1 and 3 threads.
        let sizes = [0usize, 1, 4095, 4096, 4097, READ_BUFFER_BYTES + 100];
        for size in sizes {
            for threads in [1, 3] {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("img");
                let data: Vec<u8> = (0..size)
                    .map(|i| ((i / 4096 % 3) as u8).wrapping_mul(i as u8 | 1))
                    .collect();
                fs::write(&path, &data).unwrap();
                let scanned = scan(
                    &VolumeSnapshot::Image(path),
                    &options(4096, threads),
                    Generation(1),
                )
                .unwrap();
                let IndexContent::Image(image) = scanned.index.content else {
                    panic!("image scan gave a tree");
                };
                let expected: Vec<BlockHash> = data.chunks(4096).map(BlockHash::of).collect();
                assert_eq!(
                    image.size_bytes, size as u64,
                    "size {size} threads {threads}"
                );
                assert_eq!(image.blocks, expected, "size {size} threads {threads}");
                // Every third block is all zeros by construction.
                let zeros = data.chunks(4096).filter(|b| is_zero(b)).count() as u64;
                assert_eq!(scanned.stats.zero_blocks, zeros, "size {size}");
                assert_eq!(scanned.stats.bytes_scanned, size as u64);
            }
        }
    }

    #[test]
    fn tree_records_kinds_links_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("sub")).unwrap();
        let mut f = File::create(root.join("sub/a")).unwrap();
        f.write_all(&[7u8; 5000]).unwrap();
        drop(f);
        fs::hard_link(root.join("sub/a"), root.join("b-link")).unwrap();
        symlink("sub/a", root.join("sym")).unwrap();
        fs::set_permissions(root.join("sub"), fs::Permissions::from_mode(0o750)).unwrap();

        let scanned = scan(
            &VolumeSnapshot::Tree(root.to_path_buf()),
            &options(4096, 1),
            Generation(2),
        )
        .unwrap();
        let IndexContent::Tree(tree) = &scanned.index.content else {
            panic!("tree scan gave an image");
        };
        let paths: Vec<String> = tree.entries.keys().map(|p| p.to_string()).collect();
        assert_eq!(paths, [".", "b-link", "sub", "sub/a", "sym"]);
        let rel = |p: &str| RelPath::new(p.as_bytes()).unwrap();
        let TreeEntry::File(primary) = &tree.entries[&rel("b-link")] else {
            panic!("b-link is not a file");
        };
        let TreeEntry::File(member) = &tree.entries[&rel("sub/a")] else {
            panic!("sub/a is not a file");
        };
        assert_eq!(primary.hardlink_of, None, "smallest path is the primary");
        assert_eq!(member.hardlink_of, Some(rel("b-link")));
        assert_eq!(member.blocks, primary.blocks);
        assert_eq!(primary.size_bytes, 5000);
        assert_eq!(tree.entries[&rel("sub")].meta().mode, 0o750);
        assert!(matches!(
            &tree.entries[&rel("sym")],
            TreeEntry::Symlink { target, .. } if target.0 == b"sub/a"
        ));
        // The linked file is read once.
        assert_eq!(scanned.stats.bytes_scanned, 5000);
        assert_eq!(scanned.stats.files, 2);
        assert_eq!(scanned.index.bytes_total(), 5000);
    }

    #[test]
    fn tree_scan_rejects_reserved_name_and_non_directories() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(STASH_DIR_NAME)).unwrap();
        let err = scan(
            &VolumeSnapshot::Tree(dir.path().to_path_buf()),
            &options(4096, 1),
            Generation(1),
        )
        .unwrap_err();
        assert!(matches!(err, ScanError::ReservedName { .. }), "{err:?}");

        let file = dir.path().join("plain");
        fs::write(&file, b"x").unwrap();
        let err = scan(
            &VolumeSnapshot::Tree(file),
            &options(4096, 1),
            Generation(1),
        )
        .unwrap_err();
        assert!(matches!(err, ScanError::NotADirectory { .. }), "{err:?}");
    }

    #[test]
    fn changed_extents_scan_equals_a_full_scan_and_reads_only_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let bs = 4096usize;
        let mut data: Vec<u8> = (0..64 * bs + 100).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let opts = options(4096, 2);
        let image = VolumeSnapshot::Image(path.clone());
        let base = scan(&image, &opts, Generation(1)).unwrap().index;
        // Two writes: one across a block boundary, one in the short last block.
        data[5 * bs - 10..5 * bs + 10].fill(7);
        let last = data.len() - 3;
        data[last] = 9;
        std::fs::write(&path, &data).unwrap();
        let changed = [((5 * bs - 10) as u64, 20u64), (last as u64, 1u64)];
        let got = scan_changed(&path, &opts, Generation(2), &base, &changed).unwrap();
        let full = scan(&image, &opts, Generation(2)).unwrap();
        assert_eq!(got.index, full.index);
        assert_eq!(got.stats.blocks_scanned, 3, "blocks 4, 5 and the last");
        assert_eq!(got.stats.bytes_scanned, 2 * bs as u64 + 100);
        // A resized volume cannot use the base; an extent past the end is refused.
        std::fs::write(&path, &data[..32 * bs]).unwrap();
        let err = scan_changed(&path, &opts, Generation(3), &base, &[]).unwrap_err();
        assert!(err.to_string().contains("resized"), "{err}");
        std::fs::write(&path, &data).unwrap();
        let err = scan_changed(&path, &opts, Generation(3), &base, &[(0, 1 << 30)]).unwrap_err();
        assert!(err.to_string().contains("past the volume"), "{err}");
    }

    #[test]
    fn missing_image_names_the_path() {
        let err = scan(
            &VolumeSnapshot::Image(PathBuf::from("/nonexistent/ferry.img")),
            &options(4096, 1),
            Generation(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ferry.img"), "{err}");
        assert_eq!(err.metric_label(), "open");
    }
}
