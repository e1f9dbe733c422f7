//! Diffing: compare a new block index with the last committed one and plan the smallest delta.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::index::{
    BlockHash, BlockIndex, BlockSize, EntryKind, FileEntry, Generation, IndexContent, Meta,
    SymlinkTarget, TreeEntry, TreeIndex, VolumeDigest, VolumeKind, ZeroHashes,
};
use super::relpath::RelPath;

/// Which delta stream a chunk belongs to: from `base` (the destination's committed generation,
/// `None` for a full copy) to `generation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamId {
    /// Generation the delta applies on top of; `None` means "start from nothing".
    pub base: Option<Generation>,
    /// Generation the target holds once the whole stream is applied.
    pub generation: Generation,
}

/// The file an extent or zero range belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileRef {
    /// The block image itself.
    Image,
    /// A regular file of a tree.
    Path(RelPath),
}

/// A data-free operation on the target, shipped as is. Every op sets state rather than
/// changing it relatively, so replaying a suffix of a stream converges (see
/// [`crate::delta::apply`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Image: discard the current content (truncate to 0) before a full copy.
    ResetImage,
    /// Image: set the length in bytes (growing adds a hole, shrinking truncates).
    ResizeImage {
        /// New length in bytes.
        size_bytes: u64,
    },
    /// Tree: remove everything under the root before a full copy (the root itself stays).
    ClearTree,
    /// Tree: move the regular file `from` (a rename source) into stash slot `slot`; skipped
    /// when no regular file is there (already stashed: the new generation has no regular file
    /// at `from`, or it would not be a rename source).
    Stash {
        /// The old path.
        from: RelPath,
        /// Stash slot number, unique within the stream.
        slot: u32,
    },
    /// Tree: remove `path` if it currently is of `kind` (directories recursively).
    Remove {
        /// What to remove.
        path: RelPath,
        /// Kind it had in the base generation; anything else at `path` is left alone.
        kind: EntryKind,
    },
    /// Tree: create directory `path` (its parent exists by then) unless it exists.
    Mkdir {
        /// New directory.
        path: RelPath,
    },
    /// Tree: move stash slot `slot` to `to` (skipped if the slot is empty).
    Unstash {
        /// Stash slot number.
        slot: u32,
        /// The new path.
        to: RelPath,
    },
    /// Tree: remove the (by then empty) stash directory.
    DropStash,
    /// Tree: replace whatever non-directory is at `path` by a new empty file (a new inode, so
    /// former hard links are broken) of `size_bytes`, all holes until extents fill it.
    CreateFile {
        /// The file.
        path: RelPath,
        /// Length in bytes.
        size_bytes: u64,
    },
    /// Tree: set the length of the existing file `path`.
    ResizeFile {
        /// The file.
        path: RelPath,
        /// New length in bytes.
        size_bytes: u64,
    },
    /// Zero a byte range that held data in the base generation (punching a hole where the
    /// filesystem allows).
    ZeroRange {
        /// The file.
        file: FileRef,
        /// Start, in bytes.
        offset_bytes: u64,
        /// Length, in bytes.
        len_bytes: u64,
    },
    /// Tree: make `path` a symlink to `target`, replacing a non-directory there.
    Symlink {
        /// The link.
        path: RelPath,
        /// Its target.
        target: SymlinkTarget,
    },
    /// Tree: make `path` a hard link to the file `target`, replacing a non-directory there.
    HardLink {
        /// The new name.
        path: RelPath,
        /// The link group's primary, already complete.
        target: RelPath,
    },
    /// Tree: set owner, group, mode (not on symlinks) and mtime of `path`.
    SetMeta {
        /// The entry.
        path: RelPath,
        /// Its kind.
        kind: EntryKind,
        /// The metadata.
        meta: Meta,
    },
}

/// One step of a plan: an op, or a byte range to copy from the source snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Ship this op.
    Op(Op),
    /// Read this range of the source (whole blocks, the last clipped to the file's length),
    /// compress it and ship it as extents.
    Copy {
        /// The file.
        file: FileRef,
        /// Start, in bytes (a multiple of the block size).
        offset_bytes: u64,
        /// Length, in bytes.
        len_bytes: u64,
    },
}

