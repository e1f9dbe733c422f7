//! File tree volumes end to end: full sync, 1% of files changed, renames, links, holes,
//! kind changes, corruption and replay.

mod support;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::path::Path;

use ferry_replicator::delta::{Applier, ApplyError, DeltaChunk, FinishOptions, VolumeSnapshot};
use rand::rngs::StdRng;
use rand::{Rng, RngCore};
use support::{
    allocated_bytes, apply_all, assert_same_tree, plan_sync, print_ratio, rng, running_as_root,
    sync, tree_facts, write_random_file,
};

const MODES: [u32; 4] = [0o644, 0o600, 0o640, 0o755];

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, id: u32) {
    std::os::unix::fs::lchown(path, Some(id), Some(id)).unwrap();
}

/// Builds the test tree under `root`; returns the relative paths of its plain data files.
///
/// 8 top directories with 3 subdirectories each (plus a deeper chain), 240 random files of
/// 1–96 KiB in varied modes (and owners when root), a relative and a dangling absolute
/// symlink, a hard-link pair, a 1 MiB sparse file, an empty file, a setuid file, a 0700
/// directory.
fn build_tree(root: &Path, rng: &mut StdRng) -> Vec<String> {
    let mut dirs = Vec::new();
    for d in 0..8 {
        for s in 0..3 {
            let dir = format!("d{d}/s{s}");
            fs::create_dir_all(root.join(&dir)).unwrap();
            dirs.push(dir);
        }
    }
    fs::create_dir_all(root.join("d0/s0/deep/er/still")).unwrap();
    dirs.push("d0/s0/deep/er/still".into());
    let mut files = Vec::new();
    for i in 0..240 {
        let rel = format!("{}/f{i:03}.dat", dirs[i % dirs.len()]);
        let size = rng.random_range(1024..96 * 1024);
        write_random_file(&root.join(&rel), size, rng);
        chmod(&root.join(&rel), MODES[i % MODES.len()]);
        if running_as_root() && i % 7 == 0 {
            chown(&root.join(&rel), 1000);
        }
        files.push(rel);
    }
    symlink("../d2/s0/f002.dat", root.join("d1/link-to-f")).unwrap();
    symlink("/nonexistent/target", root.join("abs-dangling")).unwrap();
    write_random_file(&root.join("d4/hard-a"), 20_000, rng);
    fs::hard_link(root.join("d4/hard-a"), root.join("d6/s1/hard-b")).unwrap();
    let sparse = File::create(root.join("d5/sparse.img")).unwrap();
    sparse.set_len(1 << 20).unwrap();
    sparse.write_all_at(&[0x11; 4096], 256 * 1024).unwrap();
    sparse.write_all_at(&[0x22; 100], (1 << 20) - 100).unwrap();
    File::create(root.join("d7/empty")).unwrap();
    write_random_file(&root.join("d3/setuid-tool"), 3000, rng);
    chmod(&root.join("d3/setuid-tool"), 0o4755);
    chmod(&root.join("d2/s1"), 0o700);
    if running_as_root() {
        chown(&root.join("d3"), 1001);
        chown(&root.join("d1/link-to-f"), 1002);
    }
    files
}

#[test]
fn tree_full_sync_then_one_percent_of_files_changed_ships_at_most_two_percent() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let target = dir.path().join("target");
    fs::create_dir(&source).unwrap();
    let mut rng = rng(42);
    let files = build_tree(&source, &mut rng);
    let snapshot = VolumeSnapshot::Tree(source.clone());

    let first = sync(None, &snapshot, &target, 1);
    assert_same_tree(&source, &target);
    print_ratio("tree full sync", &first.summary);
    assert!(
        allocated_bytes(&target.join("d5/sparse.img")) < 64 * 1024,
        "sparse file lost its holes: {} bytes allocated",
        allocated_bytes(&target.join("d5/sparse.img"))
    );
    let facts = tree_facts(&target);
    assert_eq!(facts["d4/hard-a"].link_group.as_deref(), Some("d4/hard-a"));
    assert_eq!(
        facts["d6/s1/hard-b"].link_group.as_deref(),
        Some("d4/hard-a")
    );

    // 1% of 240 files modified in place (one 4 KiB block each), plus one rename, one delete,
    // one new file and one chmod.
    let big: Vec<&String> = files
        .iter()
        .filter(|f| fs::metadata(source.join(f)).unwrap().len() >= 8192)
        .collect();
    for rel in &big[..3] {
        let path = source.join(rel);
        let blocks = fs::metadata(&path).unwrap().len() / 4096;
        let mut block = [0u8; 4096];
        rng.fill_bytes(&mut block);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&block, rng.random_range(0..blocks) * 4096)
            .unwrap();
    }
    fs::rename(source.join(big[3]), source.join("d7/s2/renamed.dat")).unwrap();
    fs::remove_file(source.join(big[4])).unwrap();
    write_random_file(&source.join("d6/new.dat"), 16 * 1024, &mut rng);
    chmod(&source.join(big[5]), 0o604);

    let second = sync(Some(&first.index), &snapshot, &target, 2);
    assert_same_tree(&source, &target);
    print_ratio("tree after 1% of files changed", &second.summary);
    assert_eq!(second.plan.stats.renames, 1);
    assert!(
        second.summary.wire_ratio() <= 0.02,
        "shipped {:.3}% of the tree",
        second.summary.wire_ratio() * 100.0
    );

    // Applying the same delta again changes nothing.
    apply_all(&second, &target);
    assert_same_tree(&source, &target);
}

