//! A dropped connection resumes without resending what already arrived: the source ships a
//! full copy through a TCP proxy that cuts every connection once, part-way; the sync
//! reconnects, asks the destination where each volume stands, and finishes having resent no
//! more than the chunks that were in flight when the connection broke.

mod wire;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use ferry_replicator::delta::HashStore;
use ferry_replicator::destination::{PairKey, VolumeSpec};
use ferry_replicator::mover::MoverSession;
use ferry_replicator::source::{ship, Faults, ShipRequest, SourceVolume, WINDOW_CHUNKS};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wire::{checksum, client, tls_pair, TestDestination};

/// Large against the window of chunks in flight (8 MiB), so that starting over would show.
const IMAGE_BYTES: u64 = 48 << 20;
/// The most a chunk takes on the wire: 1 MiB of data plus framing.
const CHUNK_WIRE_BYTES: u64 = (1 << 20) + (64 << 10);

/// Forwards to `target`; once `cut_after` bytes went from client to server, drops every
/// connection (once).
async fn flaky_proxy(target: std::net::SocketAddr, cut_after: u64) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let (sent, cut) = (sent.clone(), cut.clone());
            tokio::spawn(async move {
                let outbound = TcpStream::connect(target).await.unwrap();
                let (mut ri, mut wi) = inbound.into_split();
                let (mut ro, mut wo) = outbound.into_split();
                let up = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match ri.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let total = sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                        if total > cut_after && !cut.swap(true, Ordering::SeqCst) {
                            break; // the cut: this connection dies here
                        }
                        if wo.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = async {
                    let _ = tokio::io::copy(&mut ro, &mut wi).await;
                };
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    addr
}

fn request() -> ShipRequest {
    ShipRequest {
        pair: PairKey {
            namespace: "shop".into(),
            name: "db".into(),
        },
        generation: 1,
        epoch: 1,
        source_site: "a".into(),
        pair_json: b"{}".to_vec(),
        manifests_json: b"[]".to_vec(),
        capture_time_unix_seconds: 1.0,
        quick_check: true,
    }
}

fn volume(image: &std::path::Path) -> Vec<SourceVolume> {
    vec![SourceVolume {
        spec: VolumeSpec {
            volume: "disk".into(),
            block: true,
            capacity: "16Mi".into(),
        },
        size_bytes: IMAGE_BYTES,
        session: MoverSession::in_process(image.to_path_buf()),
        changed: None,
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resumes_where_the_destination_stands() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let mut data = vec![0u8; IMAGE_BYTES as usize];
    rand::rngs::StdRng::seed_from_u64(5).fill(&mut data[..]);
    std::fs::File::create(&image)
        .unwrap()
        .write_all(&data)
        .unwrap();
    let (src_tls, dst_tls) = tls_pair();

    // An uninterrupted full copy, for the baseline.
    let clean = TestDestination::start(&dir.path().join("clean"), &dst_tls).await;
    let hashes = HashStore::open(dir.path().join("hashes-clean")).unwrap();
    let baseline = ship(
        &mut client(clean.addr, &src_tls),
        &hashes,
        &request(),
        volume(&image),
        &Faults::default(),
    )
    .await
    .unwrap();
    clean.stop().await;

    // The same copy through a proxy that cuts the connection at ~40%.
    let dest = TestDestination::start(&dir.path().join("dst"), &dst_tls).await;
    let proxy = flaky_proxy(dest.addr, baseline.bytes_shipped * 2 / 5).await;
    let hashes = HashStore::open(dir.path().join("hashes")).unwrap();
    let report = ship(
        &mut client(proxy, &src_tls),
        &hashes,
        &request(),
        volume(&image),
        &Faults::default(),
    )
    .await
    .unwrap();
    println!(
        "uninterrupted: {} bytes; cut and resumed: {} bytes, {} reconnect(s)",
        baseline.bytes_shipped, report.bytes_shipped, report.reconnects
    );
    assert!(report.reconnects >= 1, "the connection was cut");
    // At most the chunks in flight at the cut travel twice; starting over would add 40%.
    let resent_at_most = WINDOW_CHUNKS as u64 * CHUNK_WIRE_BYTES;
    assert!(
        report.bytes_shipped <= baseline.bytes_shipped + resent_at_most,
        "a resumed stream does not start over: {} bytes against {} + {resent_at_most}",
        report.bytes_shipped,
        baseline.bytes_shipped
    );
    assert!(resent_at_most < baseline.bytes_shipped * 2 / 5);
    let copy = dest.replicas.generation_path(&request().pair, 1, "disk");
    assert_eq!(checksum(&copy), checksum(&image));
    dest.stop().await;
}
