//! Block index: the BLAKE3 hash of every block of a volume, persisted per (pair, volume) in sled.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::relpath::RelPath;

/// The block size used unless a caller picks another: 4 KiB, the page size that filesystems
/// and databases write in, so one small write changes one block.
pub const DEFAULT_BLOCK_SIZE_BYTES: u32 = 4096;

/// Size of the fixed blocks a volume is hashed in, in bytes: a power of two from 512 B to
/// 256 KiB. The last block of an image or file may be shorter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct BlockSize(u32);

/// A block size outside what [`BlockSize`] accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("block size must be a power of two from 512 to 262144 bytes, got {bytes}")]
pub struct InvalidBlockSize {
    /// The rejected size, in bytes.
    pub bytes: u32,
}

impl BlockSize {
    /// Smallest accepted block size, in bytes (one disk sector).
    pub const MIN_BYTES: u32 = 512;
    /// Largest accepted block size, in bytes; keeps one block well inside a chunk.
    pub const MAX_BYTES: u32 = 256 * 1024;

    /// Validates a block size in bytes.
    ///
    /// # Errors
    /// [`InvalidBlockSize`] unless `bytes` is a power of two in
    /// [`MIN_BYTES`](Self::MIN_BYTES)..=[`MAX_BYTES`](Self::MAX_BYTES).
    pub fn new(bytes: u32) -> Result<Self, InvalidBlockSize> {
        if bytes.is_power_of_two() && (Self::MIN_BYTES..=Self::MAX_BYTES).contains(&bytes) {
            Ok(Self(bytes))
        } else {
            Err(InvalidBlockSize { bytes })
        }
    }

    /// The size in bytes.
    pub fn bytes(self) -> u32 {
        self.0
    }

    /// The size in bytes, as `u64` for offset arithmetic.
    pub fn bytes_u64(self) -> u64 {
        u64::from(self.0)
    }

    /// Number of blocks covering `size_bytes` (the last one possibly short).
    pub fn blocks_for(self, size_bytes: u64) -> u64 {
        size_bytes.div_ceil(self.bytes_u64())
    }

    /// Length in bytes of block `block` of something `size_bytes` long (0 past the end).
    pub fn block_len(self, block: u64, size_bytes: u64) -> u64 {
        let start = block.saturating_mul(self.bytes_u64());
        size_bytes.saturating_sub(start).min(self.bytes_u64())
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self(DEFAULT_BLOCK_SIZE_BYTES)
    }
}

impl TryFrom<u32> for BlockSize {
    type Error = InvalidBlockSize;

    fn try_from(bytes: u32) -> Result<Self, Self::Error> {
        Self::new(bytes)
    }
}

impl From<BlockSize> for u32 {
    fn from(size: BlockSize) -> u32 {
        size.0
    }
}

/// BLAKE3 hash (default 32-byte output, plain hash mode; BLAKE3 spec §2) of one block's bytes.
/// `b3sum` of a block's bytes prints the same value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({})", hex_prefix(&self.0))
    }
}

/// Digest of a whole volume as an index describes it: BLAKE3 in derive-key mode (BLAKE3 spec
/// §2.3, context [`VOLUME_DIGEST_CONTEXT`]) over the postcard encoding of the block size and
/// the index content (sizes, block hashes, and for trees paths, kinds and metadata). Two
/// volumes with equal digests hold the same data at the same block size.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VolumeDigest(pub [u8; 32]);

impl fmt::Debug for VolumeDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeDigest({})", hex_prefix(&self.0))
    }
}

impl fmt::Display for VolumeDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// BLAKE3 derive-key context of [`VolumeDigest`].
pub const VOLUME_DIGEST_CONTEXT: &str = "ferry-replicator 2025-06-01 delta volume digest v1";
/// BLAKE3 derive-key context of the checksum guarding a stored index.
const STORED_INDEX_CONTEXT: &str = "ferry-replicator 2025-06-01 delta stored index v1";

