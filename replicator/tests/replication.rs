//! The replication protocol end to end on loopback with mutual TLS: a source ships generations
//! of a file tree and a block image to a destination that keeps them in directories. Checks
//! data equality by an independent checksum, delta efficiency, corrupted chunks, stale epochs
//! and the hash store's rebuild.

mod wire;

use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use ferry_replicator::delta::HashStore;
use ferry_replicator::destination::{PairKey, VolumeSpec};
use ferry_replicator::mover::MoverSession;
use ferry_replicator::source::{ship, Faults, ShipError, ShipRequest, SourceVolume};
use rand::{Rng, SeedableRng};
use wire::{checksum, client, tls_pair, TestDestination};

const IMAGE_BYTES: u64 = 16 << 20;

fn pair() -> PairKey {
    PairKey {
        namespace: "shop".into(),
        name: "db".into(),
    }
}

fn request(generation: u64, epoch: u64) -> ShipRequest {
    ShipRequest {
        pair: pair(),
        generation,
        epoch,
        source_site: "a".into(),
        pair_json: b"{}".to_vec(),
        manifests_json: br#"[{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}]"#
            .to_vec(),
        capture_time_unix_seconds: 1.0e9 + generation as f64,
        quick_check: true,
    }
}

fn volumes(tree: &Path, image: &Path) -> Vec<SourceVolume> {
    vec![
        SourceVolume {
            spec: VolumeSpec {
                volume: "files".into(),
                block: false,
                capacity: "1Gi".into(),
            },
            size_bytes: 0,
            session: MoverSession::in_process(tree.to_path_buf()),
            changed: None,
        },
        SourceVolume {
            spec: VolumeSpec {
                volume: "disk".into(),
                block: true,
                capacity: "16Mi".into(),
            },
            size_bytes: IMAGE_BYTES,
            session: MoverSession::in_process(image.to_path_buf()),
            changed: None,
        },
    ]
}

fn make_tree(root: &Path, rng: &mut rand::rngs::StdRng) {
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    for i in 0..40 {
        let mut data = vec![0u8; rng.random_range(1..64 * 1024)];
        rng.fill(&mut data[..]);
        std::fs::write(root.join(format!("a/b/file{i}")), data).unwrap();
    }
    std::os::unix::fs::symlink("a/b/file1", root.join("link")).unwrap();
}

fn make_image(path: &Path, rng: &mut rand::rngs::StdRng) {
    let mut file = std::fs::File::create(path).unwrap();
    file.set_len(IMAGE_BYTES).unwrap();
    // Half the image written, half left as a hole.
    let mut data = vec![0u8; (IMAGE_BYTES / 2) as usize];
    rng.fill(&mut data[..]);
    file.write_all(&data).unwrap();
}

fn scribble_image(path: &Path, rng: &mut rand::rngs::StdRng, blocks: u64) {
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for _ in 0..blocks {
        let block = rng.random_range(0..IMAGE_BYTES / 4096);
        let mut data = [0u8; 4096];
        rng.fill(&mut data[..]);
        file.seek(SeekFrom::Start(block * 4096)).unwrap();
        file.write_all(&data).unwrap();
    }
}

/// A destination serving on loopback with mutual TLS, a client to it, a source hash store,
/// and a source tree and image filled from `seed`.
struct Setup {
    dir: tempfile::TempDir,
    dest: TestDestination,
    rpc: ferry_schemas::proto::ReplicationClient<tonic::transport::Channel>,
    hashes: HashStore,
    tree: std::path::PathBuf,
    image: std::path::PathBuf,
    rng: rand::rngs::StdRng,
}

