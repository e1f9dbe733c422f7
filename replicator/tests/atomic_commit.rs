//! Atomic commit under kill -9: a standalone destination (`ferry-replicator receive`, a real
//! process) is killed with SIGKILL at random points during 20 syncs of a block image and a file
//! tree. After every restart, the newest committed generation equals exactly the source as it
//! was captured for that generation (independent checksums), and nothing newer than the last
//! attempt exists. The seed is printed; set FERRY_TEST_SEED to replay.

mod wire;

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_replicator::delta::HashStore;
use ferry_replicator::destination::{PairKey, VolumeSpec};
use ferry_replicator::mover::MoverSession;
use ferry_replicator::source::{committed_state, ship, Faults, ShipRequest, SourceVolume};
use ferry_replicator::tls::TlsMaterial;
use rand::{Rng, SeedableRng};
use wire::{checksum, client, tls_pair};

const IMAGE_BYTES: u64 = 8 << 20;
const SYNCS: u64 = 20;
const STEP: Duration = Duration::from_secs(30);

/// The receiver process; killed and reaped on drop.
struct Receiver {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Receiver {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-replicator"))
            .args(["receive", "--listen", "127.0.0.1:0"])
            .arg("--tls-dir")
            .arg(dir.join("tls"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--replicas-dir")
            .arg(dir.join("replicas"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ferry-replicator receive starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Self { child, addr }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pair() -> PairKey {
    PairKey {
        namespace: "shop".into(),
        name: "db".into(),
    }
}

fn volumes(tree: &Path, image: &Path) -> Vec<SourceVolume> {
    vec![
        SourceVolume {
            spec: VolumeSpec {
                volume: "disk".into(),
                block: true,
                capacity: "8Mi".into(),
            },
            size_bytes: IMAGE_BYTES,
            session: MoverSession::in_process(image.to_path_buf()),
            changed: None,
        },
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
    ]
}

fn change(tree: &Path, image: &Path, rng: &mut rand::rngs::StdRng) {
    let mut file = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    for _ in 0..rng.random_range(10..200) {
        let block = rng.random_range(0..IMAGE_BYTES / 4096);
        let mut data = [0u8; 4096];
        rng.fill(&mut data[..]);
        file.seek(SeekFrom::Start(block * 4096)).unwrap();
        file.write_all(&data).unwrap();
    }
    for _ in 0..rng.random_range(1..5) {
        let mut data = vec![0u8; rng.random_range(1..20_000)];
        rng.fill(&mut data[..]);
        std::fs::write(tree.join(format!("f{}", rng.random_range(0..30))), data).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_destination_always_holds_exactly_one_source_generation() {
    let seed: u64 = std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("FERRY_TEST_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let (src_tls, dst_tls): (TlsMaterial, TlsMaterial) = tls_pair();
    let dst = dir.path().join("dst");
    std::fs::create_dir_all(dst.join("tls")).unwrap();
    dst_tls.write_dir(dst.join("tls")).unwrap();
    let tree = dir.path().join("tree");
    let image = dir.path().join("disk.img");
    std::fs::create_dir_all(&tree).unwrap();
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(IMAGE_BYTES).unwrap();
    drop(file);
    change(&tree, &image, &mut rng);
    let hashes = HashStore::open(dir.path().join("hashes")).unwrap();
    let mut receiver = Receiver::start(&dst);
    // Checksums of the source as captured for each generation.
    let mut captured: Vec<(u64, String, String)> = Vec::new();
    let mut typical = Duration::from_millis(300);
    let mut kills = 0;
    let no_faults = Faults::default();
    for attempt in 1..=SYNCS {
        let mut rpc = client(receiver.addr, &src_tls);
        let (newest, _) = tokio::time::timeout(STEP, committed_state(&mut rpc, &pair()))
            .await
            .unwrap()
            .unwrap();
        let generation = newest
            .unwrap_or(0)
            .max(captured.last().map(|c| c.0).unwrap_or(0))
            + 1;
        change(&tree, &image, &mut rng);
        captured.push((generation, checksum(&image), checksum(&tree)));
        let request = ShipRequest {
            pair: pair(),
            generation,
            epoch: 1,
            source_site: "a".into(),
            pair_json: b"{}".to_vec(),
            manifests_json: b"[]".to_vec(),
            capture_time_unix_seconds: generation as f64,
            quick_check: true,
        };
        let kill_after = if rng.random_bool(0.7) {
            Some(Duration::from_micros(rng.random_range(
                0..(typical.as_micros() as u64 * 3 / 2).max(1),
            )))
        } else {
            None
        };
        let started = Instant::now();
        let shipping = ship(
            &mut rpc,
            &hashes,
            &request,
            volumes(&tree, &image),
            &no_faults,
        );
        let outcome = match kill_after {
            None => Some(
                tokio::time::timeout(STEP, shipping)
                    .await
                    .expect("sync bounded"),
            ),
            Some(delay) => {
                tokio::select! {
                    r = shipping => Some(r),
                    () = tokio::time::sleep(delay) => None,
                }
            }
        };
        if let Some(Ok(_)) = &outcome {
            typical = started.elapsed();
        }
        if kill_after.is_some() {
            receiver.kill();
            kills += 1;
            receiver = Receiver::start(&dst);
        }
        println!(
            "attempt {attempt}: generation {generation}, {}",
            match (&outcome, kill_after) {
                (Some(Ok(_)), Some(d)) => format!("committed, then killed at {d:?}"),
                (Some(Ok(_)), None) => "committed".to_string(),
                (Some(Err(e)), _) => format!("failed: {e}"),
                (None, Some(d)) => format!("killed mid-sync at {d:?}"),
                (None, None) => unreachable!(),
            }
        );
        // The invariant: the newest committed generation is exactly one source generation.
        let mut rpc = client(receiver.addr, &src_tls);
        let (newest, _) = tokio::time::timeout(STEP, committed_state(&mut rpc, &pair()))
            .await
            .unwrap()
            .unwrap();
        if let Some(g) = newest {
            assert!(
                g <= generation,
                "generation {g} committed, beyond the last attempted {generation}"
            );
            let (_, disk_sum, tree_sum) = captured
                .iter()
                .find(|c| c.0 == g)
                .expect("a captured generation");
            let copy = |v: &str| dst.join("replicas/shop/db").join(format!("g{g}")).join(v);
            assert_eq!(
                &checksum(&copy("disk")),
                disk_sum,
                "attempt {attempt}: generation {g}'s image"
            );
            assert_eq!(
                &checksum(&copy("files")),
                tree_sum,
                "attempt {attempt}: generation {g}'s tree"
            );
        }
    }
    // A final, undisturbed sync brings the destination to the source's current state.
    let mut rpc = client(receiver.addr, &src_tls);
    let (newest, _) = committed_state(&mut rpc, &pair()).await.unwrap();
    let generation = newest.unwrap_or(0).max(captured.last().unwrap().0) + 1;
    let request = ShipRequest {
        pair: pair(),
        generation,
        epoch: 1,
        source_site: "a".into(),
        pair_json: b"{}".to_vec(),
        manifests_json: b"[]".to_vec(),
        capture_time_unix_seconds: generation as f64,
        quick_check: true,
    };
    tokio::time::timeout(
        STEP,
        ship(
            &mut rpc,
            &hashes,
            &request,
            volumes(&tree, &image),
            &Faults::default(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let copy = |v: &str| {
        dst.join("replicas/shop/db")
            .join(format!("g{generation}"))
            .join(v)
    };
    assert_eq!(checksum(&copy("disk")), checksum(&image));
    assert_eq!(checksum(&copy("files")), checksum(&tree));
    println!("{kills} kills in {SYNCS} syncs");
    assert!(kills > 0);
}