/// Counters describing a plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    /// Blocks the new index describes (hard-linked files once).
    pub blocks_scanned: u64,
    /// Bytes the new index describes (hard-linked files once).
    pub bytes_scanned: u64,
    /// Blocks to copy.
    pub blocks_changed: u64,
    /// Bytes to copy, before compression.
    pub bytes_changed: u64,
    /// Blocks that became all-zero and will be zeroed or punched.
    pub blocks_zeroed: u64,
    /// Files shipped as renames instead of copies.
    pub renames: u64,
}

/// What to ship to take the destination from the base generation to the new one.
///
/// Steps are in apply order. For trees: stash rename sources; remove (children before
/// parents); mkdir (parents before children); unstash rename targets; create/update files and
/// their data; symlinks and hard links; metadata (children before parents, so directory
/// mtimes survive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaPlan {
    /// Base and new generation.
    pub stream: StreamId,
    /// Image or tree.
    pub kind: VolumeKind,
    /// Block size of both indexes.
    pub block_size: BlockSize,
    /// Steps in apply order.
    pub steps: Vec<Step>,
    /// Digest of the new index: what the target must hash to once applied.
    pub target_digest: VolumeDigest,
    /// Counters.
    pub stats: PlanStats,
}

/// Plans the delta from `previous` (the index of the destination's last committed generation)
/// to `current` (a fresh scan).
///
/// `previous` is ignored (full copy, `stream.base == None`) when it is `None`, or describes the
/// other volume kind, or another block size. The first sync is this same path.
///
/// For trees, a new regular file whose content equals a removed one's (same length and block
/// hashes, both outside hard-link groups, non-empty) is a rename, not a copy. Hard-link group
/// members other than the primary become [`Op::HardLink`]s. Zero blocks are never copied:
/// fresh files and images start as holes, and blocks that became zero get [`Op::ZeroRange`].
#[tracing::instrument(name = "delta", skip_all, fields(step = "diff", generation = current.generation.0))]
pub fn diff(previous: Option<&BlockIndex>, current: &BlockIndex) -> DeltaPlan {
    let base = previous.filter(|p| {
        let usable = p.block_size == current.block_size && p.kind() == current.kind();
        if !usable {
            tracing::info!(
                previous_block_size = p.block_size.bytes(),
                block_size = current.block_size.bytes(),
                "previous index has another kind or block size; planning a full copy"
            );
        }
        usable
    });
    let mut stats = PlanStats {
        blocks_scanned: current.blocks_total(),
        bytes_scanned: current.bytes_total(),
        ..PlanStats::default()
    };
    let mut zeros = ZeroHashes::new(current.block_size);
    let steps = match &current.content {
        IndexContent::Image(image) => {
            let old = base.and_then(|b| match &b.content {
                IndexContent::Image(old) => Some((old.blocks.as_slice(), old.size_bytes)),
                IndexContent::Tree(_) => None,
            });
            let mut steps = Vec::new();
            if base.is_none() {
                steps.push(Step::Op(Op::ResetImage));
            }
            steps.push(Step::Op(Op::ResizeImage {
                size_bytes: image.size_bytes,
            }));
            let ranges = diff_blocks(
                old,
                &image.blocks,
                image.size_bytes,
                current.block_size,
                &mut zeros,
                &mut stats,
            );
            push_ranges(&mut steps, &FileRef::Image, ranges);
            steps
        }
        IndexContent::Tree(tree) => {
            let old = base.and_then(|b| match &b.content {
                IndexContent::Tree(old) => Some(old),
                IndexContent::Image(_) => None,
            });
            TreeDiff::new(old, tree, current.block_size, &mut zeros, &mut stats).steps()
        }
    };
    let plan = DeltaPlan {
        stream: StreamId {
            base: base.map(|b| b.generation),
            generation: current.generation,
        },
        kind: current.kind(),
        block_size: current.block_size,
        steps,
        target_digest: current.digest(),
        stats,
    };
    tracing::debug!(steps = plan.steps.len(), stats = ?plan.stats, base = ?plan.stream.base, "planned");
    plan
}

/// What to do with a byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    Copy,
    Zero,
}

