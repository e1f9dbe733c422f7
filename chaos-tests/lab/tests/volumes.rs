//! The lab node's storage: provisioning and binding of PVCs, VolumeSnapshots that are
//! point-in-time copies taken with the volume's writers frozen, restores from snapshots, and
//! reclaiming of snapshots and volumes. Each test runs its own in-process site.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{eventually, unique_ns};
use ferry_lab::node::snapshots::{
    DeletionPolicy, VolumeSnapshot, VolumeSnapshotContent, VolumeSnapshotSource, VolumeSnapshotSpec,
};
use ferry_lab::node::storage::{self, VolumeMode};
use ferry_lab::node::{CSI_DRIVER, STORAGE_CLASS};
use ferry_lab::site::{client_from, SiteRuntime};
use k8s_openapi::api::core::v1::{Event, Namespace, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::{Client, ResourceExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Deadline of one awaited condition.
const T: Duration = Duration::from_secs(30);
/// Deadline of a whole test.
const TEST: Duration = Duration::from_secs(180);
const MIB: u64 = 1 << 20;

/// A running site with a fresh namespace.
struct Lab {
    site: SiteRuntime,
    client: Client,
    ns: String,
    _dir: tempfile::TempDir,
}

impl Lab {
    async fn start() -> Self {
        Self::start_in(tempfile::tempdir().expect("temp dir")).await
    }

    async fn start_in(dir: tempfile::TempDir) -> Self {
        let site = SiteRuntime::start("t", dir.path(), "127.0.0.1:0".parse().unwrap())
            .await
            .expect("site starts");
        let client = client_from(&dir.path().join("kubeconfig"))
            .await
            .expect("client from the site's kubeconfig");
        let ns = unique_ns("vol");
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("namespace created");
        Self {
            site,
            client,
            ns,
            _dir: dir,
        }
    }

    /// Stops the site; returns its directory, removed when dropped.
    async fn stop(self) -> tempfile::TempDir {
        self.site.shutdown().await;
        self._dir
    }

    fn claims(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn snapshots(&self) -> Api<VolumeSnapshot> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates a claim of the lab class (unset: the default) for `size`, optionally from a
    /// snapshot.
    async fn claim(&self, name: &str, mode: VolumeMode, size: &str, snapshot: Option<&str>) {
        let mut spec = json!({
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": mode.as_str(),
            "resources": {"requests": {"storage": size}},
        });
        if let Some(snapshot) = snapshot {
            spec["dataSource"] = json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snapshot});
        }
        let pvc: PersistentVolumeClaim =
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
        self.claims()
            .create(&PostParams::default(), &pvc)
            .await
            .expect("claim created");
    }

    /// Awaits the claim's binding; returns its volume's host path and mode.
    async fn bound(&self, name: &str) -> (PathBuf, VolumeMode) {
        eventually(&format!("claim {name} bound"), T, || async {
            let found = storage::volume_path(&self.client, &self.ns, name).await;
            match found {
                Ok(Some(v)) => Ok(v),
                Ok(None) => {
                    let pvc = self.claims().get(name).await.map_err(|e| e.to_string())?;
                    Err(format!("status {:?}", pvc.status))
                }
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    async fn snapshot(&self, name: &str, claim: &str) {
        let vs = VolumeSnapshot::new(
            name,
            VolumeSnapshotSpec {
                source: VolumeSnapshotSource {
                    persistent_volume_claim_name: Some(claim.to_string()),
                    volume_snapshot_content_name: None,
                },
                volume_snapshot_class_name: Some(STORAGE_CLASS.to_string()),
            },
        );
        self.snapshots()
            .create(&PostParams::default(), &vs)
            .await
            .expect("snapshot created");
    }

    /// Awaits `readyToUse`; returns the snapshot, its content and the copy's path.
    async fn ready(&self, name: &str) -> (VolumeSnapshot, VolumeSnapshotContent, PathBuf) {
        let contents = Api::<VolumeSnapshotContent>::all(self.client.clone());
        eventually(&format!("snapshot {name} ready"), T, || async {
            let vs = self
                .snapshots()
                .get(name)
                .await
                .map_err(|e| e.to_string())?;
            let status = vs.status.clone().unwrap_or_default();
            let (Some(true), Some(content)) = (
                status.ready_to_use,
                status.bound_volume_snapshot_content_name.clone(),
            ) else {
                return Err(format!("status {status:?}"));
            };
            let content = contents.get(&content).await.map_err(|e| e.to_string())?;
            let handle = content
                .status
                .as_ref()
                .and_then(|s| s.snapshot_handle.clone())
                .ok_or_else(|| format!("content status {:?}", content.status))?;
            Ok((vs, content, PathBuf::from(handle)))
        })
        .await
    }

    /// Warning Events about `object` with `reason`.
    async fn events(&self, object: &str, reason: &str) -> Vec<Event> {
        let events = Api::<Event>::namespaced(self.client.clone(), &self.ns)
            .list(&Default::default())
            .await
            .expect("events listed");
        events
            .items
            .into_iter()
            .filter(|e| {
                e.involved_object.name.as_deref() == Some(object)
                    && e.reason.as_deref() == Some(reason)
            })
            .collect()
    }
}

/// blake3 over a file's contents, or over a tree's sorted relative paths, entry kinds,
/// contents and symlink targets.
fn digest(path: &Path) -> blake3::Hash {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).expect("readable directory") {
            let path = entry.expect("directory entry").path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(
                    rel,
                    [b"link:".as_slice(), target.as_os_str().as_encoded_bytes()].concat(),
                );
            } else if meta.is_dir() {
                out.insert(rel, b"dir".to_vec());
                walk(root, &path, out);
            } else {
                out.insert(
                    rel,
                    [b"file:".as_slice(), &std::fs::read(&path).unwrap()].concat(),
                );
            }
        }
    }
    let mut hasher = blake3::Hasher::new();
    if path.is_dir() {
        let mut entries = BTreeMap::new();
        walk(path, path, &mut entries);
        for (rel, body) in entries {
            hasher.update(&(rel.len() as u64).to_le_bytes());
            hasher.update(rel.as_bytes());
            hasher.update(&(body.len() as u64).to_le_bytes());
            hasher.update(&body);
        }
    } else {
        let mut file = std::fs::File::open(path).expect("image opens");
        let mut buf = vec![0; 1 << 20];
        loop {
            let n = file.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    hasher.finalize()
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    rng.fill(buf.as_mut_slice());
    buf
}

/// Writes a small tree: nested files, a random binary, a symlink.
fn write_tree(root: &Path, rng: &mut StdRng) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("a.txt"), "first version\n").unwrap();
    std::fs::write(root.join("sub/b.bin"), random_bytes(rng, 100 * 1024)).unwrap();
    std::fs::write(root.join("sub/deeper/c.txt"), "c\n").unwrap();
    std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
}

/// Changes, adds and deletes files of the tree `write_tree` made.
fn change_tree(root: &Path) {
    std::fs::write(root.join("a.txt"), "second version\n").unwrap();
    std::fs::write(root.join("new.txt"), "added after the snapshot\n").unwrap();
    std::fs::remove_file(root.join("sub/b.bin")).unwrap();
    std::fs::remove_dir_all(root.join("sub/deeper")).unwrap();
}

/// Writes `count` random 4 KiB blocks at random 4 KiB-aligned offsets of the image.
fn write_blocks(image: &Path, rng: &mut StdRng, count: usize) {
    let file = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    let blocks = file.metadata().unwrap().len() / 4096;
    for _ in 0..count {
        let offset = rng.random_range(0..blocks) * 4096;
        file.write_at(&random_bytes(rng, 4096), offset).unwrap();
    }
    file.sync_all().unwrap();
}

async fn bounded(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(TEST, test)
        .await
        .expect("test finished within its deadline");
}

#[tokio::test]
async fn claims_are_provisioned_and_bound_and_classes_exist() {
    bounded(async {
        let lab = Lab::start().await;
        let class = eventually("StorageClass applied", T, || async {
            Api::<StorageClass>::all(lab.client.clone())
                .get_opt(STORAGE_CLASS)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "absent".to_string())
        })
        .await;
        assert_eq!(class.provisioner, CSI_DRIVER);
        assert_eq!(class.reclaim_policy.as_deref(), Some("Delete"));
        assert_eq!(class.volume_binding_mode.as_deref(), Some("Immediate"));
        assert_eq!(class.allow_volume_expansion, Some(true));
        assert_eq!(
            class
                .annotations()
                .get("storageclass.kubernetes.io/is-default-class")
                .map(String::as_str),
            Some("true")
        );
        let snapshot_class = eventually("VolumeSnapshotClass applied", T, || async {
            Api::<DynamicObject>::all_with(lab.client.clone(), &storage::snapshot_class_resource())
                .get_opt(STORAGE_CLASS)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "absent".to_string())
        })
        .await;
        assert_eq!(snapshot_class.data["driver"], CSI_DRIVER);
        assert_eq!(snapshot_class.data["deletionPolicy"], "Delete");

        lab.claim("files", VolumeMode::Filesystem, "1Gi", None)
            .await;
        lab.claim("raw", VolumeMode::Block, "64Mi", None).await;
        let (files, mode) = lab.bound("files").await;
        assert_eq!(mode, VolumeMode::Filesystem);
        // Claims made without a class get the default one, as DefaultStorageClass admits them.
        let claim = lab.claims().get("files").await.unwrap();
        assert_eq!(
            claim.spec.unwrap().storage_class_name.as_deref(),
            Some(STORAGE_CLASS)
        );
        assert!(files.is_dir(), "{} is a directory", files.display());
        let (raw, mode) = lab.bound("raw").await;
        assert_eq!(mode, VolumeMode::Block);
        let meta = std::fs::metadata(&raw).expect("image exists");
        assert!(meta.is_file());
        assert_eq!(meta.len(), 64 * MIB, "image is exactly the requested size");
        assert!(
            meta.blocks() * 512 < meta.len(),
            "image is sparse: {} blocks",
            meta.blocks()
        );

        let pvc = lab.claims().get("files").await.unwrap();
        let uid = pvc.uid().unwrap();
        let pv_name = format!("pvc-{uid}");
        assert_eq!(
            pvc.spec.as_ref().unwrap().volume_name.as_deref(),
            Some(pv_name.as_str())
        );
        let ann = pvc.annotations();
        assert_eq!(
            ann.get("pv.kubernetes.io/bind-completed")
                .map(String::as_str),
            Some("yes")
        );
        assert_eq!(
            ann.get("pv.kubernetes.io/bound-by-controller")
                .map(String::as_str),
            Some("yes")
        );
        let status = pvc.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Bound"));
        assert_eq!(status.capacity.unwrap()["storage"].0, "1Gi");
        assert_eq!(status.access_modes.unwrap(), ["ReadWriteOnce"]);

        let pv = Api::<PersistentVolume>::all(lab.client.clone())
            .get(&pv_name)
            .await
            .unwrap();
        let spec = pv.spec.clone().unwrap();
        assert_eq!(pv.status.unwrap().phase.as_deref(), Some("Bound"));
        assert_eq!(spec.claim_ref.unwrap().uid.as_deref(), Some(uid.as_str()));
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        assert_eq!(spec.storage_class_name.as_deref(), Some(STORAGE_CLASS));
        assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
        let csi = spec.csi.unwrap();
        assert_eq!(
            (csi.driver.as_str(), csi.volume_handle.as_str()),
            (CSI_DRIVER, pv_name.as_str())
        );
        assert_eq!(csi.fs_type.as_deref(), Some("ext4"));
        assert_eq!(
            csi.volume_attributes.unwrap()["path"],
            files.display().to_string()
        );

        let events = lab.events("files", "ProvisioningSucceeded").await;
        assert_eq!(
            events.len(),
            1,
            "one ProvisioningSucceeded event: {events:?}"
        );
        assert_eq!(events[0].type_.as_deref(), Some("Normal"));
        lab.stop().await;
    })
    .await;
}

