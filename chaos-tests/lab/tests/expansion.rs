//! Volume expansion: an app at `a` with a Filesystem PVC and a Block PVC, protected by a
//! DRPair. Both PVCs grow at `a` (the Block one gets data past its old end):
//! - while `b`'s StorageClass does not allow expansion, `b` re-creates its replica PVCs at the
//!   new size from the generation it holds, with a `ReplicaNotExpandable` Event naming the
//!   class;
//! - once it does, the next growth expands the replica PVCs in place;
//! - either way each generation restores to exactly the source's bytes;
//! - a planned migration then stands the app up at `b` on PVCs of the new size, holding its
//!   data.

mod e2e;

use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;

use e2e::{condition, eventually, Lab, NS};
use ferry_lab::node::storage::bound_volume;
use ferry_lab::site::client_from;
use ferry_lab::testing::checksum;
use ferry_schemas::contract::{staging_claim, SYNC_REQUEST_ANNOTATION};
use ferry_schemas::DRPair;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const PAIR: &str = "grow";
const MIB: u64 = 1 << 20;

async fn create(client: &Client, object: Value) {
    e2e::create_object(client, NS, object).await
}

/// The host path of PVC `claim`'s volume once it is bound with at least `bytes` of capacity.
async fn volume_of(client: &Client, claim: &str, bytes: u64) -> PathBuf {
    eventually(&format!("PVC {claim} bound with {bytes} bytes"), || async {
        let v = bound_volume(client, NS, claim)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("not bound")?;
        (v.capacity_bytes >= bytes)
            .then_some(v.path)
            .ok_or(format!("capacity {}", v.capacity_bytes))
    })
    .await
}

async fn capacity(client: &Client, claim: &str) -> Option<String> {
    let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS)
        .get(claim)
        .await
        .ok()?;
    Some(pvc.status?.capacity?.get("storage")?.0.clone())
}

async fn grow(client: &Client, claim: &str, size: &str) {
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS)
        .patch(
            claim,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": size}}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("expanding {claim} to {size}: {e}"));
}

async fn allow_expansion(client: &Client, allow: bool) {
    Api::<StorageClass>::all(client.clone())
        .patch(
            "ferry-lab",
            &PatchParams::default(),
            &Patch::Merge(json!({"allowVolumeExpansion": allow})),
        )
        .await
        .unwrap();
}

async fn request_sync(a: &Client, token: &str) {
    Api::<DRPair>::namespaced(a.clone(), NS)
        .patch(
            PAIR,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {SYNC_REQUEST_ANNOTATION: token}}})),
        )
        .await
        .unwrap();
}

/// Requests a sync with `token` and returns the generation committed for it.
async fn sync(pairs: &Api<DRPair>, a: &Client, token: &str) -> u64 {
    request_sync(a, token).await;
    eventually(
        &format!("the generation of sync request {token}"),
        || async {
            let p = pairs.get(PAIR).await.map_err(|e| e.to_string())?;
            let s = p.status.clone().unwrap_or_default();
            match (s.last_sync_request.as_deref(), s.generation) {
                (Some(t), Some(g)) if t == token => Ok(g.0),
                other => Err(format!("{other:?}, Synced {:?}", condition(&p, "Synced"))),
            }
        },
    )
    .await
}

async fn generation(pairs: &Api<DRPair>) -> Result<u64, String> {
    let p = pairs.get(PAIR).await.map_err(|e| e.to_string())?;
    p.status
        .and_then(|s| s.generation)
        .map(|g| g.0)
        .ok_or("no generation".into())
}

/// Generation `generation` of volume `claim` at `b`, restored into a fresh PVC, checksums to
/// `sum`.
async fn restores_exactly(
    b: &Client,
    generation: u64,
    claim: &str,
    mode: &str,
    size: &str,
    sum: &str,
) {
    let name = format!("check-{claim}-g{generation}");
    create(b, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": {
        "accessModes": ["ReadWriteOnce"], "volumeMode": mode, "resources": {"requests": {"storage": size}},
        "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": format!("ferry-{PAIR}-{claim}-g{generation}")}}})).await;
    let restored = volume_of(b, &name, 0).await;
    assert_eq!(
        checksum(&restored),
        sum,
        "{claim} of generation {generation} at b"
    );
}

on_both_planes!(
    grown_volumes_grow_their_replicas_and_migrate_at_the_new_size,
    grown_volumes_grow_their_replicas_and_migrate_at_the_new_size_on_kubernetes,
    expansion_on
);

