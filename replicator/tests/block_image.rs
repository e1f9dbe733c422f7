//! Block image volumes end to end: full sync, 1% deltas, corruption, replay, edge cases.

mod support;

use std::fs;
use std::os::unix::fs::FileExt;

use ferry_replicator::delta::{
    Applier, ApplyError, DeltaChunk, FinishOptions, Generation, HashStore, LoadedIndex, VolumeKey,
    VolumeSnapshot,
};
use support::{
    allocated_bytes, apply_all, file_hash, plan_sync, print_ratio, random_block_writes, rng, sync,
    write_random_file,
};

const MIB: u64 = 1 << 20;

/// Full sync of a random image, then 1% random 4 KiB writes; returns the delta's wire ratio.
fn one_percent_round_trip(size: u64, seed: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let target = dir.path().join("target.img");
    let mut rng = rng(seed);
    write_random_file(&source, size, &mut rng);
    let snapshot = VolumeSnapshot::Image(source.clone());

    let first = sync(None, &snapshot, &target, 1);
    assert_eq!(first.plan.stream.base, None);
    assert_eq!(file_hash(&source), file_hash(&target), "full sync differs");
    assert!(first.summary.wire_ratio() > 0.99, "random data ships whole");
    print_ratio(&format!("{} MiB full sync", size / MIB), &first.summary);

    let written = random_block_writes(&source, 0.01, &mut rng);
    let second = sync(Some(&first.index), &snapshot, &target, 2);
    assert_eq!(second.plan.stream.base, Some(Generation(1)));
    assert_eq!(second.summary.blocks_changed, written);
    assert_eq!(file_hash(&source), file_hash(&target), "delta sync differs");
    print_ratio(
        &format!("{} MiB after 1% random 4 KiB writes", size / MIB),
        &second.summary,
    );
    second.summary.wire_ratio()
}

#[test]
fn image_8_mib_round_trip_then_one_percent_ships_at_most_two_percent() {
    let ratio = one_percent_round_trip(8 * MIB, 8);
    assert!(ratio <= 0.02, "shipped {:.3}% of the volume", ratio * 100.0);
}

#[test]
fn image_256_mib_one_percent_writes_ship_at_most_two_percent() {
    let ratio = one_percent_round_trip(256 * MIB, 256);
    assert!(ratio <= 0.02, "shipped {:.3}% of the volume", ratio * 100.0);
}

#[test]
fn image_edge_cases() {
    // (name, first content, second content)
    let random = |len: usize, seed: u8| {
        let mut v = vec![0u8; len];
        blake3::Hasher::new_keyed(&[seed; 32])
            .finalize_xof()
            .fill(&mut v);
        v
    };
    let mut holes = random(64 * 1024, 1);
    holes[8192..40960].fill(0);
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("empty stays empty", vec![], vec![]),
        ("empty to data", vec![], random(10_000, 2)),
        ("size not a block multiple", random(10_001, 3), {
            let mut v = random(10_001, 3);
            v[10_000] ^= 1;
            v
        }),
        (
            "shrinks into a block",
            random(20_000, 4),
            random(20_000, 4)[..9_000].to_vec(),
        ),
        ("shrinks to empty", random(20_000, 5), vec![]),
        (
            "grows past a short block",
            random(5_000, 6),
            random(50_000, 6),
        ),
        ("data becomes holes", random(64 * 1024, 1), holes),
        (
            "holes become data",
            vec![0; 64 * 1024],
            random(64 * 1024, 7),
        ),
    ];
    for (name, first, second) in cases {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source.img");
        let target = dir.path().join("target.img");
        let snapshot = VolumeSnapshot::Image(source.clone());
        fs::write(&source, &first).unwrap();
        let one = sync(None, &snapshot, &target, 1);
        assert_eq!(fs::read(&target).unwrap(), first, "{name}: first sync");
        fs::write(&source, &second).unwrap();
        let two = sync(Some(&one.index), &snapshot, &target, 2);
        assert_eq!(fs::read(&target).unwrap(), second, "{name}: second sync");
        assert!(
            two.summary.payload_raw_bytes <= second.len() as u64,
            "{name}: shipped more than the image"
        );
    }
}

#[test]
fn full_copy_replaces_whatever_the_target_held() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let target = dir.path().join("target.img");
    let mut data = vec![0u8; 256 * 1024];
    data[100_000..110_000].fill(0x42);
    fs::write(&source, &data).unwrap();
    // Stale content, longer than the image: holes in the source must come out as zeros.
    fs::write(&target, vec![0xff; 300 * 1024]).unwrap();
    let synced = sync(None, &VolumeSnapshot::Image(source.clone()), &target, 1);
    assert_eq!(synced.summary.blocks_changed, 3, "blocks 24 to 26");
    assert_eq!(fs::read(&target).unwrap(), data);
}