#[tokio::test]
async fn snapshots_keep_the_content_of_their_instant() {
    bounded(async {
        let lab = Lab::start().await;
        let mut rng = StdRng::seed_from_u64(7);
        lab.claim("files", VolumeMode::Filesystem, "1Gi", None)
            .await;
        lab.claim("raw", VolumeMode::Block, "64Mi", None).await;
        let (files, _) = lab.bound("files").await;
        let (raw, _) = lab.bound("raw").await;

        write_tree(&files, &mut rng);
        write_blocks(&raw, &mut rng, 64);
        let (files_before, raw_before) = (digest(&files), digest(&raw));
        lab.snapshot("files-snap", "files").await;
        lab.snapshot("raw-snap", "raw").await;
        let (vs, content, files_copy) = lab.ready("files-snap").await;
        let (raw_vs, raw_content, raw_copy) = lab.ready("raw-snap").await;
        assert_eq!(
            digest(&files_copy),
            files_before,
            "the copy holds the volume's tree"
        );
        assert_eq!(
            digest(&raw_copy),
            raw_before,
            "the copy holds the volume's image"
        );

        change_tree(&files);
        write_blocks(&raw, &mut rng, 64);
        assert_ne!(digest(&files), files_before, "the volume changed");
        assert_ne!(digest(&raw), raw_before, "the image changed");
        assert_eq!(
            digest(&files_copy),
            files_before,
            "the snapshot did not change"
        );
        assert_eq!(
            digest(&raw_copy),
            raw_before,
            "the block snapshot did not change"
        );

        // What the API says about them.
        let status = vs.status.unwrap();
        assert_eq!(status.restore_size.unwrap().0, "1Gi");
        assert!(status.creation_time.is_some() && status.error.is_none());
        assert_eq!(raw_vs.status.unwrap().restore_size.unwrap().0, "64Mi");
        let uid = vs.metadata.uid.clone().unwrap();
        assert_eq!(content.name_any(), format!("snapcontent-{uid}"));
        assert_eq!(content.spec.driver, CSI_DRIVER);
        assert_eq!(content.spec.deletion_policy, DeletionPolicy::Delete);
        assert_eq!(
            content.spec.volume_snapshot_ref.uid.as_deref(),
            Some(uid.as_str())
        );
        let pv = lab
            .claims()
            .get("files")
            .await
            .unwrap()
            .spec
            .unwrap()
            .volume_name;
        assert_eq!(content.spec.source.volume_handle, pv);
        assert_eq!(
            content.spec.source_volume_mode.as_deref(),
            Some("Filesystem")
        );
        let content_status = content.status.clone().unwrap();
        assert_eq!(content_status.restore_size, Some(1 << 30));
        assert!(content_status.creation_time.is_some_and(|t| t > 0));
        assert_eq!(
            files_copy,
            lab.site.node.snapshots_dir().join(content.name_any())
        );
        assert_eq!(
            raw_content.spec.source_volume_mode.as_deref(),
            Some("Block")
        );
        assert!(vs
            .metadata
            .finalizers
            .unwrap()
            .iter()
            .any(|f| f == "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection"));
        assert_eq!(lab.events("files-snap", "SnapshotReady").await.len(), 1);
        lab.stop().await;
    })
    .await;
}

