//! Shared by the replication tests: an independent checksum of a volume (not the delta
//! engine's own digest), and a destination served over mutual TLS on loopback.

#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use ferry_replicator::destination::{Destination, Journal, LocalReplicas, NoObserver};
use ferry_replicator::tls::{CertificateAuthority, TlsMaterial};
use ferry_replicator::transport::{connect_peer, serve_replication};
use ferry_schemas::proto::ReplicationClient;
use tonic::transport::Channel;

/// BLAKE3 over every entry of a tree in path order: relative path, type, mode, size, content
/// or symlink target. For an image file: its content.
pub fn checksum(path: &Path) -> String {
    let mut hasher = blake3::Hasher::new();
    let meta = std::fs::symlink_metadata(path).unwrap();
    if meta.is_file() {
        hasher.update(&std::fs::read(path).unwrap());
        return hasher.finalize().to_hex().to_string();
    }
    let mut entries = Vec::new();
    walk(path, path, &mut entries);
    entries.sort();
    for (rel, full) in entries {
        let m = std::fs::symlink_metadata(&full).unwrap();
        hasher.update(rel.as_bytes());
        hasher.update(&m.mode().to_le_bytes());
        if m.file_type().is_symlink() {
            hasher.update(
                std::fs::read_link(&full)
                    .unwrap()
                    .to_string_lossy()
                    .as_bytes(),
            );
        } else if m.is_file() {
            hasher.update(&m.len().to_le_bytes());
            hasher.update(&std::fs::read(&full).unwrap());
        }
    }
    hasher.finalize().to_hex().to_string()
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, std::path::PathBuf)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .to_string();
        if rel.starts_with(ferry_replicator::delta::STASH_DIR_NAME) {
            continue;
        }
        out.push((rel, path.clone()));
        if entry.file_type().unwrap().is_dir() {
            walk(root, &path, out);
        }
    }
}

/// Certificates for a source and a destination site from one CA.
pub fn tls_pair() -> (TlsMaterial, TlsMaterial) {
    let ca = CertificateAuthority::generate("ferry-test").unwrap();
    let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    (
        ca.issue("src", &sans).unwrap(),
        ca.issue("dst", &sans).unwrap(),
    )
}

/// A destination with local replicas under `dir`, served on 127.0.0.1 with mutual TLS.
pub struct TestDestination {
    pub addr: std::net::SocketAddr,
    pub destination: Destination,
    pub replicas: LocalReplicas,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestDestination {
    pub async fn start(dir: &Path, tls: &TlsMaterial) -> Self {
        let journal = Journal::open(&dir.join("journal")).unwrap();
        let replicas = LocalReplicas::new(dir.join("replicas"));
        let destination =
            Destination::new(journal, Arc::new(replicas.clone()), Arc::new(NoObserver), 3);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = destination.clone();
        let tls = tls.clone();
        let task = tokio::spawn(async move {
            serve_replication(listener, &tls, serving, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            destination,
            replicas,
            stop: Some(stop),
            task,
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), self.task).await;
    }
}

pub fn client(addr: std::net::SocketAddr, tls: &TlsMaterial) -> ReplicationClient<Channel> {
    connect_peer(&addr.to_string(), tls).unwrap()
}