impl Setup {
    async fn start(seed: u64) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let (src_tls, dst_tls) = tls_pair();
        let dest = TestDestination::start(&dir.path().join("dst"), &dst_tls).await;
        let rpc = client(dest.addr, &src_tls);
        let hashes = HashStore::open(dir.path().join("hashes")).unwrap();
        let tree = dir.path().join("tree");
        let image = dir.path().join("disk.img");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        make_tree(&tree, &mut rng);
        make_image(&image, &mut rng);
        Setup {
            dir,
            dest,
            rpc,
            hashes,
            tree,
            image,
            rng,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_replicate_exactly_and_only_deltas_travel() {
    let Setup {
        dir: _dir,
        dest,
        mut rpc,
        hashes,
        tree,
        image,
        mut rng,
    } = Setup::start(7).await;

    // Generation 1: a full copy.
    let first = ship(
        &mut rpc,
        &hashes,
        &request(1, 1),
        volumes(&tree, &image),
        &Faults::default(),
    )
    .await
    .unwrap();
    assert!(first.volumes.values().all(|v| v.full_copy));
    let g1 = |v: &str| dest.replicas.generation_path(&pair(), 1, v);
    assert_eq!(checksum(&g1("files")), checksum(&tree));
    assert_eq!(checksum(&g1("disk")), checksum(&image));

    // Generation 2: 1% of the image's blocks and one file change; a file is renamed.
    scribble_image(&image, &mut rng, IMAGE_BYTES / 4096 / 100);
    std::fs::write(tree.join("a/b/file3"), b"changed").unwrap();
    std::fs::rename(tree.join("a/b/file4"), tree.join("a/moved")).unwrap();
    let second = ship(
        &mut rpc,
        &hashes,
        &request(2, 1),
        volumes(&tree, &image),
        &Faults::default(),
    )
    .await
    .unwrap();
    let g2 = |v: &str| dest.replicas.generation_path(&pair(), 2, v);
    assert_eq!(checksum(&g2("files")), checksum(&tree));
    assert_eq!(checksum(&g2("disk")), checksum(&image));
    let disk = &second.volumes["disk"];
    let ratio = disk.wire_bytes as f64 / IMAGE_BYTES as f64;
    println!(
        "generation 2 shipped {} bytes for the image: {:.3}% of {IMAGE_BYTES}",
        disk.wire_bytes,
        ratio * 100.0
    );
    assert!(!disk.full_copy);
    assert!(ratio < 0.02, "a 1% change shipped {:.3}%", ratio * 100.0);
    // Generation 1 stays as it was: its copy did not move with generation 2.
    assert_ne!(checksum(&g1("disk")), checksum(&image));

    // The destination says what it holds.
    let record = dest.destination.record(&pair()).unwrap();
    assert_eq!(
        record
            .committed
            .iter()
            .map(|g| g.generation)
            .collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(record.staging, None);
    let manifests =
        std::fs::read(dest.replicas.pair_dir(&pair()).join("g2/manifests.json")).unwrap();
    assert_eq!(manifests, request(2, 1).manifests_json);
    dest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunks_are_rerequested_and_stale_epochs_refused() {
    let Setup {
        dir,
        dest,
        mut rpc,
        hashes,
        tree,
        image,
        mut rng,
    } = Setup::start(11).await;

    let faults = Faults {
        corrupt_chunks: BTreeSet::from([
            ("disk".to_string(), 0),
            ("disk".to_string(), 3),
            ("files".to_string(), 0),
        ]),
    };
    let report = ship(
        &mut rpc,
        &hashes,
        &request(1, 2),
        volumes(&tree, &image),
        &faults,
    )
    .await
    .unwrap();
    assert_eq!(
        report.chunks_rejected, 3,
        "every corrupted chunk is detected"
    );
    let g1 = |v: &str| dest.replicas.generation_path(&pair(), 1, v);
    assert_eq!(
        checksum(&g1("disk")),
        checksum(&image),
        "no corrupted byte was applied"
    );
    assert_eq!(checksum(&g1("files")), checksum(&tree));

    // A sender still on epoch 1 is no longer the active site.
    scribble_image(&image, &mut rng, 10);
    let err = ship(
        &mut rpc,
        &hashes,
        &request(2, 1),
        volumes(&tree, &image),
        &Faults::default(),
    )
    .await
    .unwrap_err();
    match &err {
        ShipError::Refused(message) => assert!(message.contains("stale epoch 1"), "{message}"),
        other => panic!("expected a refusal, got {other}"),
    }
    let record = dest.destination.record(&pair()).unwrap();
    assert_eq!(
        record.newest().unwrap().generation,
        1,
        "nothing of the stale sync committed"
    );

    // The hash store lost: the next sync is a full copy, and still exact.
    drop(hashes);
    std::fs::remove_dir_all(dir.path().join("hashes")).unwrap();
    let hashes = HashStore::open(dir.path().join("hashes")).unwrap();
    let report = ship(
        &mut rpc,
        &hashes,
        &request(2, 2),
        volumes(&tree, &image),
        &Faults::default(),
    )
    .await
    .unwrap();
    assert!(report.volumes.values().all(|v| v.full_copy));
    assert_eq!(
        checksum(&dest.replicas.generation_path(&pair(), 2, "disk")),
        checksum(&image)
    );
    dest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_pair_is_kept_or_removed_and_a_superseded_site_cannot_release_it() {
    use ferry_schemas::proto::replication::{PairRef, ReleasePolicy, ReleaseRequest};
    let Setup {
        dir,
        dest,
        mut rpc,
        hashes,
        tree,
        image,
        rng: _,
    } = Setup::start(11).await;
    ship(
        &mut rpc,
        &hashes,
        &request(1, 2),
        volumes(&tree, &image),
        &Faults::default(),
    )
    .await
    .unwrap();
    let release = |epoch: u64, policy: ReleasePolicy| ReleaseRequest {
        pair: Some(PairRef {
            namespace: "shop".into(),
            name: "db".into(),
        }),
        epoch,
        source_site: "a".into(),
        policy: policy as i32,
        reason: "DRPair deleted at site a".into(),
    };

    // A site behind the destination's epoch was superseded: it cannot remove the copy.
    let refused = rpc
        .release(release(1, ReleasePolicy::Delete))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().starts_with("stale epoch 1"),
        "{}",
        refused.message()
    );
    assert!(dest.replicas.pair_dir(&pair()).exists());

    // Retain keeps everything and says what.
    let kept = rpc
        .release(release(2, ReleasePolicy::Retain))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.generations_kept, vec![1]);
    assert!(kept.removed.is_empty());
    let g1 = |v: &str| dest.replicas.generation_path(&pair(), 1, v);
    assert_eq!(checksum(&g1("disk")), checksum(&image));
    assert_eq!(dest.destination.record(&pair()).unwrap().committed.len(), 1);

    // Delete removes the copy and the journal's record; asking again is a no-op.
    let removed = rpc
        .release(release(2, ReleasePolicy::Delete))
        .await
        .unwrap()
        .into_inner();
    assert!(removed.generations_kept.is_empty());
    assert_eq!(removed.removed.len(), 1, "{:?}", removed.removed);
    assert!(!dest.replicas.pair_dir(&pair()).exists());
    let record = dest.destination.record(&pair()).unwrap();
    assert!(
        record.committed.is_empty() && record.epoch == 0,
        "{record:?}"
    );
    let again = rpc
        .release(release(2, ReleasePolicy::Delete))
        .await
        .unwrap()
        .into_inner();
    assert!(again.removed.is_empty());

    // A pair created again replicates from scratch: a full copy, exact.
    let hashes = HashStore::open(dir.path().join("hashes-again")).unwrap();
    let report = ship(
        &mut rpc,
        &hashes,
        &request(1, 1),
        volumes(&tree, &image),
        &Faults::default(),
    )
    .await
    .unwrap();
    assert!(report.volumes.values().all(|v| v.full_copy));
    assert_eq!(checksum(&g1("files")), checksum(&tree));
    dest.stop().await;
}

/// Filesystem volumes skip files whose size and mtime are unchanged since the base generation
/// (rsync's quick check); a file rewritten in place with its old size and mtime restored
/// slips through it and is caught by the next full-scan generation (`spec.fullScanEvery`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_check_skips_unchanged_files_and_a_full_scan_catches_restored_mtimes() {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let Setup {
        dir: _dir,
        dest,
        mut rpc,
        hashes,
        tree,
        image,
        mut rng,
    } = Setup::start(13).await;
    // Cold files, last written an hour ago, as most of a database's files are.
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let file = |i: u32| tree.join(format!("a/b/file{i}"));
    let touch = |path: &Path, when: SystemTime| {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    };
    for i in 0..40 {
        touch(&file(i), an_hour_ago);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let sync = |generation: u64, quick_check: bool| ShipRequest {
        capture_time_unix_seconds: now + generation as f64,
        quick_check,
        ..request(generation, 1)
    };
    let first = ship_all(&mut rpc, &hashes, &sync(1, true), &tree, &image).await;
    assert_eq!(
        first.volumes["files"].bytes_unread, 0,
        "no base: everything read"
    );

    // One file changes as usual; another is rewritten in place, same size, mtime restored.
    let changed = file(3);
    std::fs::write(&changed, random_bytes(&mut rng, 1000)).unwrap();
    let sneaky = file(7);
    let before_sneaky = std::fs::read(&sneaky).unwrap();
    std::fs::write(&sneaky, random_bytes(&mut rng, before_sneaky.len())).unwrap();
    touch(&sneaky, an_hour_ago);
    let total: u64 = (0..40)
        .map(|i| std::fs::metadata(file(i)).unwrap().len())
        .sum();
    let quick = ship_all(&mut rpc, &hashes, &sync(2, true), &tree, &image).await;
    let unread = quick.volumes["files"].bytes_unread;
    assert_eq!(
        unread,
        total - std::fs::metadata(&changed).unwrap().len(),
        "every file but the one with a new mtime was taken from the index unread"
    );
    assert_eq!(
        quick.volumes["disk"].bytes_unread, 0,
        "images are always read"
    );
    let g2 = dest.replicas.generation_path(&pair(), 2, "files");
    assert_eq!(
        std::fs::read(g2.join("a/b/file3")).unwrap(),
        std::fs::read(&changed).unwrap()
    );
    assert_eq!(
        std::fs::read(g2.join("a/b/file7")).unwrap(),
        before_sneaky,
        "the quick check cannot see a rewrite whose mtime was restored"
    );

    // The full-scan generation reads every file and catches it.
    let full = ship_all(&mut rpc, &hashes, &sync(3, false), &tree, &image).await;
    assert_eq!(full.volumes["files"].bytes_unread, 0);
    let g3 = dest.replicas.generation_path(&pair(), 3, "files");
    assert_eq!(
        checksum(&g3),
        checksum(&tree),
        "the full scan caught the rewrite"
    );
    assert_eq!(
        checksum(&dest.replicas.generation_path(&pair(), 3, "disk")),
        checksum(&image)
    );
    assert!(
        full.volumes["files"].bytes_changed < total / 4,
        "only the rewritten file travelled: {} of {total} bytes",
        full.volumes["files"].bytes_changed
    );

    // A file written just before the base's capture is never trusted (same clock tick).
    let recent = file(11);
    std::fs::write(&recent, random_bytes(&mut rng, 500)).unwrap();
    let recent_mtime = std::fs::metadata(&recent).unwrap().modified().unwrap();
    let base_capture = recent_mtime
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let request4 = ShipRequest {
        capture_time_unix_seconds: base_capture,
        quick_check: false,
        ..request(4, 1)
    };
    ship_all(&mut rpc, &hashes, &request4, &tree, &image).await;
    std::fs::write(&recent, random_bytes(&mut rng, 500)).unwrap();
    touch(&recent, recent_mtime);
    ship_all(&mut rpc, &hashes, &sync(5, true), &tree, &image).await;
    assert_eq!(
        checksum(&dest.replicas.generation_path(&pair(), 5, "files")),
        checksum(&tree),
        "a file modified within the margin of the base's capture was read"
    );
    dest.stop().await;
}

/// Ships `request` with both volumes and no faults; panics if the sync fails.
async fn ship_all(
    rpc: &mut ferry_schemas::proto::ReplicationClient<tonic::transport::Channel>,
    hashes: &HashStore,
    request: &ShipRequest,
    tree: &Path,
    image: &Path,
) -> ferry_replicator::source::ShipReport {
    ship(
        rpc,
        hashes,
        request,
        volumes(tree, image),
        &Faults::default(),
    )
    .await
    .unwrap()
}

fn random_bytes(rng: &mut rand::rngs::StdRng, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    data
}

/// Changed block tracking at the protocol level: ranges reported against this site's index
/// of the destination's generation are the only bytes read and the copy stays exact; ranges
/// reported against another index of the same generation number (a diverged seed's, say)
/// are refused and the volume is read whole; a resized volume is read whole too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_extents_are_used_only_against_the_index_they_describe() {
    use ferry_replicator::delta::VolumeKey;
    use ferry_replicator::source::{ChangedBlocks, ReadMode};
    let Setup {
        dir: _dir,
        dest,
        mut rpc,
        hashes,
        tree,
        image,
        mut rng,
    } = Setup::start(3314).await;
    ship(
        &mut rpc,
        &hashes,
        &request(1, 1),
        volumes(&tree, &image),
        &Faults::default(),
    )
    .await
    .unwrap();
    let base = hashes
        .load(&VolumeKey::new(pair().to_string(), "disk"))
        .unwrap()
        .into_previous()
        .unwrap();
    let write = |offset: u64, rng: &mut rand::rngs::StdRng| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        let mut data = [0u8; 4096];
        rng.fill(&mut data[..]);
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.write_all(&data).unwrap();
    };
    let tracked = |generation: u64, digest: [u8; 32], extents: Vec<(u64, u64)>| {
        let mut v = volumes(&tree, &image);
        v[1].changed = Some(ChangedBlocks::Known {
            base_generation: generation,
            base_digest: digest,
            extents,
        });
        v
    };