#[test]
fn tree_replay_resume_and_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    fs::create_dir(&source).unwrap();
    let mut rng = rng(7);
    build_tree(&source, &mut rng);
    let snapshot = VolumeSnapshot::Tree(source.clone());
    let full = plan_sync(None, &snapshot, 1);
    assert!(full.chunks.len() >= 4, "{} chunks", full.chunks.len());

    // Interrupted after chunk 3; the source re-sends from chunk 1.
    let target = dir.path().join("resumed");
    let mut applier = Applier::open(&target, full.plan.kind, full.plan.stream).unwrap();
    for chunk in &full.chunks[..4] {
        applier.apply(chunk).unwrap();
    }
    for chunk in &full.chunks[1..] {
        applier.apply(chunk).unwrap();
    }
    applier.finish(FinishOptions::default()).unwrap();
    assert_same_tree(&source, &target);

    // A full copy into a target holding junk replaces the junk.
    let junk = dir.path().join("junk");
    fs::create_dir_all(junk.join("d0/unrelated")).unwrap();
    fs::write(junk.join("d1"), b"a file where a directory goes").unwrap();
    apply_all(&full, &junk);
    assert_same_tree(&source, &junk);

    // A corrupt chunk of a delta is refused and leaves the tree as it was.
    fs::remove_file(source.join("d7/empty")).unwrap();
    write_random_file(&source.join("d0/added"), 5000, &mut rng);
    let delta = plan_sync(Some(&full.index), &snapshot, 2);
    let before = tree_facts(&target);
    let mut wire = delta.chunks[0].to_bytes();
    let last = wire.len() - 1;
    wire[last] ^= 0xff;
    let mut applier = Applier::open(&target, delta.plan.kind, delta.plan.stream).unwrap();
    let err = applier
        .apply(&DeltaChunk::from_bytes(&wire).unwrap())
        .unwrap_err();
    assert!(
        matches!(err, ApplyError::ChunkCorrupt { seq: 0, .. }),
        "{err:?}"
    );
    assert!(
        tree_facts(&target) == before,
        "a corrupt chunk changed the tree"
    );
    for chunk in &delta.chunks {
        applier.apply(chunk).unwrap();
    }
    applier.finish(FinishOptions::default()).unwrap();
    assert_same_tree(&source, &target);
}

type Mutation = fn(&Path);

