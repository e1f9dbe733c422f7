//! Changed block tracking (KEP-3314) end to end, on copy-on-write node storage: a pair with a
//! Block volume at `a`, whose CSI driver serves SnapshotMetadata.
//! - A few scattered writes: the next sync reads only the changed extents the driver reports
//!   (`ChangedBlockTracking=True`, the bytes read in its message), the source keeps exactly
//!   one base snapshot, and the generation restores at `b` to the source's bytes.
//! - The base snapshot deleted: the sync falls back to a full scan with the reason on
//!   `ChangedBlockTracking=False` and a `FullScan` Event; same bytes at `b`.
//! - The volume grown: the driver's answer no longer fits the base, so a full scan again,
//!   saying `resized`; same bytes at `b`. The next sync is tracked again.

mod e2e;

use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;

use e2e::{condition, eventually, Lab, NS};
use ferry_lab::control_plane::ControlPlane;
use ferry_lab::node::storage::bound_volume;
use ferry_lab::site::client_from;
use ferry_lab::testing::checksum;
use ferry_schemas::contract::SYNC_REQUEST_ANNOTATION;
use ferry_schemas::DRPair;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const PAIR: &str = "cbt";
const MIB: u64 = 1 << 20;

async fn create(client: &Client, object: Value) {
    e2e::create_object(client, NS, object).await
}

/// The host path of PVC `claim`'s volume once bound with at least `bytes` of capacity.
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

fn snapshots(client: &Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
        "volumesnapshots",
    );
    Api::namespaced_with(client.clone(), NS, &resource)
}

/// Requests a sync with `token`; returns the generation committed for it and the pair then.
async fn sync(a: &Client, token: &str) -> (u64, DRPair) {
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);
    pairs
        .patch(
            PAIR,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {SYNC_REQUEST_ANNOTATION: token}}})),
        )
        .await
        .unwrap();
    eventually(
        &format!("the generation of sync request {token}"),
        || async {
            let p = pairs.get(PAIR).await.map_err(|e| e.to_string())?;
            let s = p.status.clone().unwrap_or_default();
            match (s.last_sync_request.as_deref(), s.generation) {
                (Some(t), Some(g)) if t == token => Ok((g.0, p)),
                other => Err(format!("{other:?}, Synced {:?}", condition(&p, "Synced"))),
            }
        },
    )
    .await
}

/// Generation `generation` of `disk` at `b`, restored into a fresh PVC, checksums to `sum`.
async fn restores_exactly(b: &Client, generation: u64, size: &str, sum: &str) {
    let name = format!("check-g{generation}");
    create(b, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": {
        "accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "resources": {"requests": {"storage": size}},
        "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": format!("ferry-{PAIR}-disk-g{generation}")}}})).await;
    let restored = volume_of(b, &name, 0).await;
    assert_eq!(
        checksum(&restored),
        sum,
        "disk of generation {generation} at b"
    );
}

/// `(bytes read, volume bytes)` from `ChangedBlockTracking=True`'s message
/// (`changed block tracking: disk: X of Y bytes read`).
fn tracked(pair: &DRPair) -> (u64, u64) {
    let c = condition(pair, "ChangedBlockTracking").expect("ChangedBlockTracking is set");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "ChangedBlocksRead"),
        "{}",
        c.message
    );
    eprintln!("ChangedBlockTracking: {}", c.message);
    let words: Vec<&str> = c.message.split_whitespace().collect();
    let of = words.iter().position(|w| *w == "of").expect("X of Y");
    (
        words[of - 1].parse().unwrap(),
        words[of + 1].parse().unwrap(),
    )
}

fn full_scan(pair: &DRPair, why: &str) {
    let c = condition(pair, "ChangedBlockTracking").expect("ChangedBlockTracking is set");
    eprintln!("ChangedBlockTracking: {}", c.message);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "FullScan"),
        "{}",
        c.message
    );
    assert!(
        c.message.contains("disk read whole") && c.message.contains(why),
        "{}",
        c.message
    );
}