#[tokio::test]
async fn restored_claims_start_with_the_snapshot_content() {
    bounded(async {
        let lab = Lab::start().await;
        let mut rng = StdRng::seed_from_u64(11);
        lab.claim("files", VolumeMode::Filesystem, "1Gi", None)
            .await;
        lab.claim("raw", VolumeMode::Block, "64Mi", None).await;
        let (files, _) = lab.bound("files").await;
        let (raw, _) = lab.bound("raw").await;
        write_tree(&files, &mut rng);
        write_blocks(&raw, &mut rng, 64);
        lab.snapshot("files-snap", "files").await;
        lab.snapshot("raw-snap", "raw").await;
        let (_, _, files_copy) = lab.ready("files-snap").await;
        let (_, _, raw_copy) = lab.ready("raw-snap").await;
        // The sources move on; restores must come from the snapshots.
        change_tree(&files);
        write_blocks(&raw, &mut rng, 64);

        lab.claim(
            "files-restored",
            VolumeMode::Filesystem,
            "1Gi",
            Some("files-snap"),
        )
        .await;
        lab.claim("raw-restored", VolumeMode::Block, "64Mi", Some("raw-snap"))
            .await;
        let (files_restored, _) = lab.bound("files-restored").await;
        let (raw_restored, mode) = lab.bound("raw-restored").await;
        assert_eq!(mode, VolumeMode::Block);
        assert_eq!(digest(&files_restored), digest(&files_copy));
        assert_ne!(digest(&files_restored), digest(&files));
        assert_eq!(digest(&raw_restored), digest(&raw_copy));
        assert_eq!(std::fs::metadata(&raw_restored).unwrap().len(), 64 * MIB);
        assert_eq!(
            lab.events("raw-restored", "ProvisioningSucceeded")
                .await
                .len(),
            1
        );

        // A snapshot larger than the request is refused: the claim stays Pending.
        lab.claim("too-small", VolumeMode::Block, "32Mi", Some("raw-snap"))
            .await;
        let refused = eventually("a ProvisioningFailed warning", T, || async {
            let events = lab.events("too-small", "ProvisioningFailed").await;
            events
                .into_iter()
                .next()
                .ok_or_else(|| "no event yet".to_string())
        })
        .await;
        assert_eq!(refused.type_.as_deref(), Some("Warning"));
        assert!(refused.message.unwrap().contains("needs 67108864 bytes"));
        let pvc = lab.claims().get("too-small").await.unwrap();
        assert_eq!(pvc.spec.unwrap().volume_name, None);
        assert_ne!(pvc.status.and_then(|s| s.phase).as_deref(), Some("Bound"));
        lab.stop().await;
    })
    .await;
}

