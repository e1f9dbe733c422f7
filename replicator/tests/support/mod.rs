//! Shared helpers for the delta integration tests: data generators, a sync driver over the
//! public API, and an independent tree digest for comparing source and target.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use ferry_replicator::delta::{
    collect_chunks, diff, scan, Applier, BlockIndex, ChunkOptions, DeltaChunk, DeltaPlan,
    DeltaSummary, FinishOptions, Generation, ScanOptions, VolumeSnapshot,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// A seeded RNG; the seed is printed so a failure can be replayed.
pub fn rng(seed: u64) -> StdRng {
    eprintln!("rng seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// Writes `size` random bytes to `path`, 4 MiB at a time.
pub fn write_random_file(path: &Path, size: u64, rng: &mut StdRng) {
    let mut file = File::create(path).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        file.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

/// Overwrites `fraction` of the 4 KiB blocks of `path` (distinct, block-aligned, chosen at
/// random) with random bytes; returns how many blocks were written.
pub fn random_block_writes(path: &Path, fraction: f64, rng: &mut StdRng) -> u64 {
    let size = fs::metadata(path).unwrap().len();
    let blocks = size / 4096;
    let count = ((blocks as f64) * fraction).round() as u64;
    let file = OpenOptions::new().write(true).open(path).unwrap();
    let mut chosen = std::collections::HashSet::new();
    let mut buf = [0u8; 4096];
    while (chosen.len() as u64) < count {
        let block = rng.random_range(0..blocks);
        if chosen.insert(block) {
            rng.fill_bytes(&mut buf);
            file.write_all_at(&buf, block * 4096).unwrap();
        }
    }
    count
}

/// BLAKE3 of a whole file, hex.
pub fn file_hash(path: &Path) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path).unwrap()).unwrap();
    hasher.finalize().to_hex().to_string()
}

/// What one sync produced.
pub struct Synced {
    pub index: BlockIndex,
    pub plan: DeltaPlan,
    pub chunks: Vec<DeltaChunk>,
    pub summary: DeltaSummary,
}

/// Source side of a sync: scan, diff against `previous`, chunk.
pub fn plan_sync(
    previous: Option<&BlockIndex>,
    snapshot: &VolumeSnapshot,
    generation: u64,
) -> Synced {
    let scanned = scan(snapshot, &ScanOptions::default(), Generation(generation)).unwrap();
    let plan = diff(previous, &scanned.index);
    let (chunks, summary) = collect_chunks(&plan, snapshot, ChunkOptions::default()).unwrap();
    Synced {
        index: scanned.index,
        plan,
        chunks,
        summary,
    }
}

/// Destination side: apply every chunk into `target` and finish with verification.
pub fn apply_all(synced: &Synced, target: &Path) {
    let mut applier = Applier::open(target, synced.plan.kind, synced.plan.stream).unwrap();
    for chunk in &synced.chunks {
        applier.apply(chunk).unwrap();
    }
    let report = applier.finish(FinishOptions::default()).unwrap();
    assert_eq!(report.verified_digest, Some(synced.plan.target_digest));
}

/// Both sides.
pub fn sync(
    previous: Option<&BlockIndex>,
    snapshot: &VolumeSnapshot,
    target: &Path,
    generation: u64,
) -> Synced {
    let synced = plan_sync(previous, snapshot, generation);
    apply_all(&synced, target);
    synced
}

pub fn print_ratio(what: &str, summary: &DeltaSummary) {
    eprintln!(
        "{what}: {} of {} bytes on the wire = {:.3}% ({} blocks changed, {} raw payload bytes, {} compressed, {} chunks)",
        summary.wire_bytes,
        summary.bytes_scanned,
        summary.wire_ratio() * 100.0,
        summary.blocks_changed,
        summary.payload_raw_bytes,
        summary.payload_compressed_bytes,
        summary.chunks,
    );
}

/// Everything a tree replica must reproduce about one entry, read with plain `std::fs`
/// (independently of the crate's scanner).
#[derive(Clone, PartialEq, Eq)]
pub struct EntryFacts {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    /// BLAKE3 of the content (files) or the target (symlinks).
    pub content: String,
    /// Smallest path sharing this inode, for files with several links in the tree.
    pub link_group: Option<String>,
}

impl fmt::Debug for EntryFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} mode={:o} owner={}:{} mtime={}.{:09} size={} content={} group={:?}",
            self.kind,
            self.mode,
            self.uid,
            self.gid,
            self.mtime.0,
            self.mtime.1,
            self.size,
            &self.content[..self.content.len().min(16)],
            self.link_group
        )
    }
}

/// Facts of every entry under `root` (root included as ""), by relative path.
pub fn tree_facts(root: &Path) -> BTreeMap<String, EntryFacts> {
    let mut facts = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((abs, rel)) = stack.pop() {
        let md = fs::symlink_metadata(&abs).unwrap();
        let ft = md.file_type();
        let (kind, content, size) = if ft.is_dir() {
            for item in fs::read_dir(&abs).unwrap() {
                let os_name = item.unwrap().file_name();
                let name = os_name.to_string_lossy();
                let child = if rel.is_empty() {
                    name.to_string()
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((abs.join(&os_name), child));
            }
            ("dir", String::new(), 0)
        } else if ft.is_symlink() {
            let target = fs::read_link(&abs).unwrap();
            let hash = blake3::hash(target.as_os_str().as_encoded_bytes())
                .to_hex()
                .to_string();
            ("symlink", hash, 0)
        } else {
            inodes
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(rel.clone());
            ("file", file_hash(&abs), md.len())
        };
        facts.insert(
            rel,
            EntryFacts {
                kind,
                mode: if kind == "symlink" {
                    0
                } else {
                    md.mode() & 0o7777
                },
                uid: md.uid(),
                gid: md.gid(),
                mtime: (md.mtime(), md.mtime_nsec()),
                size,
                content,
                link_group: None,
            },
        );
    }
    for paths in inodes.values().filter(|p| p.len() > 1) {
        let primary = paths.iter().min().unwrap().clone();
        for path in paths {
            facts.get_mut(path).unwrap().link_group = Some(primary.clone());
        }
    }
    facts
}

/// Asserts two trees have the same facts, naming the first differing entries.
pub fn assert_same_tree(source: &Path, target: &Path) {
    let a = tree_facts(source);
    let b = tree_facts(target);
    let mut diffs = Vec::new();
    for path in a
        .keys()
        .chain(b.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        match (a.get(path), b.get(path)) {
            (Some(x), Some(y)) if x == y => {}
            (x, y) => diffs.push(format!("  {path:?}\n    source: {x:?}\n    target: {y:?}")),
        }
    }
    assert!(
        diffs.is_empty(),
        "{} of {} entries differ between {} and {}:\n{}",
        diffs.len(),
        a.len(),
        source.display(),
        target.display(),
        diffs
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Whether this process can chown to other users (tests skip ownership variety otherwise).
pub fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|md| md.uid() == 0)
        .unwrap_or(false)
}

/// Allocated bytes of a file (to check holes stayed holes).
pub fn allocated_bytes(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// `name` under `dir`.
pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