fn hex_prefix(bytes: &[u8; 32]) -> String {
    bytes[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A generation number: the sequence of crash-consistent copies of one DR pair, increasing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which volume of which DR pair an index belongs to: the key in the [`HashStore`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VolumeKey {
    /// The DR pair's name (namespace-qualified by the caller if needed).
    pub pair: String,
    /// The volume's name within the pair (for example the PVC name).
    pub volume: String,
}

impl VolumeKey {
    /// Builds a key.
    pub fn new(pair: impl Into<String>, volume: impl Into<String>) -> Self {
        Self {
            pair: pair.into(),
            volume: volume.into(),
        }
    }

    /// Store key: the pair's length (u32 big-endian), the pair, then the volume, so no two
    /// (pair, volume) pairs share bytes.
    fn store_key(&self) -> Vec<u8> {
        let len = u32::try_from(self.pair.len()).unwrap_or(u32::MAX);
        let mut key = Vec::with_capacity(4 + self.pair.len() + self.volume.len());
        key.extend_from_slice(&len.to_be_bytes());
        key.extend_from_slice(self.pair.as_bytes());
        key.extend_from_slice(self.volume.as_bytes());
        key
    }
}

impl fmt::Display for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.pair, self.volume)
    }
}

/// How a volume is laid out, after the PVC's `volumeMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VolumeKind {
    /// `volumeMode: Block`: one image file (or device) of bytes.
    BlockImage,
    /// `volumeMode: Filesystem`: a directory tree.
    FileTree,
}

/// Modification time, as `stat` reports it: seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mtime {
    /// Whole seconds since 1970-01-01T00:00:00Z (negative before).
    pub secs: i64,
    /// Nanoseconds within the second, below 1e9.
    pub nanos: u32,
}

/// Metadata replicated for every tree entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`). Ignored when
    /// applied to a symlink (Linux has no symlink modes).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time.
    pub mtime: Mtime,
}

/// The kind of a tree entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
}

/// A symlink's target, as raw bytes (it may be absolute, contain `..`, or dangle).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SymlinkTarget(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for SymlinkTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SymlinkTarget({:?})", String::from_utf8_lossy(&self.0))
    }
}

/// A regular file in a tree index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Metadata.
    pub meta: Meta,
    /// Length in bytes.
    pub size_bytes: u64,
    /// Hash of each block, `block_size.blocks_for(size_bytes)` of them.
    pub blocks: Vec<BlockHash>,
    /// For a file with several hard links inside the tree: the link group's primary, the
    /// bytewise-smallest path of the group, on every member except the primary itself. The
    /// content fields are repeated on every member so each can be diffed alone.
    pub hardlink_of: Option<RelPath>,
}

impl FileEntry {
    /// Identity of the content: BLAKE3 over the length and the block hashes. Equal content ids
    /// mean equal bytes (at one block size); used to recognise renames.
    pub fn content_id(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.size_bytes.to_le_bytes());
        for block in &self.blocks {
            hasher.update(&block.0);
        }
        *hasher.finalize().as_bytes()
    }
}

/// One entry of a tree index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TreeEntry {
    /// A directory.
    Dir {
        /// Metadata.
        meta: Meta,
    },
    /// A regular file.
    File(FileEntry),
    /// A symbolic link.
    Symlink {
        /// Metadata (`mode` is always what Linux reports, 0o777).
        meta: Meta,
        /// The link's target.
        target: SymlinkTarget,
    },
}

impl TreeEntry {
    /// The entry's kind.
    pub fn kind(&self) -> EntryKind {
        match self {
            TreeEntry::Dir { .. } => EntryKind::Dir,
            TreeEntry::File(_) => EntryKind::File,
            TreeEntry::Symlink { .. } => EntryKind::Symlink,
        }
    }

    /// The entry's metadata.
    pub fn meta(&self) -> &Meta {
        match self {
            TreeEntry::Dir { meta } | TreeEntry::Symlink { meta, .. } => meta,
            TreeEntry::File(file) => &file.meta,
        }
    }
}