#[tokio::test]
async fn deleting_snapshots_and_claims_removes_their_data() {
    bounded(async {
        let lab = Lab::start().await;
        let mut rng = StdRng::seed_from_u64(13);
        lab.claim("files", VolumeMode::Filesystem, "1Gi", None)
            .await;
        lab.claim("raw", VolumeMode::Block, "64Mi", None).await;
        let (files, _) = lab.bound("files").await;
        let (raw, _) = lab.bound("raw").await;
        write_tree(&files, &mut rng);
        lab.snapshot("files-snap", "files").await;
        let (_, content, copy) = lab.ready("files-snap").await;
        assert!(copy.is_dir());

        lab.snapshots()
            .delete("files-snap", &DeleteParams::default())
            .await
            .unwrap();
        let contents = Api::<VolumeSnapshotContent>::all(lab.client.clone());
        eventually("snapshot, content and copy gone", T, || async {
            let vs = lab
                .snapshots()
                .get_opt("files-snap")
                .await
                .map_err(|e| e.to_string())?;
            let c = contents
                .get_opt(&content.name_any())
                .await
                .map_err(|e| e.to_string())?;
            match (vs, c, copy.exists()) {
                (None, None, false) => Ok(()),
                state => Err(format!("{state:?}")),
            }
        })
        .await;

        let pvs = Api::<PersistentVolume>::all(lab.client.clone());
        for (claim, path) in [("files", &files), ("raw", &raw)] {
            let pv = lab
                .claims()
                .get(claim)
                .await
                .unwrap()
                .spec
                .unwrap()
                .volume_name
                .unwrap();
            lab.claims()
                .delete(claim, &DeleteParams::default())
                .await
                .unwrap();
            eventually(&format!("volume of {claim} gone"), T, || async {
                let found = pvs.get_opt(&pv).await.map_err(|e| e.to_string())?;
                match (found, path.exists()) {
                    (None, false) => Ok(()),
                    (pv, exists) => Err(format!(
                        "pv {:?}, data exists: {exists}",
                        pv.and_then(|p| p.status)
                    )),
                }
            })
            .await;
        }
        lab.stop().await;
    })
    .await;
}

/// Bytes in use on the filesystem holding `path` (`statvfs`: blocks in use times fragment size).
fn used_bytes(path: &Path) -> u64 {
    let fs = rustix::fs::statvfs(path).expect("statvfs");
    (fs.f_blocks - fs.f_bfree) * fs.f_frsize
}

