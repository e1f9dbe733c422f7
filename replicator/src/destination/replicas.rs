//! Where a destination keeps a pair's replica: one staging volume per source volume, written
//! by a mover while a generation arrives, and one point-in-time copy per committed generation.
//!
//! On a cluster ([`crate::kube_replicas`]) staging volumes are PVCs, movers are pods and copies
//! are VolumeSnapshots, as VolSync's ReplicationDestination keeps them. [`LocalReplicas`]
//! keeps the same shape in directories, for tests and for sites without Kubernetes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::delta::VolumeDigest;
use crate::mover::MoverSession;

/// A pair as `namespace/name` plus its parts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PairKey {
    /// The app's namespace.
    pub namespace: String,
    /// The DRPair's name.
    pub name: String,
}

impl std::fmt::Display for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A volume of a generation, as the source describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The source PVC's name.
    pub volume: String,
    /// volumeMode Block (an image) rather than Filesystem (a tree).
    pub block: bool,
    /// Requested capacity, e.g. `1Gi` (empty when unknown).
    pub capacity: String,
}

/// Copies of the app's own volumes at a site the app ran at, kept so that replication back to
/// that site ships a delta instead of a full copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The generation they stand for: the final generation of a planned migration, or, for a
    /// diverged seed, the newest generation this site knew the peer had committed.
    pub generation: u64,
    /// Volume (source PVC name) → copy name.
    pub snapshots: BTreeMap<String, String>,
    /// The copies hold writes the peer never received (the app ran here after `generation`,
    /// as at an old primary after a failover), so they equal no generation: a source must
    /// plan against this site's own index of them (`BaseIndex`). Without the flag they hold
    /// exactly `generation` (the app stopped before its final capture).
    pub diverged: bool,
}

/// Failures of a replica store; each names the volume or generation.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A filesystem step failed.
    #[error("{step} {path}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A Kubernetes step failed (the message names the object).
    #[error("{0}")]
    Kube(String),
    /// A step did not finish in time.
    #[error("timed out {0}")]
    Timeout(String),
}

impl From<ferry_runtime::volumes::VolumeError> for ReplicaError {
    fn from(e: ferry_runtime::volumes::VolumeError) -> Self {
        match e {
            ferry_runtime::volumes::VolumeError::Kube(m) => Self::Kube(m),
            ferry_runtime::volumes::VolumeError::Timeout(m) => Self::Timeout(m),
            ferry_runtime::volumes::VolumeError::NotExpandable(m) => Self::Kube(m),
        }
    }
}

/// The destination's storage for replicas.
#[tonic::async_trait]
pub trait ReplicaStore: Send + Sync + 'static {
    /// Returns a mover session on `pair`'s staging copy of `volume`. With `reset`, first makes
    /// the staging copy equal `base` (the newest committed generation's copy, `None` for
    /// empty), discarding whatever a torn sync left.
    async fn stage(
        &self,
        pair: &PairKey,
        volume: &VolumeSpec,
        base: Option<&str>,
        reset: bool,
    ) -> Result<MoverSession, ReplicaError>;

    /// Releases the movers of `pair` (after finish, before copying: nothing writes any more).
    async fn release(&self, pair: &PairKey) -> Result<(), ReplicaError>;

    /// Takes the point-in-time copies of `volumes`' staging as `generation`, recording with
    /// each the digest its content verified against (`digests`, by volume); returns volume →
    /// copy name.
    async fn snapshot(
        &self,
        pair: &PairKey,
        generation: u64,
        volumes: &[VolumeSpec],
        digests: &BTreeMap<String, VolumeDigest>,
    ) -> Result<BTreeMap<String, String>, ReplicaError>;

    /// Stores the manifests (JSON array) of `generation`.
    async fn store_manifests(
        &self,
        pair: &PairKey,
        generation: u64,
        manifests_json: &[u8],
    ) -> Result<(), ReplicaError>;

    /// Deletes copies and manifests of every generation of `pair` not in `keep`.
    async fn prune(&self, pair: &PairKey, keep: &[u64]) -> Result<(), ReplicaError>;

    /// Deletes everything kept for `pair` (the pair was deleted with `deletionPolicy:
    /// Delete`): staging volumes, every generation's copies and manifests, seeds, movers.
    /// Returns what was removed, as `Kind name`. Removing a pair with nothing left succeeds.
    async fn remove_pair(&self, pair: &PairKey) -> Result<Vec<String>, ReplicaError>;

    /// The newest **seed** of `pair`, if any: copies this site did not receive but holds
    /// anyway, because the app ran here (see [`Seed`]). Adopting a seed lets the first sync
    /// back be a delta.
    async fn seed(&self, _pair: &PairKey) -> Result<Option<Seed>, ReplicaError> {
        Ok(None)
    }
}

/// Replicas in a directory: `<root>/<namespace>/<pair>/staging/<volume>` and
/// `<root>/<namespace>/<pair>/g<generation>/<volume>` (plus `manifests.json`). Copies use
/// `cp -a --reflink=auto`, so they are cheap on filesystems that share extents.
#[derive(Debug, Clone)]
pub struct LocalReplicas {
    root: PathBuf,
}

impl LocalReplicas {
    /// Replicas under `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory of `pair`.
    pub fn pair_dir(&self, pair: &PairKey) -> PathBuf {
        self.root.join(&pair.namespace).join(&pair.name)
    }