async fn expansion_on(settings: e2e::LabSettings) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    e2e::up(&lab.0, "a,b", &[], &settings);
    let a = client_from(&lab.0.join("a/kubeconfig")).await.unwrap();
    let b = client_from(&lab.0.join("b/kubeconfig")).await.unwrap();
    create(
        &a,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await;
    let labels = json!({"app": PAIR});
    create(&a, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "files", "labels": labels}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "32Mi"}}}})).await;
    create(&a, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "disk", "labels": labels}, "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "resources": {"requests": {"storage": "16Mi"}}}})).await;
    create(&a, json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": PAIR, "labels": labels}, "spec": {
        "replicas": 1, "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": labels}, "spec": {
            "containers": [{"name": "idle", "image": "busybox", "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "files", "mountPath": "/data"}],
                "volumeDevices": [{"name": "disk", "devicePath": "/dev/disk0"}]}],
            "volumes": [{"name": "files", "persistentVolumeClaim": {"claimName": "files"}}, {"name": "disk", "persistentVolumeClaim": {"claimName": "disk"}}]}}}})).await;
    let files = volume_of(&a, "files", 32 * MIB).await;
    let disk = volume_of(&a, "disk", 16 * MIB).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let mut write_at = |path: &PathBuf, offset: u64, len: usize| {
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    };
    write_at(&disk, 0, 4 << 20);
    std::fs::write(files.join("before.txt"), b"written at 32Mi").unwrap();

    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);
    create(&a, json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair", "metadata": {"name": PAIR}, "spec": {
        "selector": {"matchLabels": labels}, "primarySite": "a", "secondarySite": "b", "rpo": "30s"}})).await;
    let first = eventually("the first generation", || generation(&pairs)).await;

    // b's class cannot expand; a's volumes grow and the Block one gets data past its old end.
    // b re-creates its replicas at the new size from the generation it holds, and says why.
    let uid = |client: Client, claim: String| async move {
        Api::<PersistentVolumeClaim>::namespaced(client, NS)
            .get(&claim)
            .await
            .unwrap()
            .metadata
            .uid
            .unwrap()
    };
    let disk_replica = staging_claim(PAIR, "disk");
    let files_replica = staging_claim(PAIR, "files");
    let small = uid(b.clone(), disk_replica.clone()).await;
    allow_expansion(&b, false).await;
    grow(&a, "files", "64Mi").await;
    grow(&a, "disk", "32Mi").await;
    let disk = volume_of(&a, "disk", 32 * MIB).await;
    volume_of(&a, "files", 64 * MIB).await;
    write_at(&disk, 20 * MIB, MIB as usize);
    std::fs::write(files.join("after.txt"), b"written at 64Mi").unwrap();
    let (files_sum, disk_sum) = (checksum(&files), checksum(&disk));
    let recreated = sync(&pairs, &a, "grown-by-recreating").await;
    assert!(recreated > first);
    restores_exactly(&b, recreated, "files", "Filesystem", "64Mi", &files_sum).await;
    restores_exactly(&b, recreated, "disk", "Block", "32Mi", &disk_sum).await;
    assert_eq!(capacity(&b, &disk_replica).await.as_deref(), Some("32Mi"));
    assert_eq!(capacity(&b, &files_replica).await.as_deref(), Some("64Mi"));
    assert_ne!(
        uid(b.clone(), disk_replica.clone()).await,
        small,
        "re-created"
    );
    let said = Api::<Event>::namespaced(b.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ReplicaNotExpandable"))
        .filter_map(|e| e.note)
        .collect::<Vec<_>>();
    println!("b: {said:?}");
    assert!(
        // The API server's own refusal (PersistentVolumeClaimResize) is quoted.
        said.iter().any(|n| n.contains("\"ferry-lab\"")
            && n.contains("must support resize")
            && n.contains("re-creating")),
        "{said:?}"
    );

    // Once the class allows it, the replicas grow in place.
    allow_expansion(&b, true).await;
    let before = uid(b.clone(), disk_replica.clone()).await;
    grow(&a, "files", "96Mi").await;
    grow(&a, "disk", "48Mi").await;
    let disk = volume_of(&a, "disk", 48 * MIB).await;
    volume_of(&a, "files", 96 * MIB).await;
    write_at(&disk, 40 * MIB, MIB as usize);
    std::fs::write(files.join("later.txt"), b"written at 96Mi").unwrap();
    let (files_sum, disk_sum) = (checksum(&files), checksum(&disk));
    let grown = sync(&pairs, &a, "grown-in-place").await;
    assert_eq!(capacity(&b, &disk_replica).await.as_deref(), Some("48Mi"));
    assert_eq!(capacity(&b, &files_replica).await.as_deref(), Some("96Mi"));
    assert_eq!(
        uid(b.clone(), disk_replica.clone()).await,
        before,
        "expanded in place"
    );
    for (claim, mode, size, sum) in [
        ("files", "Filesystem", "96Mi", &files_sum),
        ("disk", "Block", "48Mi", &disk_sum),
    ] {
        restores_exactly(&b, grown, claim, mode, size, sum).await;
    }

    // A planned migration stands the app up at b on PVCs of the new size, with its data.
    create(
        &a,
        json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Migration",
        "metadata": {"name": "to-b", "namespace": NS},
        "spec": {"pair": PAIR, "targetSite": "b", "type": "Planned"}}),
    )
    .await;
    e2e::completed_migration(&a, "to-b").await;
    for (claim, size, bytes, sum) in [
        ("files", "96Mi", 96 * MIB, &files_sum),
        ("disk", "48Mi", 48 * MIB, &disk_sum),
    ] {
        let path = volume_of(&b, claim, bytes).await;
        assert_eq!(capacity(&b, claim).await.as_deref(), Some(size), "{claim}");
        assert_eq!(&checksum(&path), sum, "{claim} at b after the migration");
    }
}