/// Unmounts the node storage however the test ends, before its directory goes.
struct Mounted(ferry_lab::sites::SiteLayout);

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = ferry_lab::node::backing::release(&self.0) {
            eprintln!("unmounting {}: {e:#}", self.0.node().display());
        }
    }
}

/// On copy-on-write node storage (XFS with reflink, as `ferry-lab up` makes it when root and
/// mkfs.xfs allow), a snapshot and a restore of a volume share its extents: they take no
/// space, yet each keeps its own content when the others change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    lab_no_xfs,
    ignore = "copy-on-write node storage needs root and mkfs.xfs (apt-get install xfsprogs)"
)]
async fn snapshots_and_restores_share_extents_on_copy_on_write_storage() {
    use ferry_lab::node::backing::{self, Backing, NodeStorage};
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = ferry_lab::sites::SiteLayout::new(dir.path());
        let backing =
            backing::prepare(&layout, NodeStorage::Reflink).unwrap_or_else(|e| panic!("{e:#}"));
        let mounted = Mounted(layout.clone());
        assert!(matches!(backing, Backing::Reflink(_)), "{backing}");
        assert_eq!(backing::describe(&layout), backing);
        let lab = Lab::start_in(dir).await;
        // Re-bound after the lab: on a panic it drops first, so the directory is removed
        // only once unmounted.
        let mounted = mounted;
        let mut rng = StdRng::seed_from_u64(23);
        lab.claim("raw", VolumeMode::Block, "64Mi", None).await;
        lab.claim("files", VolumeMode::Filesystem, "1Gi", None)
            .await;
        let (raw, _) = lab.bound("raw").await;
        let (files, _) = lab.bound("files").await;
        // 48 MiB of data in the image, 12 MiB in one file of the tree.
        let data = random_bytes(&mut rng, (48 * MIB) as usize);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&raw)
            .unwrap()
            .write_all_at(&data, 0)
            .unwrap();
        std::fs::write(files.join("table"), &data[..(12 * MIB) as usize]).unwrap();
        let node = layout.node();
        rustix::fs::sync();
        let before = used_bytes(&node);

        lab.snapshot("raw-snap", "raw").await;
        lab.snapshot("files-snap", "files").await;
        let (_, _, raw_copy) = lab.ready("raw-snap").await;
        let (_, _, files_copy) = lab.ready("files-snap").await;
        lab.claim("raw-restored", VolumeMode::Block, "64Mi", Some("raw-snap"))
            .await;
        let (restored, _) = lab.bound("raw-restored").await;
        rustix::fs::sync();
        let grown = used_bytes(&node).saturating_sub(before);
        assert!(
            grown < 4 * MIB,
            "two snapshots and a restore of 60 MiB of data took {grown} bytes"
        );
        let raw_digest = digest(&raw);
        assert_eq!(digest(&raw_copy), raw_digest);
        assert_eq!(digest(&restored), raw_digest);
        assert_eq!(digest(&files_copy), digest(&files));

        // Shared until written: the volume moves on, its snapshot and restore do not.
        write_blocks(&raw, &mut rng, 64);
        assert_ne!(digest(&raw), raw_digest);
        assert_eq!(
            digest(&raw_copy),
            raw_digest,
            "the snapshot kept its instant"
        );
        assert_eq!(
            digest(&restored),
            raw_digest,
            "the restore kept the snapshot's"
        );
        let dir = lab.stop().await;
        drop(mounted);
        drop(dir);
        assert!(
            !backing::is_mount_point(&layout.node()),
            "the node storage is unmounted"
        );
    })
    .await;
}

/// Kills the writer when the test ends, however it ends.
struct Writer(Child);

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const LINE: &str = "of a writer that appends one line per write";

/// Checks every line is `<n> LINE` with n counting from 1; returns the number of lines.
fn whole_lines(log: &str) -> usize {
    assert!(
        log.ends_with('\n'),
        "the log ends with a whole line: {:?}",
        &log[log.len().saturating_sub(80)..]
    );
    let mut count = 0;
    for (i, line) in log.lines().enumerate() {
        assert_eq!(line, format!("{} {LINE}", i + 1), "line {}", i + 1);
        count += 1;
    }
    count
}

#[tokio::test]
async fn frozen_writers_leave_whole_lines_in_the_copy() {
    bounded(async {
        let lab = Lab::start().await;
        lab.claim("log", VolumeMode::Filesystem, "1Gi", None).await;
        let (volume, _) = lab.bound("log").await;
        // One process doing the writes itself (echo is a shell builtin), so freezing its pid
        // freezes every write.
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                r#"i=0; while :; do i=$((i+1)); echo "$i {LINE}" >> "$P/log"; done"#
            ))
            .env("P", &volume)
            .spawn()
            .expect("writer starts");
        let writer = Writer(child);
        let pid = writer.0.id();
        lab.site.node.volume_users.add(&volume, pid);
        let log = volume.join("log");
        eventually("the writer has written 1000 lines", T, || async {
            let n = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .count();
            if n >= 1000 {
                Ok(())
            } else {
                Err(format!("{n} lines"))
            }
        })
        .await;

        lab.snapshot("log-snap", "log").await;
        let (_, _, copy) = lab.ready("log-snap").await;
        let copied = std::fs::read_to_string(copy.join("log")).expect("the copy has the log");
        let lines = whole_lines(&copied);
        assert!(lines >= 1000, "{lines} lines copied");

        // The writer was resumed and the copy is an instant of the log it keeps appending to.
        let live = eventually("the writer went on after the snapshot", T, || async {
            let live = std::fs::read_to_string(&log).unwrap_or_default();
            if live.len() > copied.len() {
                Ok(live)
            } else {
                Err(format!("{} bytes", live.len()))
            }
        })
        .await;
        assert!(
            live.starts_with(&copied),
            "the copy is a prefix of the live log"
        );
        drop(writer);
        lab.site.node.volume_users.remove_pid(pid);
        lab.stop().await;
    })
    .await;
}