    /// The copy of `volume` in committed generation `generation`.
    pub fn generation_path(&self, pair: &PairKey, generation: u64, volume: &str) -> PathBuf {
        self.pair_dir(pair)
            .join(format!("g{generation}"))
            .join(volume)
    }

    fn staging_path(&self, pair: &PairKey, volume: &str) -> PathBuf {
        self.pair_dir(pair).join("staging").join(volume)
    }
}

fn io(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ReplicaError {
    let path = path.to_path_buf();
    move |source| ReplicaError::Io { step, path, source }
}

async fn remove_any(path: &Path) -> Result<(), ReplicaError> {
    match tokio::fs::symlink_metadata(path).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("inspecting", path)(e)),
        Ok(m) if m.is_dir() => tokio::fs::remove_dir_all(path)
            .await
            .map_err(io("removing", path)),
        Ok(_) => tokio::fs::remove_file(path)
            .await
            .map_err(io("removing", path)),
    }
}

/// `cp -a --reflink=auto from to`: keeps ownership, modes, links, holes and timestamps.
async fn copy_tree(from: &Path, to: &Path) -> Result<(), ReplicaError> {
    let status = tokio::process::Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg(from)
        .arg(to)
        .status()
        .await
        .map_err(io("running cp for", to))?;
    if status.success() {
        Ok(())
    } else {
        Err(ReplicaError::Io {
            step: "copying",
            path: to.to_path_buf(),
            source: std::io::Error::other(format!("cp -a {} exited {status}", from.display())),
        })
    }
}

#[tonic::async_trait]
impl ReplicaStore for LocalReplicas {
    async fn stage(
        &self,
        pair: &PairKey,
        volume: &VolumeSpec,
        base: Option<&str>,
        reset: bool,
    ) -> Result<MoverSession, ReplicaError> {
        let staging = self.staging_path(pair, &volume.volume);
        let parent = staging.parent().unwrap_or(&self.root).to_path_buf();
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(io("creating", &parent))?;
        let missing = tokio::fs::symlink_metadata(&staging).await.is_err();
        if reset || missing {
            remove_any(&staging).await?;
            match base {
                Some(copy) => copy_tree(Path::new(copy), &staging).await?,
                None if volume.block => {
                    tokio::fs::File::create(&staging)
                        .await
                        .map_err(io("creating", &staging))?;
                }
                None => tokio::fs::create_dir_all(&staging)
                    .await
                    .map_err(io("creating", &staging))?,
            }
        }
        Ok(MoverSession::in_process(staging))
    }

    async fn release(&self, _pair: &PairKey) -> Result<(), ReplicaError> {
        // In-process movers end when their session is dropped.
        Ok(())
    }

    async fn snapshot(
        &self,
        pair: &PairKey,
        generation: u64,
        volumes: &[VolumeSpec],
        _digests: &BTreeMap<String, VolumeDigest>,
    ) -> Result<BTreeMap<String, String>, ReplicaError> {
        let dir = self.pair_dir(pair).join(format!("g{generation}"));
        // A leftover from a sync that died before its commit point is not a generation.
        remove_any(&dir).await?;
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io("creating", &dir))?;
        let mut copies = BTreeMap::new();
        for volume in volumes {
            let to = dir.join(&volume.volume);
            copy_tree(&self.staging_path(pair, &volume.volume), &to).await?;
            copies.insert(volume.volume.clone(), to.display().to_string());
        }
        sync_dir(&dir).await?;
        Ok(copies)
    }

    async fn store_manifests(
        &self,
        pair: &PairKey,
        generation: u64,
        manifests_json: &[u8],
    ) -> Result<(), ReplicaError> {
        let path = self
            .pair_dir(pair)
            .join(format!("g{generation}"))
            .join("manifests.json");
        tokio::fs::write(&path, manifests_json)
            .await
            .map_err(io("writing", &path))
    }

    async fn prune(&self, pair: &PairKey, keep: &[u64]) -> Result<(), ReplicaError> {
        let dir = self.pair_dir(pair);
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("listing", &dir)(e)),
        };
        while let Some(entry) = entries.next_entry().await.map_err(io("listing", &dir))? {
            let name = entry.file_name().to_string_lossy().to_string();
            let generation = name.strip_prefix('g').and_then(|g| g.parse::<u64>().ok());
            if let Some(g) = generation {
                if !keep.contains(&g) {
                    remove_any(&entry.path()).await?;
                }
            }
        }
        Ok(())
    }

    async fn remove_pair(&self, pair: &PairKey) -> Result<Vec<String>, ReplicaError> {
        let dir = self.pair_dir(pair);
        if tokio::fs::symlink_metadata(&dir).await.is_err() {
            return Ok(Vec::new());
        }
        remove_any(&dir).await?;
        Ok(vec![format!("directory {}", dir.display())])
    }
}

/// fsyncs `dir` and everything copied into it, so a committed generation survives a crash.
async fn sync_dir(dir: &Path) -> Result<(), ReplicaError> {
    let status = tokio::process::Command::new("sync")
        .arg("-f")
        .arg(dir)
        .status()
        .await
        .map_err(io("syncing", dir))?;
    if status.success() {
        Ok(())
    } else {
        Err(ReplicaError::Io {
            step: "syncing",
            path: dir.to_path_buf(),
            source: std::io::Error::other(format!("sync -f exited {status}")),
        })
    }
}