/// A coalesced range of blocks, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    fill: Fill,
    offset_bytes: u64,
    len_bytes: u64,
}

/// Compares block hashes; returns coalesced copy and zero ranges in offset order.
///
/// `old` is the base's hashes and length, `None` when the target starts empty.
fn diff_blocks(
    old: Option<(&[BlockHash], u64)>,
    new: &[BlockHash],
    new_size: u64,
    block_size: BlockSize,
    zeros: &mut ZeroHashes,
    stats: &mut PlanStats,
) -> Vec<Range> {
    let mut ranges: Vec<Range> = Vec::new();
    for (i, hash) in new.iter().enumerate() {
        let block = i as u64;
        let new_len = block_size.block_len(block, new_size);
        let old_block = old.and_then(|(hashes, old_size)| {
            let old_len = block_size.block_len(block, old_size);
            hashes.get(i).filter(|_| old_len > 0).map(|h| (*h, old_len))
        });
        let fill = if *hash == zeros.get(new_len) {
            // After the resize, bytes past the old end read as zero; only old data needs zeroing.
            match old_block {
                Some((old_hash, old_len)) if old_hash != zeros.get(old_len) => Fill::Zero,
                _ => continue,
            }
        } else {
            match old_block {
                Some((old_hash, old_len)) if old_len == new_len && old_hash == *hash => continue,
                _ => Fill::Copy,
            }
        };
        match fill {
            Fill::Copy => {
                stats.blocks_changed += 1;
                stats.bytes_changed += new_len;
            }
            Fill::Zero => stats.blocks_zeroed += 1,
        }
        let offset = block * block_size.bytes_u64();
        match ranges.last_mut() {
            Some(last) if last.fill == fill && last.offset_bytes + last.len_bytes == offset => {
                last.len_bytes += new_len;
            }
            _ => ranges.push(Range {
                fill,
                offset_bytes: offset,
                len_bytes: new_len,
            }),
        }
    }
    ranges
}

fn push_ranges(steps: &mut Vec<Step>, file: &FileRef, ranges: Vec<Range>) {
    for range in ranges {
        steps.push(match range.fill {
            Fill::Copy => Step::Copy {
                file: file.clone(),
                offset_bytes: range.offset_bytes,
                len_bytes: range.len_bytes,
            },
            Fill::Zero => Step::Op(Op::ZeroRange {
                file: file.clone(),
                offset_bytes: range.offset_bytes,
                len_bytes: range.len_bytes,
            }),
        });
    }
}

/// Tree diff state: the classification of paths shared by the phases.
struct TreeDiff<'a, 'z> {
    old: &'a BTreeMap<RelPath, TreeEntry>,
    new: &'a BTreeMap<RelPath, TreeEntry>,
    full_copy: bool,
    block_size: BlockSize,
    zeros: &'z mut ZeroHashes,
    stats: &'z mut PlanStats,
    /// Old paths gone or of another kind in the new tree.
    removed: Vec<&'a RelPath>,
    /// New paths absent or of another kind in the old tree.
    created: BTreeSet<&'a RelPath>,
    /// (from, to), slot = position.
    renames: Vec<(&'a RelPath, &'a RelPath)>,
    /// Directories whose entries change (so their mtime must be set again).
    touched_dirs: BTreeSet<RelPath>,
    /// Paths needing their metadata set whatever the base said.
    meta_needed: BTreeSet<&'a RelPath>,
}

static EMPTY_TREE: BTreeMap<RelPath, TreeEntry> = BTreeMap::new();

impl<'a, 'z> TreeDiff<'a, 'z> {
    fn new(
        old: Option<&'a TreeIndex>,
        new: &'a TreeIndex,
        block_size: BlockSize,
        zeros: &'z mut ZeroHashes,
        stats: &'z mut PlanStats,
    ) -> Self {
        let old_entries = old.map(|t| &t.entries).unwrap_or(&EMPTY_TREE);
        let new_entries = &new.entries;
        let removed = old_entries
            .iter()
            .filter(|(path, entry)| {
                !path.is_root() && new_entries.get(*path).map(TreeEntry::kind) != Some(entry.kind())
            })
            .map(|(path, _)| path)
            .collect();
        let created = new_entries
            .iter()
            .filter(|(path, entry)| {
                !path.is_root() && old_entries.get(*path).map(TreeEntry::kind) != Some(entry.kind())
            })
            .map(|(path, _)| path)
            .collect();
        let mut diff = Self {
            old: old_entries,
            new: new_entries,
            full_copy: old.is_none(),
            block_size,
            zeros,
            stats,
            removed,
            created,
            renames: Vec::new(),
            touched_dirs: BTreeSet::new(),
            meta_needed: BTreeSet::new(),
        };
        diff.find_renames();
        diff
    }