#[test]
fn tree_edge_cases() {
    fn random(path: &Path, len: u64, seed: u8) {
        let mut data = vec![0u8; len as usize];
        blake3::Hasher::new_keyed(&[seed; 32])
            .finalize_xof()
            .fill(&mut data);
        fs::write(path, data).unwrap();
    }
    // (name, setup of generation 1, change for generation 2)
    let cases: Vec<(&str, Mutation, Mutation)> = vec![
        (
            "empty file gets content, full file emptied",
            |r| {
                File::create(r.join("e")).unwrap();
                random(&r.join("x"), 9000, 1);
            },
            |r| {
                random(&r.join("e"), 10, 2);
                File::create(r.join("x")).unwrap();
            },
        ),
        (
            "file replaced by a directory",
            |r| random(&r.join("p"), 5000, 3),
            |r| {
                fs::remove_file(r.join("p")).unwrap();
                fs::create_dir(r.join("p")).unwrap();
                random(&r.join("p/q"), 100, 4);
            },
        ),
        (
            "directory replaced by a file",
            |r| {
                fs::create_dir_all(r.join("d/e")).unwrap();
                random(&r.join("d/e/f"), 7000, 5);
            },
            |r| {
                fs::remove_dir_all(r.join("d")).unwrap();
                random(&r.join("d"), 7000, 5);
            },
        ),
        (
            "symlink and file swap kinds",
            |r| {
                symlink("target", r.join("s")).unwrap();
                random(&r.join("f"), 300, 6);
            },
            |r| {
                fs::remove_file(r.join("s")).unwrap();
                random(&r.join("s"), 300, 6);
                fs::remove_file(r.join("f")).unwrap();
                symlink("elsewhere", r.join("f")).unwrap();
            },
        ),
        (
            "hard link broken, another made",
            |r| {
                random(&r.join("a"), 9000, 7);
                fs::hard_link(r.join("a"), r.join("b")).unwrap();
            },
            |r| {
                fs::remove_file(r.join("b")).unwrap();
                random(&r.join("b"), 9000, 8);
                fs::hard_link(r.join("a"), r.join("c")).unwrap();
            },
        ),
        (
            "hard-link primary removed, member keeps the data",
            |r| {
                random(&r.join("a"), 9000, 9);
                fs::hard_link(r.join("a"), r.join("b")).unwrap();
            },
            |r| fs::remove_file(r.join("a")).unwrap(),
        ),
        (
            "linked file updated through one name",
            |r| {
                random(&r.join("a"), 9000, 10);
                fs::hard_link(r.join("a"), r.join("b")).unwrap();
            },
            |r| {
                let file = OpenOptions::new().write(true).open(r.join("b")).unwrap();
                file.write_all_at(&[1; 10], 5000).unwrap();
            },
        ),
        (
            "data punched back into a hole",
            |r| {
                let file = File::create(r.join("s")).unwrap();
                file.set_len(1 << 20).unwrap();
                file.write_all_at(&[0x33; 8192], 512 * 1024).unwrap();
            },
            |r| {
                let file = OpenOptions::new().write(true).open(r.join("s")).unwrap();
                file.write_all_at(&[0; 8192], 512 * 1024).unwrap();
            },
        ),
        (
            "rename into a new directory while the old one goes",
            |r| {
                fs::create_dir(r.join("old")).unwrap();
                random(&r.join("old/big"), 64 * 1024, 11);
            },
            |r| {
                fs::create_dir(r.join("new")).unwrap();
                fs::rename(r.join("old/big"), r.join("new/big")).unwrap();
                fs::remove_dir(r.join("old")).unwrap();
            },
        ),
        (
            "rename onto a path that was a directory",
            |r| {
                random(&r.join("src"), 20_000, 12);
                fs::create_dir_all(r.join("dst/sub")).unwrap();
            },
            |r| {
                fs::remove_dir_all(r.join("dst")).unwrap();
                fs::rename(r.join("src"), r.join("dst")).unwrap();
            },
        ),
        (
            "files grow and shrink across block boundaries",
            |r| {
                random(&r.join("g"), 10_000, 13);
                random(&r.join("h"), 50_000, 14);
            },
            |r| {
                random(&r.join("g"), 50_000, 13);
                let file = OpenOptions::new().write(true).open(r.join("h")).unwrap();
                file.set_len(9_000).unwrap();
            },
        ),
        (
            "two files swap contents",
            |r| {
                random(&r.join("a"), 12_000, 15);
                random(&r.join("b"), 12_000, 16);
            },
            |r| {
                fs::rename(r.join("a"), r.join("tmp")).unwrap();
                fs::rename(r.join("b"), r.join("a")).unwrap();
                fs::rename(r.join("tmp"), r.join("b")).unwrap();
            },
        ),
        (
            "modes, setuid and non-UTF-8 names",
            |r| {
                fs::create_dir(r.join("dir")).unwrap();
                random(&r.join(OsStr::from_bytes(b"caf\xe9")), 100, 17);
            },
            |r| {
                chmod(&r.join("dir"), 0o711);
                chmod(&r.join(OsStr::from_bytes(b"caf\xe9")), 0o4750);
                random(&r.join(OsStr::from_bytes(b"dir/\xff\xfe")), 100, 18);
            },
        ),
    ];
    for (name, setup, change) in cases {
        eprintln!("case: {name}");
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        let target = dir.path().join("target");
        fs::create_dir(&source).unwrap();
        let snapshot = VolumeSnapshot::Tree(source.clone());
        setup(&source);
        let one = sync(None, &snapshot, &target, 1);
        assert_same_tree(&source, &target);
        change(&source);
        let two = sync(Some(&one.index), &snapshot, &target, 2);
        assert_same_tree(&source, &target);
        // Re-applying the delta is harmless.
        apply_all(&two, &target);
        assert_same_tree(&source, &target);
        if name.starts_with("rename") {
            assert_eq!(two.plan.stats.renames, 1, "{name}");
            assert_eq!(
                two.summary.payload_raw_bytes, 0,
                "{name}: renamed data was shipped"
            );
        }
        if name.starts_with("data punched") {
            assert!(
                allocated_bytes(&target.join("s")) < 8192,
                "{name}: hole not punched"
            );
        }
    }
}