impl Lab {
    /// Creates a lab PV named `name` over the directory `path`, optionally reserved for a claim
    /// of this namespace (`claimRef` without uid, as Ferry pre-binds replica volumes).
    async fn static_volume(&self, name: &str, path: &Path, size: &str, reserved_for: Option<&str>) {
        let mut spec = json!({
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "volumeMode": "Filesystem",
            "csi": {"driver": CSI_DRIVER, "volumeHandle": name, "volumeAttributes": {"path": path}},
        });
        if let Some(claim) = reserved_for {
            spec["claimRef"] = json!({"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": self.ns, "name": claim});
        }
        let pv: PersistentVolume =
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
        Api::<PersistentVolume>::all(self.client.clone())
            .create(&PostParams::default(), &pv)
            .await
            .expect("volume created");
    }

    /// Creates a claim of the lab class that names its volume.
    async fn named_claim(&self, name: &str, volume: &str, size: &str) {
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": STORAGE_CLASS,
                "volumeName": volume,
                "resources": {"requests": {"storage": size}},
            },
        }))
        .unwrap();
        self.claims()
            .create(&PostParams::default(), &pvc)
            .await
            .expect("claim created");
    }

    async fn volume_phase(&self, name: &str) -> Result<String, String> {
        let pv = Api::<PersistentVolume>::all(self.client.clone())
            .get(name)
            .await
            .map_err(|e| e.to_string())?;
        Ok(pv.status.and_then(|s| s.phase).unwrap_or_default())
    }

    /// Awaits a Warning Event with `reason` about `object`; returns its message.
    async fn warning(&self, object: &str, reason: &str) -> String {
        let event = eventually(&format!("{reason} warning on {object}"), T, || async {
            let events = self.events(object, reason).await;
            events
                .into_iter()
                .next()
                .ok_or_else(|| "none yet".to_string())
        })
        .await;
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        event.message.unwrap_or_default()
    }
}