    /// Pairs created files with removed files of identical content (first by path order).
    fn find_renames(&mut self) {
        let old_primaries = primaries(self.old);
        let new_primaries = primaries(self.new);
        let mut sources: HashMap<[u8; 32], VecDeque<&'a RelPath>> = HashMap::new();
        for path in &self.removed {
            if let Some(TreeEntry::File(file)) = self.old.get(*path) {
                if renamable(file) && !old_primaries.contains(path) {
                    sources
                        .entry(file.content_id())
                        .or_default()
                        .push_back(path);
                }
            }
        }
        if sources.is_empty() {
            return;
        }
        for path in &self.created {
            if let Some(TreeEntry::File(file)) = self.new.get(*path) {
                if renamable(file) && !new_primaries.contains(path) {
                    if let Some(from) = sources
                        .get_mut(&file.content_id())
                        .and_then(VecDeque::pop_front)
                    {
                        self.renames.push((from, path));
                    }
                }
            }
        }
        self.stats.renames = self.renames.len() as u64;
    }

    fn touch_parent(&mut self, path: &RelPath) {
        if let Some(parent) = path.parent() {
            self.touched_dirs.insert(parent);
        }
    }

    fn steps(mut self) -> Vec<Step> {
        let mut steps = Vec::new();
        if self.full_copy {
            steps.push(Step::Op(Op::ClearTree));
        }

        // 1. Park rename sources, so removals and mkdirs below cannot collide with them.
        let renames = std::mem::take(&mut self.renames);
        let rename_sources: BTreeSet<&RelPath> = renames.iter().map(|(from, _)| *from).collect();
        let rename_targets: BTreeMap<&RelPath, &RelPath> =
            renames.iter().map(|(from, to)| (*to, *from)).collect();
        for (slot, (from, _)) in renames.iter().enumerate() {
            steps.push(Step::Op(Op::Stash {
                from: (*from).clone(),
                slot: slot as u32,
            }));
            self.touch_parent(from);
        }
        if !renames.is_empty() {
            // The stash directory comes and goes in the root.
            self.touched_dirs.insert(RelPath::root());
        }

        // 2. Removals, children before parents.
        for path in std::mem::take(&mut self.removed).into_iter().rev() {
            if rename_sources.contains(path) {
                continue;
            }
            let kind = self.old[path].kind();
            steps.push(Step::Op(Op::Remove {
                path: path.clone(),
                kind,
            }));
            self.touch_parent(path);
        }

        // 3. New directories, parents before children.
        let created: Vec<&RelPath> = self.created.iter().copied().collect();
        for path in &created {
            if matches!(self.new[*path], TreeEntry::Dir { .. }) {
                steps.push(Step::Op(Op::Mkdir {
                    path: (*path).clone(),
                }));
                self.touch_parent(path);
            }
        }

        // 4. Rename targets out of the stash.
        for (slot, (_, to)) in renames.iter().enumerate() {
            steps.push(Step::Op(Op::Unstash {
                slot: slot as u32,
                to: (*to).clone(),
            }));
            self.touch_parent(to);
            self.meta_needed.insert(to);
        }
        if !renames.is_empty() {
            steps.push(Step::Op(Op::DropStash));
        }

        // 5. Regular files (hard-link primaries and unlinked files): create or update, data.
        // Paths whose inode is new in this stream: their other links must be made again.
        let mut new_inodes: BTreeSet<&RelPath> = BTreeSet::new();
        for (path, entry) in self.new {
            let TreeEntry::File(file) = entry else {
                continue;
            };
            if file.hardlink_of.is_some() {
                continue;
            }
            if rename_targets.contains_key(path) {
                // Identical content arrived with the rename.
                new_inodes.insert(path);
                continue;
            }
            let old_file = match self.old.get(path) {
                Some(TreeEntry::File(old)) if old.hardlink_of.is_none() => Some(old),
                // An old non-primary link shares its inode with paths that may keep other
                // content: write a fresh inode instead of updating in place.
                _ => None,
            };
            let before = steps.len();
            let ranges = match old_file {
                None => {
                    steps.push(Step::Op(Op::CreateFile {
                        path: path.clone(),
                        size_bytes: file.size_bytes,
                    }));
                    self.touch_parent(path);
                    new_inodes.insert(path);
                    diff_blocks(
                        None,
                        &file.blocks,
                        file.size_bytes,
                        self.block_size,
                        self.zeros,
                        self.stats,
                    )
                }
                Some(old) => {
                    if old.size_bytes != file.size_bytes {
                        steps.push(Step::Op(Op::ResizeFile {
                            path: path.clone(),
                            size_bytes: file.size_bytes,
                        }));
                    }
                    diff_blocks(
                        Some((&old.blocks, old.size_bytes)),
                        &file.blocks,
                        file.size_bytes,
                        self.block_size,
                        self.zeros,
                        self.stats,
                    )
                }
            };
            push_ranges(&mut steps, &FileRef::Path(path.clone()), ranges);
            if steps.len() > before {
                // Writing moved the mtime.
                self.meta_needed.insert(path);
            }
        }

        // 6. Symlinks and the other members of hard-link groups.
        for (path, entry) in self.new {
            match entry {
                TreeEntry::Symlink { target, .. } => {
                    let unchanged = matches!(
                        self.old.get(path),
                        Some(TreeEntry::Symlink { target: old, .. }) if old == target
                    );
                    if !unchanged {
                        steps.push(Step::Op(Op::Symlink {
                            path: path.clone(),
                            target: target.clone(),
                        }));
                        self.touch_parent(path);
                        self.meta_needed.insert(path);
                    }
                }
                TreeEntry::File(FileEntry {
                    hardlink_of: Some(primary),
                    ..
                }) => {
                    let same_link = matches!(
                        self.old.get(path),
                        Some(TreeEntry::File(FileEntry { hardlink_of: Some(old), .. })) if old == primary
                    );
                    if !same_link || new_inodes.contains(primary) {
                        steps.push(Step::Op(Op::HardLink {
                            path: path.clone(),
                            target: primary.clone(),
                        }));
                        self.touch_parent(path);
                    }
                }
                TreeEntry::Dir { .. } | TreeEntry::File(_) => {}
            }
        }

        // 7. Metadata, children before parents so directory mtimes stick.
        for (path, entry) in self.new.iter().rev() {
            let old_meta = self
                .old
                .get(path)
                .filter(|old| old.kind() == entry.kind())
                .map(TreeEntry::meta);
            if matches!(
                entry,
                TreeEntry::File(FileEntry {
                    hardlink_of: Some(_),
                    ..
                })
            ) {
                // Shares the primary's inode, whose metadata the primary's op sets.
                continue;
            }
            let needed = self.full_copy
                || old_meta != Some(entry.meta())
                || self.created.contains(path)
                || self.meta_needed.contains(path)
                || self.touched_dirs.contains(path);
            if needed {
                steps.push(Step::Op(Op::SetMeta {
                    path: path.clone(),
                    kind: entry.kind(),
                    meta: *entry.meta(),
                }));
            }
        }
        steps
    }
}