#[test]
fn holes_are_not_shipped_and_stay_holes() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("sparse.img");
    let target = dir.path().join("target.img");
    let file = fs::File::create(&source).unwrap();
    file.set_len(64 * MIB).unwrap();
    file.write_all_at(&[0x5a; 8192], 10 * MIB).unwrap();
    file.write_all_at(&[0xa5; 4096], 63 * MIB).unwrap();
    drop(file);
    let synced = sync(None, &VolumeSnapshot::Image(source.clone()), &target, 1);
    assert_eq!(synced.summary.blocks_changed, 3);
    assert!(
        synced.summary.wire_bytes < 64 * 1024,
        "{:?}",
        synced.summary
    );
    assert_eq!(file_hash(&source), file_hash(&target));
    assert_eq!(fs::metadata(&target).unwrap().len(), 64 * MIB);
    assert!(
        allocated_bytes(&target) < MIB,
        "target allocates {} bytes",
        allocated_bytes(&target)
    );
}

#[test]
fn corrupt_chunk_is_refused_and_target_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let target = dir.path().join("target.img");
    let mut rng = rng(3);
    write_random_file(&source, 4 * MIB, &mut rng);
    let snapshot = VolumeSnapshot::Image(source.clone());
    let first = sync(None, &snapshot, &target, 1);
    random_block_writes(&source, 0.05, &mut rng);
    let second = plan_sync(Some(&first.index), &snapshot, 2);
    let before = file_hash(&target);

    let mut applier = Applier::open(&target, second.plan.kind, second.plan.stream).unwrap();
    let mut wire = second.chunks[0].to_bytes();
    let at = wire.len() * 2 / 3;
    wire[at] ^= 0x04;
    let corrupt = DeltaChunk::from_bytes(&wire).unwrap();
    assert!(corrupt.verify().is_err(), "flipped byte {at} not detected");
    let err = applier.apply(&corrupt).unwrap_err();
    assert!(
        matches!(err, ApplyError::ChunkCorrupt { seq: 0, .. }),
        "{err:?}"
    );
    assert_eq!(
        file_hash(&target),
        before,
        "a corrupt chunk changed the target"
    );

    // Re-requested, the good chunk and the rest complete the generation.
    for chunk in &second.chunks {
        applier.apply(chunk).unwrap();
    }
    applier.finish(FinishOptions::default()).unwrap();
    assert_eq!(file_hash(&target), file_hash(&source));
}

#[test]
fn applying_twice_or_resuming_gives_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let mut rng = rng(4);
    write_random_file(&source, 6 * MIB, &mut rng);
    let snapshot = VolumeSnapshot::Image(source.clone());
    let first = plan_sync(None, &snapshot, 1);
    assert!(first.chunks.len() >= 5, "{} chunks", first.chunks.len());

    // Whole stream twice.
    let twice = dir.path().join("twice.img");
    apply_all(&first, &twice);
    apply_all(&first, &twice);
    assert_eq!(file_hash(&twice), file_hash(&source));

    // Interrupted after chunk 3, resumed from chunk 1.
    let resumed = dir.path().join("resumed.img");
    let mut applier = Applier::open(&resumed, first.plan.kind, first.plan.stream).unwrap();
    for chunk in &first.chunks[..4] {
        applier.apply(chunk).unwrap();
    }
    drop(applier);
    let mut applier = Applier::open(&resumed, first.plan.kind, first.plan.stream).unwrap();
    // A fresh applier (destination restarted) expects chunk 0 first; the stage layer would
    // persist next_seq. Here the source re-sends everything.
    for chunk in &first.chunks[..4] {
        applier.apply(chunk).unwrap();
    }
    for chunk in &first.chunks[1..] {
        applier.apply(chunk).unwrap();
    }
    applier.finish(FinishOptions::default()).unwrap();
    assert_eq!(file_hash(&resumed), file_hash(&source));
}

#[test]
fn stored_index_drives_the_next_delta_and_its_loss_means_a_full_copy() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let target = dir.path().join("target.img");
    let store_path = dir.path().join("hashes");
    let key = VolumeKey::new("shop", "data");
    let mut rng = rng(5);
    write_random_file(&source, 2 * MIB, &mut rng);
    let snapshot = VolumeSnapshot::Image(source.clone());

    let first = {
        let store = HashStore::open(&store_path).unwrap();
        let previous = store.load(&key).unwrap().into_previous();
        let first = sync(previous.as_ref(), &snapshot, &target, 1);
        store.save(&key, &first.index).unwrap();
        first
    };

    // The process restarts: the reopened store still describes generation 1.
    let store = HashStore::open(&store_path).unwrap();
    let LoadedIndex::Found(previous) = store.load(&key).unwrap() else {
        panic!("index lost across reopen");
    };
    assert_eq!(previous, first.index);
    random_block_writes(&source, 0.01, &mut rng);
    let second = sync(Some(&previous), &snapshot, &target, 2);
    assert!(second.summary.wire_ratio() <= 0.02, "{:?}", second.summary);

    // A generation that never committed must not move the index: it still says 1.
    assert_eq!(
        store
            .load(&key)
            .unwrap()
            .into_previous()
            .unwrap()
            .generation,
        Generation(1)
    );

    store.remove(&key).unwrap();
    let previous = store.load(&key).unwrap().into_previous();
    let third = sync(previous.as_ref(), &snapshot, &target, 3);
    assert_eq!(third.plan.stream.base, None);
    assert!(third.summary.wire_ratio() > 0.99);
    assert_eq!(file_hash(&source), file_hash(&target));
}