#[tokio::test]
async fn named_volumes_bind_statically_and_retained_ones_keep_their_data() {
    bounded(async {
        let lab = Lab::start().await;
        let dir = lab.site.node.volumes_dir();
        for name in ["replica-a", "replica-b", "replica-small"] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("data"), name).unwrap();
        }
        lab.static_volume("replica-a", &dir.join("replica-a"), "1Gi", None)
            .await;
        lab.static_volume("replica-b", &dir.join("replica-b"), "1Gi", Some("app-b"))
            .await;
        lab.static_volume("replica-small", &dir.join("replica-small"), "1Mi", None)
            .await;
        eventually("an unclaimed volume is Available", T, || async {
            let phase = lab.volume_phase("replica-a").await?;
            if phase == "Available" {
                Ok(())
            } else {
                Err(phase)
            }
        })
        .await;

        // A free volume and a volume reserved for the claim are bound to it.
        lab.named_claim("app-a", "replica-a", "1Gi").await;
        lab.named_claim("app-b", "replica-b", "512Mi").await;
        for (claim, volume) in [("app-a", "replica-a"), ("app-b", "replica-b")] {
            let (path, _) = lab.bound(claim).await;
            assert_eq!(path, dir.join(volume));
            let pvc = lab.claims().get(claim).await.unwrap();
            let ann = pvc.annotations();
            assert_eq!(
                ann.get("pv.kubernetes.io/bind-completed")
                    .map(String::as_str),
                Some("yes")
            );
            assert_eq!(
                ann.get("pv.kubernetes.io/bound-by-controller"),
                None,
                "the user chose the volume"
            );
            let pv = Api::<PersistentVolume>::all(lab.client.clone())
                .get(volume)
                .await
                .unwrap();
            assert_eq!(pv.spec.unwrap().claim_ref.unwrap().uid, pvc.metadata.uid);
            assert_eq!(lab.volume_phase(volume).await.unwrap(), "Bound");
        }
        assert_eq!(
            lab.events("app-a", "ProvisioningSucceeded").await.len(),
            0,
            "nothing provisioned"
        );

        // A volume bound to another claim, or too small, is refused with a warning.
        lab.named_claim("intruder", "replica-a", "1Gi").await;
        assert!(lab
            .warning("intruder", "FailedBinding")
            .await
            .contains("bound to another claim"));
        lab.named_claim("greedy", "replica-small", "1Gi").await;
        assert!(lab
            .warning("greedy", "FailedBinding")
            .await
            .contains("capacity"));
        for claim in ["intruder", "greedy"] {
            let pvc = lab.claims().get(claim).await.unwrap();
            assert_ne!(pvc.status.and_then(|s| s.phase).as_deref(), Some("Bound"));
        }

        // Deleting the claim of a Retain volume releases it and keeps its data.
        lab.claims()
            .delete("app-a", &DeleteParams::default())
            .await
            .unwrap();
        eventually("the retained volume is Released", T, || async {
            let phase = lab.volume_phase("replica-a").await?;
            if phase == "Released" {
                Ok(())
            } else {
                Err(phase)
            }
        })
        .await;
        assert_eq!(
            std::fs::read_to_string(dir.join("replica-a/data")).unwrap(),
            "replica-a"
        );
        lab.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_restarted_site_keeps_its_volumes_and_snapshots_without_redoing_them() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let listen = "127.0.0.1:0".parse().unwrap();
        let site = SiteRuntime::start("t", dir.path(), listen)
            .await
            .expect("site starts");
        let client = client_from(&dir.path().join("kubeconfig")).await.unwrap();
        let ns = unique_ns("restart");
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
        let lab = Lab {
            site,
            client,
            ns,
            _dir: dir,
        };
        let mut rng = StdRng::seed_from_u64(17);
        lab.claim("files", VolumeMode::Filesystem, "1Gi", None)
            .await;
        let (files, _) = lab.bound("files").await;
        write_tree(&files, &mut rng);
        lab.snapshot("before", "files").await;
        let (before, _, copy) = lab.ready("before").await;
        let volume_digest = digest(&files);
        let Lab {
            site,
            ns,
            _dir: dir,
            ..
        } = lab;
        site.shutdown().await;

        let site = SiteRuntime::start("t", dir.path(), listen)
            .await
            .expect("site restarts");
        let client = client_from(&dir.path().join("kubeconfig")).await.unwrap();
        let lab = Lab {
            site,
            client,
            ns,
            _dir: dir,
        };
        // Work that needs the restarted controllers, after which the old objects were seen too.
        lab.snapshot("after", "files").await;
        lab.claim("restored", VolumeMode::Filesystem, "1Gi", Some("before"))
            .await;
        let (restored, _) = lab.bound("restored").await;
        lab.ready("after").await;
        assert_eq!(
            lab.bound("files").await.0,
            files,
            "the claim kept its volume"
        );
        assert_eq!(digest(&files), volume_digest);
        assert_eq!(digest(&restored), digest(&copy));
        let (again, _, copy_again) = lab.ready("before").await;
        assert_eq!(copy_again, copy);
        assert_eq!(
            again.status.unwrap().creation_time,
            before.status.unwrap().creation_time
        );

        let pvs = Api::<PersistentVolume>::all(lab.client.clone())
            .list(&Default::default())
            .await
            .unwrap();
        assert_eq!(
            pvs.items.len(),
            2,
            "one volume per claim: {:?}",
            pvs.items.iter().map(|p| p.name_any()).collect::<Vec<_>>()
        );
        let contents = Api::<VolumeSnapshotContent>::all(lab.client.clone())
            .list(&Default::default())
            .await
            .unwrap();
        assert_eq!(contents.items.len(), 2, "one content per snapshot");
        let mut on_disk: Vec<String> = std::fs::read_dir(lab.site.node.volumes_dir())
            .unwrap()
            .chain(std::fs::read_dir(lab.site.node.snapshots_dir()).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        assert_eq!(
            on_disk.len(),
            4,
            "two volumes and two copies, no leftovers: {on_disk:?}"
        );
        assert_eq!(lab.events("files", "ProvisioningSucceeded").await.len(), 1);
        lab.stop().await;
    })
    .await;
}