/// Index of a block image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIndex {
    /// Image length in bytes.
    pub size_bytes: u64,
    /// Hash of each block, `block_size.blocks_for(size_bytes)` of them.
    pub blocks: Vec<BlockHash>,
}

/// Index of a file tree: every entry by path, the root (empty path) included as a directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeIndex {
    /// Entries in bytewise path order (parents before children).
    pub entries: BTreeMap<RelPath, TreeEntry>,
}

/// What an index describes: an image or a tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexContent {
    /// A block image.
    Image(ImageIndex),
    /// A file tree.
    Tree(TreeIndex),
}

/// The block index of one volume at one generation.
///
/// Invariant (kept by [`HashStore`] users, see the crate walkthrough): a stored index describes
/// a generation the destination has committed, never one still in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockIndex {
    /// The generation this index describes.
    pub generation: Generation,
    /// Block size the hashes were taken at.
    pub block_size: BlockSize,
    /// Per-block hashes (and for trees, entries).
    pub content: IndexContent,
}

impl BlockIndex {
    /// Whether this is an image or a tree index.
    pub fn kind(&self) -> VolumeKind {
        match self.content {
            IndexContent::Image(_) => VolumeKind::BlockImage,
            IndexContent::Tree(_) => VolumeKind::FileTree,
        }
    }

    /// Digest of the described volume (see [`VolumeDigest`]); the generation is not part of it.
    pub fn digest(&self) -> VolumeDigest {
        let mut hasher = blake3::Hasher::new_derive_key(VOLUME_DIGEST_CONTEXT);
        // Writing into a hasher cannot fail, and postcard only fails on types it cannot
        // encode (none here); a failure would surface as a digest mismatch, never silently.
        let _ = postcard::to_io(&(self.block_size, &self.content), &mut hasher);
        VolumeDigest(*hasher.finalize().as_bytes())
    }

    /// Total blocks hashed: image blocks, or the blocks of every distinct file (hard links once).
    pub fn blocks_total(&self) -> u64 {
        match &self.content {
            IndexContent::Image(image) => image.blocks.len() as u64,
            IndexContent::Tree(tree) => distinct_files(tree).map(|f| f.blocks.len() as u64).sum(),
        }
    }

    /// Total data bytes: the image length, or the sum of distinct file lengths (hard links once).
    pub fn bytes_total(&self) -> u64 {
        match &self.content {
            IndexContent::Image(image) => image.size_bytes,
            IndexContent::Tree(tree) => distinct_files(tree).map(|f| f.size_bytes).sum(),
        }
    }
}

fn distinct_files(tree: &TreeIndex) -> impl Iterator<Item = &FileEntry> {
    tree.entries.values().filter_map(|entry| match entry {
        TreeEntry::File(file) if file.hardlink_of.is_none() => Some(file),
        _ => None,
    })
}

/// Hashes of all-zero blocks, by length: a block is a hole exactly when its hash is the one of
/// zeros of its length.
#[derive(Debug)]
pub(crate) struct ZeroHashes {
    block_size: BlockSize,
    full: BlockHash,
    short: HashMap<u64, BlockHash>,
}

impl ZeroHashes {
    pub(crate) fn new(block_size: BlockSize) -> Self {
        Self {
            block_size,
            full: zero_hash(block_size.bytes_u64()),
            short: HashMap::new(),
        }
    }

    /// Hash of `len` zero bytes, `len` at most the block size.
    pub(crate) fn get(&mut self, len: u64) -> BlockHash {
        if len == self.block_size.bytes_u64() {
            return self.full;
        }
        *self.short.entry(len).or_insert_with(|| zero_hash(len))
    }
}

fn zero_hash(len: u64) -> BlockHash {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut hasher = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..n]);
        left -= n as u64;
    }
    BlockHash(*hasher.finalize().as_bytes())
}

/// Result of [`HashStore::load`].
#[derive(Debug)]
pub enum LoadedIndex {
    /// A valid index.
    Found(BlockIndex),
    /// No index stored for the key: the next sync is a full copy.
    Missing,
    /// An index is stored but fails validation: the next sync is a full copy.
    Damaged(IndexDamage),
}