/// Paths other entries name as their hard-link primary.
fn primaries(entries: &BTreeMap<RelPath, TreeEntry>) -> BTreeSet<&RelPath> {
    entries
        .values()
        .filter_map(|entry| match entry {
            TreeEntry::File(FileEntry {
                hardlink_of: Some(primary),
                ..
            }) => Some(primary),
            _ => None,
        })
        .collect()
}

/// Files worth shipping as a rename: non-empty and outside hard-link groups.
fn renamable(file: &FileEntry) -> bool {
    file.size_bytes > 0 && file.hardlink_of.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::index::{ImageIndex, Mtime};

    const BS: u32 = 512;

    /// Block hashes from a pattern: `0` is an all-zero block, any other letter a data block
    /// with that content.
    fn blocks(pattern: &str, size: u64) -> Vec<BlockHash> {
        let bs = BlockSize::new(BS).unwrap();
        pattern
            .chars()
            .enumerate()
            .map(|(i, c)| {
                let len = bs.block_len(i as u64, size) as usize;
                let byte = if c == '0' { 0 } else { c as u8 };
                BlockHash::of(&vec![byte; len])
            })
            .collect()
    }

    fn image(generation: u64, pattern: &str, size: u64) -> BlockIndex {
        BlockIndex {
            generation: Generation(generation),
            block_size: BlockSize::new(BS).unwrap(),
            content: IndexContent::Image(ImageIndex {
                size_bytes: size,
                blocks: blocks(pattern, size),
            }),
        }
    }

    fn render(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|step| match step {
                Step::Copy {
                    file,
                    offset_bytes,
                    len_bytes,
                } => format!("copy {} {offset_bytes}+{len_bytes}", file_name(file)),
                Step::Op(op) => match op {
                    Op::ResetImage => "reset".into(),
                    Op::ResizeImage { size_bytes } => format!("resize {size_bytes}"),
                    Op::ClearTree => "clear".into(),
                    Op::Stash { from, slot } => format!("stash {from} {slot}"),
                    Op::Remove { path, kind } => format!("rm {path} {kind:?}"),
                    Op::Mkdir { path } => format!("mkdir {path}"),
                    Op::Unstash { slot, to } => format!("unstash {slot} {to}"),
                    Op::DropStash => "dropstash".into(),
                    Op::CreateFile { path, size_bytes } => format!("create {path} {size_bytes}"),
                    Op::ResizeFile { path, size_bytes } => format!("truncate {path} {size_bytes}"),
                    Op::ZeroRange {
                        file,
                        offset_bytes,
                        len_bytes,
                    } => format!("zero {} {offset_bytes}+{len_bytes}", file_name(file)),
                    Op::Symlink { path, target } => {
                        format!("symlink {path} -> {}", String::from_utf8_lossy(&target.0))
                    }
                    Op::HardLink { path, target } => format!("link {path} => {target}"),
                    Op::SetMeta { path, meta, .. } => format!("meta {path} {:o}", meta.mode),
                },
            })
            .collect()
    }

    fn file_name(file: &FileRef) -> String {
        match file {
            FileRef::Image => "img".into(),
            FileRef::Path(path) => path.to_string(),
        }
    }

    /// (name, old (pattern, size) or none for a first sync, new pattern, new size, steps)
    type ImageCase = (
        &'static str,
        Option<(&'static str, u64)>,
        &'static str,
        u64,
        Vec<&'static str>,
    );

    /// (name, old tree spec or none for a first sync, new tree spec, steps)
    type TreeCase = (
        &'static str,
        Option<Vec<&'static str>>,
        Vec<&'static str>,
        Vec<&'static str>,
    );

    #[test]
    fn image_runs_table() {
        let cases: Vec<ImageCase> = vec![
            (
                "first sync skips zeros",
                None,
                "AB00C",
                2560,
                vec![
                    "reset",
                    "resize 2560",
                    "copy img 0+1024",
                    "copy img 2048+512",
                ],
            ),
            (
                "unchanged",
                Some(("AB0C", 2048)),
                "AB0C",
                2048,
                vec!["resize 2048"],
            ),
            (
                "adjacent changes coalesce",
                Some(("ABCDE", 2560)),
                "AXYDZ",
                2560,
                vec!["resize 2560", "copy img 512+1024", "copy img 2048+512"],
            ),
            (
                "data becomes zero",
                Some(("AB0C", 2048)),
                "A00C",
                2048,
                vec!["resize 2048", "zero img 512+512"],
            ),
            (
                "grow with zeros needs nothing",
                Some(("AB", 1024)),
                "AB00",
                2048,
                vec!["resize 2048"],
            ),
            (
                "grow past a short block",
                Some(("AB", 700)),
                "ABC",
                1500,
                vec!["resize 1500", "copy img 512+988"],
            ),
            (
                "shrink to a short block",
                Some(("ABC", 1536)),
                "AB",
                600,
                vec!["resize 600", "copy img 512+88"],
            ),
            (
                "shrink to empty",
                Some(("AB", 1024)),
                "",
                0,
                vec!["resize 0"],
            ),
            ("empty first sync", None, "", 0, vec!["reset", "resize 0"]),
        ];
        for (name, old, new_pattern, new_size, expected) in cases {
            let old = old.map(|(pattern, size)| image(1, pattern, size));
            let new = image(2, new_pattern, new_size);
            let plan = diff(old.as_ref(), &new);
            assert_eq!(render(&plan.steps), expected, "{name}");
            assert_eq!(
                plan.stream.base,
                old.as_ref().map(|_| Generation(1)),
                "{name}"
            );
            assert_eq!(plan.target_digest, new.digest(), "{name}");
        }
    }

    #[test]
    fn other_block_size_or_kind_means_full_copy() {
        let old = image(1, "AB", 1024);
        let mut new = image(2, "AB", 1024);
        new.block_size = BlockSize::new(1024).unwrap();
        assert_eq!(diff(Some(&old), &new).stream.base, None);
        let tree = BlockIndex {
            generation: Generation(1),
            block_size: BlockSize::new(BS).unwrap(),
            content: IndexContent::Tree(TreeIndex {
                entries: BTreeMap::new(),
            }),
        };
        assert_eq!(diff(Some(&tree), &image(2, "AB", 1024)).stream.base, None);
    }

    /// Builds tree indexes from a terse description: `path:kind[:extra]` where kind is `d`,
    /// `f` (extra = content pattern), `l` (extra = symlink target) or `h` (extra = primary).
    fn tree(generation: u64, spec: &[&str]) -> BlockIndex {
        let mut entries = BTreeMap::new();
        let meta = |mode| Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: Mtime { secs: 1, nanos: 0 },
        };
        entries.insert(RelPath::root(), TreeEntry::Dir { meta: meta(0o755) });
        for item in spec {
            let parts: Vec<&str> = item.split(':').collect();
            let path = RelPath::new(parts[0].as_bytes()).unwrap();
            let mode = |at: usize, default| {
                parts
                    .get(at)
                    .map_or(default, |m| u32::from_str_radix(m, 8).unwrap())
            };
            let entry = match parts[1] {
                "d" => TreeEntry::Dir {
                    meta: meta(mode(2, 0o755)),
                },
                "f" | "h" => {
                    let (pattern, link, mode) = if parts[1] == "f" {
                        (parts[2], None, mode(3, 0o644))
                    } else {
                        (
                            parts[3],
                            Some(RelPath::new(parts[2].as_bytes()).unwrap()),
                            0o644,
                        )
                    };
                    let size = pattern.len() as u64 * u64::from(BS);
                    TreeEntry::File(FileEntry {
                        meta: meta(mode),
                        size_bytes: size,
                        blocks: blocks(pattern, size),
                        hardlink_of: link,
                    })
                }
                "l" => TreeEntry::Symlink {
                    meta: meta(0o777),
                    target: SymlinkTarget(parts[2].as_bytes().to_vec()),
                },
                other => panic!("bad kind {other}"),
            };
            entries.insert(path, entry);
        }
        BlockIndex {
            generation: Generation(generation),
            block_size: BlockSize::new(BS).unwrap(),
            content: IndexContent::Tree(TreeIndex { entries }),
        }
    }

    #[test]
    fn tree_steps_table() {
        let cases: Vec<TreeCase> = vec![
            (
                "first sync: parents first, holes skipped, meta children first",
                None,
                vec!["a:d", "a/x:f:A0B", "l:l:a/x"],
                vec![
                    "clear",
                    "mkdir a",
                    "create a/x 1536",
                    "copy a/x 0+512",
                    "copy a/x 1024+512",
                    "symlink l -> a/x",
                    "meta l 777",
                    "meta a/x 644",
                    "meta a 755",
                    "meta . 755",
                ],
            ),
            (
                "unchanged tree ships nothing",
                Some(vec!["a:d", "a/x:f:AB"]),
                vec!["a:d", "a/x:f:AB"],
                vec![],
            ),
            (
                "in-place update and truncate",
                Some(vec!["x:f:ABC"]),
                vec!["x:f:AX"],
                vec!["truncate x 1024", "copy x 512+512", "meta x 644"],
            ),
            (
                "delete a directory: children first",
                Some(vec!["d:d", "d/e:d", "d/e/f:f:A", "keep:f:K"]),
                vec!["keep:f:K"],
                vec!["rm d/e/f File", "rm d/e Dir", "rm d Dir", "meta . 755"],
            ),
            (
                "rename out of a removed directory into a new one",
                Some(vec!["old:d", "old/big:f:ABCD"]),
                vec!["new:d", "new/big:f:ABCD"],
                vec![
                    "stash old/big 0",
                    "rm old Dir",
                    "mkdir new",
                    "unstash 0 new/big",
                    "dropstash",
                    "meta new/big 644",
                    "meta new 755",
                    "meta . 755",
                ],
            ),
            (
                "file replaced by a directory",
                Some(vec!["p:f:AB"]),
                vec!["p:d", "p/q:f:C"],
                vec![
                    "rm p File",
                    "mkdir p",
                    "create p/q 512",
                    "copy p/q 0+512",
                    "meta p/q 644",
                    "meta p 755",
                    "meta . 755",
                ],
            ),
            (
                "chmod only",
                Some(vec!["x:f:A"]),
                vec!["x:f:A:600"],
                vec!["meta x 600"],
            ),
            (
                "new hard link to an unchanged file",
                Some(vec!["a:f:AB"]),
                vec!["a:f:AB", "b:h:a:AB"],
                vec!["link b => a", "meta . 755"],
            ),
            (
                "hard link broken: the former member gets its own inode",
                Some(vec!["a:f:AB", "b:h:a:AB"]),
                vec!["a:f:AX", "b:f:AB"],
                vec![
                    "copy a 512+512",
                    "create b 1024",
                    "copy b 0+1024",
                    "meta b 644",
                    "meta a 644",
                    "meta . 755",
                ],
            ),
            (
                "removing an unrelated directory leaves links alone",
                Some(vec!["a:d", "b:f:AB", "c:h:b:AB"]),
                vec!["b:f:AB", "c:h:b:AB"],
                vec!["rm a Dir", "meta . 755"],
            ),
            (
                "former member becomes primary: fresh inode, links follow",
                Some(vec!["a:f:AB", "b:h:a:AB"]),
                vec!["b:f:XY", "c:h:b:XY"],
                vec![
                    "rm a File",
                    "create b 1024",
                    "copy b 0+1024",
                    "link c => b",
                    "meta b 644",
                    "meta . 755",
                ],
            ),
            (
                "symlink retargeted, empty files are not renames",
                Some(vec!["l:l:one", "e1:f:"]),
                vec!["l:l:two", "e2:f:"],
                vec![
                    "rm e1 File",
                    "create e2 0",
                    "symlink l -> two",
                    "meta l 777",
                    "meta e2 644",
                    "meta . 755",
                ],
            ),
        ];
        for (name, old, new, expected) in cases {
            let old = old.map(|spec| tree(1, &spec));
            let new = tree(2, &new);
            let plan = diff(old.as_ref(), &new);
            assert_eq!(render(&plan.steps), expected, "{name}");
        }
    }

    #[test]
    fn identical_contents_rename_one_source_each() {
        let old = tree(1, &["a1:f:AB", "a2:f:AB"]);
        let new = tree(2, &["b1:f:AB", "b2:f:AB", "b3:f:AB"]);
        let plan = diff(Some(&old), &new);
        assert_eq!(plan.stats.renames, 2);
        let rendered = render(&plan.steps);
        assert!(
            rendered.contains(&"unstash 0 b1".to_string()),
            "{rendered:?}"
        );
        assert!(
            rendered.contains(&"unstash 1 b2".to_string()),
            "{rendered:?}"
        );
        assert!(
            rendered.contains(&"create b3 1024".to_string()),
            "{rendered:?}"
        );
        assert_eq!(plan.stats.blocks_changed, 2, "only b3 is copied");
    }
}