    // The right base: only the two written blocks are read.
    write(4096 * 10, &mut rng);
    write(4096 * 3000, &mut rng);
    let extents = vec![(4096 * 10, 4096), (4096 * 3000, 4096)];
    let report = ship(
        &mut rpc,
        &hashes,
        &request(2, 1),
        tracked(1, base.digest().0, extents),
        &Faults::default(),
    )
    .await
    .unwrap();
    let disk = &report.volumes["disk"];
    assert_eq!(disk.read_mode, ReadMode::ChangedBlocks);
    assert_eq!(disk.bytes_scanned - disk.bytes_unread, 2 * 4096, "{disk:?}");
    let g2 = dest.replicas.generation_path(&pair(), 2, "disk");
    assert_eq!(checksum(&g2), checksum(&image));

    // Ranges against another index of generation 2: refused, read whole, still exact.
    write(4096 * 20, &mut rng);
    let report = ship(
        &mut rpc,
        &hashes,
        &request(3, 1),
        tracked(2, [7; 32], vec![]),
        &Faults::default(),
    )
    .await
    .unwrap();
    let disk = &report.volumes["disk"];
    assert!(
        matches!(&disk.read_mode, ReadMode::FullScan(r) if r.code == "base_mismatch"),
        "{:?}",
        disk.read_mode
    );
    assert_eq!(disk.bytes_unread, 0);
    let g3 = dest.replicas.generation_path(&pair(), 3, "disk");
    assert_eq!(checksum(&g3), checksum(&image));

    // Resized since the base: read whole, saying so.
    let base = hashes
        .load(&VolumeKey::new(pair().to_string(), "disk"))
        .unwrap()
        .into_previous()
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(IMAGE_BYTES * 2)
        .unwrap();
    write(IMAGE_BYTES + 4096, &mut rng);
    let report = ship(
        &mut rpc,
        &hashes,
        &request(4, 1),
        tracked(3, base.digest().0, vec![(IMAGE_BYTES + 4096, 4096)]),
        &Faults::default(),
    )
    .await
    .unwrap();
    let disk = &report.volumes["disk"];
    assert!(
        matches!(&disk.read_mode, ReadMode::FullScan(r) if r.code == "resized"),
        "{:?}",
        disk.read_mode
    );
    let g4 = dest.replicas.generation_path(&pair(), 4, "disk");
    assert_eq!(checksum(&g4), checksum(&image));
    dest.stop().await;
}