impl LoadedIndex {
    /// The index to diff against: `Some` only for a valid one. Missing and damaged indexes
    /// both mean "rebuild with a full copy".
    pub fn into_previous(self) -> Option<BlockIndex> {
        match self {
            LoadedIndex::Found(index) => Some(index),
            LoadedIndex::Missing | LoadedIndex::Damaged(_) => None,
        }
    }
}

/// Why a stored index was rejected.
#[derive(Debug, thiserror::Error)]
pub enum IndexDamage {
    /// Shorter than the header.
    #[error("stored index is truncated ({len_bytes} bytes)")]
    Truncated {
        /// Stored length in bytes.
        len_bytes: usize,
    },
    /// The header's magic bytes are wrong.
    #[error("stored index has a bad magic number")]
    BadMagic,
    /// Written by a format version this code does not read.
    #[error("stored index has unknown format version {version}")]
    UnknownVersion {
        /// The stored version.
        version: u16,
    },
    /// The checksum does not match the payload (or the payload was stored under another key).
    #[error("stored index fails its checksum")]
    ChecksumMismatch,
    /// The checksum matched but the payload does not decode (written by a buggy writer).
    #[error("stored index does not decode")]
    Undecodable {
        /// Decoder error.
        #[source]
        source: postcard::Error,
    },
}

/// Failures of the [`HashStore`] itself (the sled database), not of one stored index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Opening the sled database failed.
    #[error("opening hash store at {path}")]
    OpenStore {
        /// Database directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: sled::Error,
    },
    /// Reading a key failed.
    #[error("reading block index of {key}")]
    ReadIndex {
        /// The volume.
        key: VolumeKey,
        /// Cause.
        #[source]
        source: sled::Error,
    },
    /// Encoding an index failed.
    #[error("encoding block index of {key}")]
    EncodeIndex {
        /// The volume.
        key: VolumeKey,
        /// Cause.
        #[source]
        source: postcard::Error,
    },
    /// Writing a key failed.
    #[error("writing block index of {key}")]
    WriteIndex {
        /// The volume.
        key: VolumeKey,
        /// Cause.
        #[source]
        source: sled::Error,
    },
    /// Removing a key failed.
    #[error("removing block index of {key}")]
    RemoveIndex {
        /// The volume.
        key: VolumeKey,
        /// Cause.
        #[source]
        source: sled::Error,
    },
    /// Flushing to disk failed: the write may not survive a crash.
    #[error("flushing block index of {key}")]
    FlushIndex {
        /// The volume.
        key: VolumeKey,
        /// Cause.
        #[source]
        source: sled::Error,
    },
}

impl IndexError {
    /// Stable, low-cardinality label for metrics and Events.
    pub fn metric_label(&self) -> &'static str {
        match self {
            IndexError::OpenStore { .. } => "open_store",
            IndexError::ReadIndex { .. } => "read_index",
            IndexError::EncodeIndex { .. } => "encode_index",
            IndexError::WriteIndex { .. } => "write_index",
            IndexError::RemoveIndex { .. } => "remove_index",
            IndexError::FlushIndex { .. } => "flush_index",
        }
    }
}

const MAGIC: &[u8; 4] = b"FDIX";
const FORMAT_VERSION: u16 = 1;
const HEADER_LEN: usize = 4 + 2 + 32;

/// Block indexes in a sled database, one per (pair, volume).
///
/// Stored value: `b"FDIX"`, format version (u16 little-endian, 1), a 32-byte BLAKE3
/// derive-key checksum over the store key and the payload, then the postcard-encoded
/// [`BlockIndex`]. A value that fails any check loads as [`LoadedIndex::Damaged`], never as an
/// index, so a torn or corrupted write costs a full copy, not a wrong delta.
#[derive(Debug, Clone)]
pub struct HashStore {
    db: sled::Db,
    path: PathBuf,
}