#[tokio::test]
async fn snapshots_wait_for_unbound_claims_and_bind_preprovisioned_contents() {
    bounded(async {
        let lab = Lab::start().await;
        let mut rng = StdRng::seed_from_u64(19);
        let volumes = lab.site.node.volumes_dir();

        // A snapshot of a claim that is not bound yet says why, then completes once it is.
        lab.named_claim("late", "late-volume", "1Gi").await;
        lab.snapshot("early", "late").await;
        let error = eventually("the snapshot reports the unbound claim", T, || async {
            let vs = lab.snapshots().get("early").await.map_err(|e| e.to_string())?;
            let status = vs.status.unwrap_or_default();
            match (status.ready_to_use, status.error) {
                (Some(false), Some(e)) => Ok(e),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        assert!(error.message.unwrap().contains("is not bound"));
        assert!(error.time.is_some());
        assert!(lab.warning("early", "SnapshotCreationFailed").await.contains("is not bound"));
        std::fs::create_dir_all(volumes.join("late-volume")).unwrap();
        write_tree(&volumes.join("late-volume"), &mut rng);
        lab.static_volume("late-volume", &volumes.join("late-volume"), "1Gi", None).await;
        let (_, _, copy) = lab.ready("early").await;
        assert_eq!(digest(&copy), digest(&volumes.join("late-volume")));
        let vs = lab.snapshots().get("early").await.unwrap();
        assert_eq!(vs.status.unwrap().error, None, "the error is cleared once ready");

        // A pre-provisioned content (an imported copy) is bound and can be restored from.
        let imported = lab.site.node.snapshots_dir().join("imported");
        std::fs::create_dir_all(&imported).unwrap();
        write_tree(&imported, &mut rng);
        let content: VolumeSnapshotContent = serde_json::from_value(json!({
            "metadata": {"name": "imported"},
            "spec": {
                "driver": CSI_DRIVER,
                "deletionPolicy": "Retain",
                "source": {"snapshotHandle": imported},
                "volumeSnapshotRef": {"kind": "VolumeSnapshot", "apiVersion": "snapshot.storage.k8s.io/v1", "namespace": lab.ns, "name": "imported"},
            },
        }))
        .unwrap();
        let contents = Api::<VolumeSnapshotContent>::all(lab.client.clone());
        contents.create(&PostParams::default(), &content).await.unwrap();
        let vs = VolumeSnapshot::new(
            "imported",
            VolumeSnapshotSpec {
                source: VolumeSnapshotSource {
                    persistent_volume_claim_name: None,
                    volume_snapshot_content_name: Some("imported".to_string()),
                },
                volume_snapshot_class_name: None,
            },
        );
        lab.snapshots().create(&PostParams::default(), &vs).await.unwrap();
        let (vs, content, handle) = lab.ready("imported").await;
        assert_eq!(handle, imported);
        assert_eq!(content.spec.volume_snapshot_ref.uid, vs.metadata.uid, "the reference is completed");
        lab.claim("from-import", VolumeMode::Filesystem, "1Gi", Some("imported")).await;
        let (restored, _) = lab.bound("from-import").await;
        assert_eq!(digest(&restored), digest(&imported));

        // Retain: deleting the snapshot keeps the content and the copy.
        lab.snapshots().delete("imported", &DeleteParams::default()).await.unwrap();
        eventually("the snapshot is gone", T, || async {
            match lab.snapshots().get_opt("imported").await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(vs) => Err(format!("finalizers {:?}", vs.metadata.finalizers)),
            }
        })
        .await;
        assert!(contents.get_opt("imported").await.unwrap().is_some());
        assert!(imported.join("a.txt").exists());
        lab.stop().await;
    })
    .await;
}

#[tokio::test]
async fn bound_claims_grow_only_up_and_only_where_their_class_allows() {
    bounded(async {
        let lab = Lab::start().await;
        lab.claim("raw", VolumeMode::Block, "16Mi", None).await;
        let (image, _) = lab.bound("raw").await;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .write_all_at(b"kept", 0)
            .unwrap();
        let resize = |size: &str| {
            let claims = lab.claims();
            let patch = json!({"spec": {"resources": {"requests": {"storage": size}}}});
            async move {
                claims
                    .patch("raw", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
                    .await
            }
        };
        // Down: refused, naming the field.
        let Err(kube::Error::Api(e)) = resize("8Mi").await else {
            panic!("shrinking a claim must be refused");
        };
        assert_eq!(e.code, 422);
        assert!(
            e.message.contains("spec.resources.requests.storage: Forbidden: field can not be less than previous value"),
            "{}",
            e.message
        );
        // Up, where the class allows it: the image grows, its data stays, the sizes say so.
        resize("32Mi").await.unwrap();
        eventually("raw grown to 32Mi", T, || async {
            let pvc = lab.claims().get("raw").await.map_err(|e| e.to_string())?;
            let capacity = pvc.status.and_then(|s| s.capacity).and_then(|c| c.get("storage").cloned());
            (capacity.as_ref().map(|q| q.0.as_str()) == Some("32Mi"))
                .then_some(())
                .ok_or(format!("{capacity:?}"))
        })
        .await;
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 32 * MIB);
        let mut head = [0u8; 4];
        std::fs::File::open(&image).unwrap().read_exact(&mut head).unwrap();
        assert_eq!(&head, b"kept");
        let volume = lab.claims().get("raw").await.unwrap().spec.unwrap().volume_name.unwrap();
        let pv = Api::<PersistentVolume>::all(lab.client.clone()).get(&volume).await.unwrap();
        assert_eq!(pv.spec.unwrap().capacity.unwrap()["storage"].0, "32Mi");
        let said = Api::<Event>::namespaced(lab.client.clone(), &lab.ns)
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .any(|e| e.reason.as_deref() == Some("VolumeResizeSuccessful"));
        assert!(said, "a VolumeResizeSuccessful Event");
        // Where the class does not: 403 with the admission plugin's words.
        Api::<StorageClass>::all(lab.client.clone())
            .patch(
                STORAGE_CLASS,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"allowVolumeExpansion": false})),
            )
            .await
            .unwrap();
        let Err(kube::Error::Api(e)) = resize("64Mi").await else {
            panic!("growing a claim of a class without expansion must be refused");
        };
        assert_eq!(e.code, 403);
        assert!(e.message.contains("must support resize"), "{}", e.message);
        lab.stop().await;
    })
    .await;
}