/// The source snapshots the replicator keeps at `a`: its changed block tracking bases.
async fn bases(a: &Client) -> Vec<String> {
    let list = snapshots(a)
        .list(
            &ListParams::default().labels(&format!("ferry.dev/pair={PAIR},ferry.dev/role=source")),
        )
        .await
        .unwrap();
    let mut names: Vec<String> = list
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect();
    names.sort();
    names
}

/// A token for ServiceAccount `name` with the lab driver's SnapshotMetadata audience.
async fn token_for(a: &Client, name: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![ferry_lab::node::snapshot_metadata::AUDIENCE.to_string()],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    Api::<ServiceAccount>::namespaced(a.clone(), NS)
        .create_token_request(name, &Default::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

/// `GetMetadataDelta` of `target` against itself, asked of the lab driver's service with
/// `token`: the ranges, or the service's refusal.
async fn delta(a: &Client, token: String, target: &str) -> Result<Vec<(i64, i64)>, tonic::Status> {
    use base64::Engine;
    use ferry_lab::node::snapshot_metadata::SnapshotMetadataService;
    use ferry_schemas::proto::snapshotmetadata::{
        snapshot_metadata_client::SnapshotMetadataClient, GetMetadataDeltaRequest,
    };
    let service = Api::<SnapshotMetadataService>::all(a.clone())
        .get(ferry_lab::node::CSI_DRIVER)
        .await
        .unwrap();
    let ca = base64::engine::general_purpose::STANDARD
        .decode(&service.spec.ca_cert)
        .unwrap();
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://{}", service.spec.address))
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            )
            .unwrap()
            .connect()
            .await
            .unwrap();
    let handle = {
        let vs = snapshots(a).get(target).await.unwrap();
        let content = vs.data["status"]["boundVolumeSnapshotContentName"]
            .as_str()
            .unwrap()
            .to_string();
        let contents: Api<DynamicObject> = Api::all_with(
            a.clone(),
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent"),
                "volumesnapshotcontents",
            ),
        );
        contents.get(&content).await.unwrap().data["status"]["snapshotHandle"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut stream = SnapshotMetadataClient::new(channel)
        .get_metadata_delta(GetMetadataDeltaRequest {
            security_token: token,
            namespace: NS.to_string(),
            base_snapshot_id: handle,
            target_snapshot_name: target.to_string(),
            starting_offset: 0,
            max_results: 0,
        })
        .await?
        .into_inner();
    let mut ranges = Vec::new();
    while let Some(m) = stream.message().await? {
        ranges.extend(
            m.block_metadata
                .iter()
                .map(|b| (b.byte_offset, b.size_bytes)),
        );
    }
    Ok(ranges)
}

on_both_planes!(
    block_volumes_read_only_what_the_csi_driver_says_changed,
    block_volumes_read_only_what_the_csi_driver_says_changed_on_kubernetes,
    changed_blocks_on,
    needs lab_no_xfs,
    "copy-on-write node storage needs root and mkfs.xfs (apt-get install xfsprogs)"
);

async fn changed_blocks_on(mut settings: e2e::LabSettings) {
    // Snapshots that share extents, or the driver has nothing to compare.
    settings.node_storage = ferry_lab::node::backing::NodeStorage::Reflink;
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
    create(&a, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "disk", "labels": labels}, "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "resources": {"requests": {"storage": "64Mi"}}}})).await;
    create(&a, json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": PAIR, "labels": labels}, "spec": {
        "replicas": 1, "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": labels}, "spec": {
            "containers": [{"name": "idle", "image": "busybox", "command": ["sleep", "3600"],
                "volumeDevices": [{"name": "disk", "devicePath": "/dev/disk0"}]}],
            "volumes": [{"name": "disk", "persistentVolumeClaim": {"claimName": "disk"}}]}}}})).await;
    let disk = volume_of(&a, "disk", 64 * MIB).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3314);
    let mut write_at = |path: &PathBuf, offset: u64, len: usize| {
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    };
    // 20 MiB of data in a sparse 64 MiB image.
    write_at(&disk, 0, 16 << 20);
    write_at(&disk, 40 * MIB, 4 << 20);

    create(&a, json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair", "metadata": {"name": PAIR}, "spec": {
        "selector": {"matchLabels": labels}, "primarySite": "a", "secondarySite": "b", "rpo": "1h"}})).await;
    let (first, _) = sync(&a, "first").await;
    restores_exactly(&b, first, "64Mi", &checksum(&disk)).await;

    // Three scattered 4 KiB writes: only what the driver reports changed is read.
    for offset in [MIB + 100, 10 * MIB, 41 * MIB] {
        write_at(&disk, offset, 4096);
    }
    let (tracked_gen, pair) = sync(&a, "scattered").await;
    let (read, total) = tracked(&pair);
    assert_eq!(total, 64 * MIB);
    assert!(
        read > 0 && read <= 2 * MIB,
        "{read} bytes read for three 4 KiB writes"
    );
    restores_exactly(&b, tracked_gen, "64Mi", &checksum(&disk)).await;
    assert_eq!(
        bases(&a).await,
        [format!("ferry-{PAIR}-disk-g{tracked_gen}-src")],
        "one base kept: the newest committed generation's"
    );

    // The service checks who asks, as upstream's sidecar: a token it cannot review is
    // refused; a ServiceAccount that may not get VolumeSnapshots is refused where RBAC exists.
    let ask = |token: String| {
        let a = a.clone();
        async move { delta(&a, token, &format!("ferry-{PAIR}-disk-g{tracked_gen}-src")).await }
    };
    let refused = ask("not-a-token".into()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    create(
        &a,
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}}),
    )
    .await;
    let nobody = token_for(&a, "nobody").await;
    match (settings.control_plane, ask(nobody).await) {
        (ControlPlane::Kubernetes, Err(status)) => {
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}")
        }
        // The lab's API server has no RBAC: it allows every SubjectAccessReview.
        (ControlPlane::Lab, Ok(ranges)) => assert!(ranges.is_empty(), "{ranges:?}"),
        (plane, other) => panic!("{plane:?}: {other:?}"),
    }

    // The base snapshot gone: a full scan, saying why, and the same bytes.
    snapshots(&a)
        .delete(
            &format!("ferry-{PAIR}-disk-g{tracked_gen}-src"),
            &Default::default(),
        )
        .await
        .unwrap();
    eventually("the base snapshot deleted", || async {
        bases(&a)
            .await
            .is_empty()
            .then_some(())
            .ok_or("still there".to_string())
    })
    .await;
    write_at(&disk, 12 * MIB, 4096);
    let (whole, pair) = sync(&a, "no-base").await;
    full_scan(&pair, "is gone");
    restores_exactly(&b, whole, "64Mi", &checksum(&disk)).await;
    let events: Api<Event> = Api::namespaced(a.clone(), NS);
    eventually("a FullScan Event", || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("FullScan")
                    && e.note.as_deref().is_some_and(|n| n.contains("is gone"))
            })
            .then_some(())
            .ok_or("none yet".to_string())
    })
    .await;

    // Grown: the answer no longer fits the base index, so a full scan, saying so.
    Api::<PersistentVolumeClaim>::namespaced(a.clone(), NS)
        .patch(
            "disk",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "96Mi"}}}})),
        )
        .await
        .unwrap();
    let disk = volume_of(&a, "disk", 96 * MIB).await;
    write_at(&disk, 80 * MIB, 4096);
    let (grown, pair) = sync(&a, "grown").await;
    full_scan(&pair, "resized");
    restores_exactly(&b, grown, "96Mi", &checksum(&disk)).await;

    // And tracked again from the grown base.
    write_at(&disk, 2 * MIB, 4096);
    let (again, pair) = sync(&a, "again").await;
    let (read, total) = tracked(&pair);
    assert_eq!(total, 96 * MIB);
    assert!(read <= 2 * MIB, "{read} bytes read for one 4 KiB write");
    restores_exactly(&b, again, "96Mi", &checksum(&disk)).await;
}