impl HashStore {
    /// Opens (creating if needed) the store in directory `path`.
    ///
    /// # Errors
    /// [`IndexError::OpenStore`] when sled cannot open the directory (for example when another
    /// process holds it).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, IndexError> {
        let path = path.as_ref().to_path_buf();
        let db = sled::open(&path).map_err(|source| IndexError::OpenStore {
            path: path.clone(),
            source,
        })?;
        Ok(Self { db, path })
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the index of `key`. Missing or damaged indexes are reported as such, not as
    /// errors: both mean the next sync is a full copy.
    ///
    /// # Errors
    /// [`IndexError::ReadIndex`] when sled fails to read.
    pub fn load(&self, key: &VolumeKey) -> Result<LoadedIndex, IndexError> {
        let store_key = key.store_key();
        let Some(value) = self
            .db
            .get(&store_key)
            .map_err(|source| IndexError::ReadIndex {
                key: key.clone(),
                source,
            })?
        else {
            return Ok(LoadedIndex::Missing);
        };
        match decode_stored(&store_key, &value) {
            Ok(index) => Ok(LoadedIndex::Found(index)),
            Err(damage) => {
                tracing::warn!(%key, error = %damage, "stored block index is damaged; next sync is a full copy");
                Ok(LoadedIndex::Damaged(damage))
            }
        }
    }

    /// Stores `index` for `key`, replacing any previous one, and flushes before returning.
    ///
    /// Call only once the destination has committed `index.generation`: the stored index must
    /// always describe a committed generation.
    ///
    /// # Errors
    /// [`IndexError::EncodeIndex`], [`IndexError::WriteIndex`], or [`IndexError::FlushIndex`]
    /// (the new index may then be durable or not; either way a load returns a valid index).
    pub fn save(&self, key: &VolumeKey, index: &BlockIndex) -> Result<(), IndexError> {
        let store_key = key.store_key();
        let payload = postcard::to_stdvec(index).map_err(|source| IndexError::EncodeIndex {
            key: key.clone(),
            source,
        })?;
        let mut value = Vec::with_capacity(HEADER_LEN + payload.len());
        value.extend_from_slice(MAGIC);
        value.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        value.extend_from_slice(&stored_checksum(&store_key, &payload));
        value.extend_from_slice(&payload);
        self.db
            .insert(store_key, value)
            .map_err(|source| IndexError::WriteIndex {
                key: key.clone(),
                source,
            })?;
        self.flush(key)
    }

    /// Removes the index of `key` (the volume left the pair, or must be fully recopied) and
    /// flushes. Removing a missing index succeeds.
    ///
    /// # Errors
    /// [`IndexError::RemoveIndex`] or [`IndexError::FlushIndex`].
    pub fn remove(&self, key: &VolumeKey) -> Result<(), IndexError> {
        self.db
            .remove(key.store_key())
            .map_err(|source| IndexError::RemoveIndex {
                key: key.clone(),
                source,
            })?;
        self.flush(key)
    }

    /// Removes the index of every volume of `pair` (the pair was deleted) and flushes;
    /// returns how many were removed.
    ///
    /// # Errors
    /// [`IndexError::RemoveIndex`] or [`IndexError::FlushIndex`] (keyed `pair/*`).
    pub fn remove_pair(&self, pair: &str) -> Result<usize, IndexError> {
        let all = VolumeKey::new(pair, "*");
        let prefix = VolumeKey::new(pair, "").store_key();
        let keys: Vec<sled::IVec> = self
            .db
            .scan_prefix(&prefix)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| IndexError::RemoveIndex {
                key: all.clone(),
                source,
            })?;
        for key in &keys {
            self.db
                .remove(key)
                .map_err(|source| IndexError::RemoveIndex {
                    key: all.clone(),
                    source,
                })?;
        }
        self.flush(&all)?;
        Ok(keys.len())
    }

    fn flush(&self, key: &VolumeKey) -> Result<(), IndexError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|source| IndexError::FlushIndex {
                key: key.clone(),
                source,
            })
    }

    #[cfg(test)]
    fn put_raw(&self, key: &VolumeKey, value: Vec<u8>) {
        self.db.insert(key.store_key(), value).unwrap();
    }

    #[cfg(test)]
    fn get_raw(&self, key: &VolumeKey) -> Vec<u8> {
        self.db.get(key.store_key()).unwrap().unwrap().to_vec()
    }
}

fn stored_checksum(store_key: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(STORED_INDEX_CONTEXT);
    hasher.update(&(store_key.len() as u64).to_le_bytes());
    hasher.update(store_key);
    hasher.update(payload);
    *hasher.finalize().as_bytes()
}

fn decode_stored(store_key: &[u8], value: &[u8]) -> Result<BlockIndex, IndexDamage> {
    if value.len() < HEADER_LEN {
        return Err(IndexDamage::Truncated {
            len_bytes: value.len(),
        });
    }
    let (header, payload) = value.split_at(HEADER_LEN);
    if &header[..4] != MAGIC {
        return Err(IndexDamage::BadMagic);
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != FORMAT_VERSION {
        return Err(IndexDamage::UnknownVersion { version });
    }
    if header[6..] != stored_checksum(store_key, payload) {
        return Err(IndexDamage::ChecksumMismatch);
    }
    postcard::from_bytes(payload).map_err(|source| IndexDamage::Undecodable { source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_image_index(generation: u64) -> BlockIndex {
        BlockIndex {
            generation: Generation(generation),
            block_size: BlockSize::default(),
            content: IndexContent::Image(ImageIndex {
                size_bytes: 10_000,
                blocks: vec![
                    BlockHash::of(b"a"),
                    BlockHash::of(b"b"),
                    BlockHash::of(b"c"),
                ],
            }),
        }
    }

    #[test]
    fn block_size_validation() {
        let cases = [
            (0, false),
            (256, false),
            (512, true),
            (4096, true),
            (4097, false),
            (6144, false),
            (256 * 1024, true),
            (512 * 1024, false),
        ];
        for (bytes, ok) in cases {
            assert_eq!(BlockSize::new(bytes).is_ok(), ok, "BlockSize::new({bytes})");
        }
    }

    #[test]
    fn block_len_table() {
        let bs = BlockSize::new(4096).unwrap();
        // (block, size, len, blocks_for(size))
        let cases = [
            (0, 0, 0, 0),
            (0, 1, 1, 1),
            (0, 4096, 4096, 1),
            (1, 4096, 0, 1),
            (1, 4097, 1, 2),
            (2, 10_000, 1808, 3),
        ];
        for (block, size, len, count) in cases {
            assert_eq!(bs.block_len(block, size), len, "block_len({block}, {size})");
            assert_eq!(bs.blocks_for(size), count, "blocks_for({size})");
        }
    }

    #[test]
    fn zero_hashes_match_hashing_zeros() {
        let mut zeros = ZeroHashes::new(BlockSize::new(8192).unwrap());
        for len in [1u64, 511, 4096, 5000, 8192] {
            assert_eq!(
                zeros.get(len),
                BlockHash::of(&vec![0; len as usize]),
                "len {len}"
            );
        }
    }

    #[test]
    fn store_survives_reopen_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let key = VolumeKey::new("pair-a", "data");
        let other = VolumeKey::new("pair-a", "logs");
        {
            let store = HashStore::open(dir.path()).unwrap();
            assert!(matches!(store.load(&key).unwrap(), LoadedIndex::Missing));
            store.save(&key, &sample_image_index(3)).unwrap();
            store.save(&key, &sample_image_index(4)).unwrap();
        }
        let store = HashStore::open(dir.path()).unwrap();
        let LoadedIndex::Found(index) = store.load(&key).unwrap() else {
            panic!("index of {key} lost across reopen");
        };
        assert_eq!(index, sample_image_index(4));
        assert!(matches!(store.load(&other).unwrap(), LoadedIndex::Missing));
        store.remove(&key).unwrap();
        store.remove(&key).unwrap();
        assert!(matches!(store.load(&key).unwrap(), LoadedIndex::Missing));
    }

    #[test]
    fn removing_a_pair_removes_its_volumes_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = HashStore::open(dir.path()).unwrap();
        let mine = [
            VolumeKey::new("shop/db", "data"),
            VolumeKey::new("shop/db", "logs"),
        ];
        // Same bytes as a prefix, other pairs: "shop/db" + "x..." and "shop/dbx".
        let others = [
            VolumeKey::new("shop/dbx", "data"),
            VolumeKey::new("shop/d", "bdata"),
        ];
        for key in mine.iter().chain(&others) {
            store.save(key, &sample_image_index(1)).unwrap();
        }
        assert_eq!(store.remove_pair("shop/db").unwrap(), 2);
        for key in &mine {
            assert!(matches!(store.load(key).unwrap(), LoadedIndex::Missing));
        }
        for key in &others {
            assert!(
                matches!(store.load(key).unwrap(), LoadedIndex::Found(_)),
                "{key}"
            );
        }
        assert_eq!(store.remove_pair("shop/db").unwrap(), 0);
    }

    #[test]
    fn damaged_index_loads_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let store = HashStore::open(dir.path()).unwrap();
        let key = VolumeKey::new("p", "v");
        store.save(&key, &sample_image_index(1)).unwrap();
        let good = store.get_raw(&key);

        let mut flipped_payload = good.clone();
        *flipped_payload.last_mut().unwrap() ^= 0x01;
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        let mut bad_version = good.clone();
        bad_version[4] = 9;
        let mut flipped_checksum = good.clone();
        flipped_checksum[10] ^= 0x80;
        let half = good[..good.len() / 2].to_vec();

        type Case = (&'static str, Vec<u8>, fn(&IndexDamage) -> bool);
        let cases: Vec<Case> = vec![
            ("flipped payload byte", flipped_payload, |d| {
                matches!(d, IndexDamage::ChecksumMismatch)
            }),
            ("bad magic", bad_magic, |d| {
                matches!(d, IndexDamage::BadMagic)
            }),
            ("unknown version", bad_version, |d| {
                matches!(d, IndexDamage::UnknownVersion { version: 9 })
            }),
            ("flipped checksum", flipped_checksum, |d| {
                matches!(d, IndexDamage::ChecksumMismatch)
            }),
            ("half written", half, |d| {
                matches!(d, IndexDamage::ChecksumMismatch)
            }),
            ("empty", Vec::new(), |d| {
                matches!(d, IndexDamage::Truncated { len_bytes: 0 })
            }),
        ];
        for (name, value, expected) in cases {
            store.put_raw(&key, value);
            match store.load(&key).unwrap() {
                LoadedIndex::Damaged(damage) => {
                    assert!(expected(&damage), "{name}: unexpected damage {damage:?}")
                }
                other => panic!("{name}: loaded as {other:?}"),
            }
            assert!(
                store.load(&key).unwrap().into_previous().is_none(),
                "{name}"
            );
        }
    }

    #[test]
    fn index_stored_under_one_key_is_rejected_under_another() {
        let dir = tempfile::tempdir().unwrap();
        let store = HashStore::open(dir.path()).unwrap();
        let a = VolumeKey::new("p", "a");
        let b = VolumeKey::new("p", "b");
        store.save(&a, &sample_image_index(1)).unwrap();
        store.put_raw(&b, store.get_raw(&a));
        assert!(matches!(
            store.load(&b).unwrap(),
            LoadedIndex::Damaged(IndexDamage::ChecksumMismatch)
        ));
    }

    #[test]
    fn digest_depends_on_content_not_generation() {
        let a = sample_image_index(1);
        let mut b = sample_image_index(2);
        assert_eq!(a.digest(), b.digest());
        if let IndexContent::Image(image) = &mut b.content {
            image.blocks[1] = BlockHash::of(b"B");
        }
        assert_ne!(a.digest(), b.digest());
    }
}
