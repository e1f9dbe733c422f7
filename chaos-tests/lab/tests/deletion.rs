//! Deleting a DRPair (`spec.deletionPolicy`), with the ledger app replicating from `a` to `b`:
//! - `Retain` (the default): `b` keeps every generation and marks its DRPair `Detached`, with
//!   an Event; `a`'s DRPair goes, and the app at `a` keeps running. When `a` is lost later, a
//!   Failover Migration at `b` starts the app from the retained copy, its ledger intact.
//! - `Delete` with `b` partitioned: the deletion waits, `Ready=False PeerReleasePending`
//!   naming site `b`; once healed, nothing Ferry made for the pair is left at either site
//!   (listed kind by kind).
//! - Deleting the app's namespace retains the copy whatever the policy.
//! - `ferry.dev/release-without-peer: "true"` lets a deletion finish while `b` is cut off, and
//!   `b`'s copy is left as it was.
//! - A gated app (witness lease, `ferry-gate` and the fence sidecar) keeps running once its
//!   pair and Lease are gone: the sidecar finds no DRPair and stops fencing.

mod e2e;

use std::collections::BTreeMap;

use e2e::{condition, eventually, generation_tip, lab_control, live_tip, setup_on, Lab, NS};
use ferry_schemas::contract::{PAIR_LABEL, RELEASE_WITHOUT_PEER_ANNOTATION};
use ferry_schemas::drpair::PairPhase;
use ferry_schemas::{DRPair, Migration};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::Client;
use serde_json::json;

const PAIR: &str = "ledger";

/// Everything Ferry makes for the pair at a site, as `Kind name`: the DRPair, replica PVCs,
/// VolumeSnapshots, manifests Secrets, mover pods (all labelled with the pair) and the
/// witness Lease's mirror.
async fn ferry_objects(client: &Client) -> Vec<String> {
    let selector = format!("{PAIR_LABEL}={PAIR}");
    let mut found = Vec::new();
    if exists::<DRPair>(client, PAIR).await {
        found.push(format!("DRPair {PAIR}"));
    }
    for (name, _) in ferry_runtime::volumes::list_snapshots(client, NS, &selector)
        .await
        .unwrap()
    {
        found.push(format!("VolumeSnapshot {name}"));
    }
    found.extend(labelled::<PersistentVolumeClaim>(client, &selector).await);
    found.extend(labelled::<Secret>(client, &selector).await);
    found.extend(labelled::<Pod>(client, &selector).await);
    let lease = format!("ferry-lease-{PAIR}");
    if exists::<Lease>(client, &lease).await {
        found.push(format!("Lease {lease}"));
    }
    found
}

async fn exists<K>(client: &Client, name: &str) -> bool
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), NS)
        .get_opt(name)
        .await
        .unwrap()
        .is_some()
}

/// `Kind name` of each object of kind `K` in the namespace matching `selector`.
async fn labelled<K>(client: &Client, selector: &str) -> Vec<String>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
        .iter()
        .map(|o| {
            format!(
                "{} {}",
                K::kind(&()),
                o.meta().name.clone().unwrap_or_default()
            )
        })
        .collect()
}

fn count(objects: &[String], kind: &str) -> usize {
    objects
        .iter()
        .filter(|o| o.starts_with(&format!("{kind} ")))
        .count()
}

async fn set_policy(a: &Client, policy: &str) {
    Api::<DRPair>::namespaced(a.clone(), NS)
        .patch(
            PAIR,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"deletionPolicy": policy}})),
        )
        .await
        .unwrap();
}

async fn delete_pair(client: &Client) {
    Api::<DRPair>::namespaced(client.clone(), NS)
        .delete(PAIR, &DeleteParams::default())
        .await
        .unwrap();
}

async fn gone_at(client: &Client, site: &str) {
    let pairs: Api<DRPair> = Api::namespaced(client.clone(), NS);
    eventually(&format!("the DRPair gone at {site}"), || async {
        match pairs.get_opt(PAIR).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(p) => Err(format!(
                "still there: finalizers {:?}, Ready {:?}",
                p.metadata.finalizers,
                condition(&p, "Ready")
            )),
        }
    })
    .await
}

/// Waits until `a`'s DRPair, being deleted, says it waits for its peer; returns the Ready
/// message.
async fn release_pending_at(a: &Client) -> String {
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);
    eventually("Ready=False PeerReleasePending at a", || async {
        let p = pairs.get(PAIR).await.map_err(|e| e.to_string())?;
        match condition(&p, "Ready") {
            Some(c) if c.status == "False" && c.reason == "PeerReleasePending" => Ok(c.message),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// Waits for `b`'s DRPair to say it is detached; returns the Ready message.
async fn detached_at(b: &Client) -> String {
    let pairs: Api<DRPair> = Api::namespaced(b.clone(), NS);
    eventually("the DRPair Detached at b", || async {
        let p = pairs.get(PAIR).await.map_err(|e| e.to_string())?;
        let ready = condition(&p, "Ready");
        let phase = p.status.as_ref().and_then(|s| s.phase);
        match (&phase, &ready) {
            (Some(PairPhase::Detached), Some(c)) if c.reason == "Detached" => Ok(c.message.clone()),
            _ => Err(format!("phase {phase:?}, Ready {ready:?}")),
        }
    })
    .await
}

async fn event_reasons(client: &Client) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect()
}

on_both_planes!(
    deleting_with_retain_keeps_the_copy_and_detaches_it,
    deleting_with_retain_keeps_the_copy_and_detaches_it_on_kubernetes,
    retain_on
);

async fn retain_on(settings: e2e::LabSettings) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = setup_on(&lab.0, &settings).await;
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);
    eventually("the peer-release finalizer at a", || async {
        let p = pairs.get(PAIR).await.map_err(|e| e.to_string())?;
        let f = p.metadata.finalizers.unwrap_or_default();
        f.iter()
            .any(|f| f == "ferry.dev/peer-release")
            .then_some(())
            .ok_or(format!("finalizers {f:?}"))
    })
    .await;
    delete_pair(&a).await;
    gone_at(&a, "a").await;
    // No sync can start any more: what b holds now is what it keeps.
    let before = ferry_objects(&b).await;
    println!("at b: {before:?}");

    let message = detached_at(&b).await;
    println!("b: Ready=False Detached: {message}");
    assert!(
        message.contains("DRPair deleted at site a") && message.contains("generations ["),
        "{message}"
    );
    let after = ferry_objects(&b).await;
    for kind in [
        "VolumeSnapshot",
        "Secret",
        "PersistentVolumeClaim",
        "DRPair",
    ] {
        assert!(count(&after, kind) >= 1, "b keeps its {kind}s: {after:?}");
        assert_eq!(
            count(&after, kind),
            count(&before, kind),
            "b's {kind}s unchanged: {before:?} -> {after:?}"
        );
    }
    assert!(event_reasons(&b).await.iter().any(|r| r == "Detached"));
    // The app at a is the user's and keeps running; the pair's Lease mirror goes with it.
    let deployments: Api<Deployment> = Api::namespaced(a.clone(), NS);
    assert!(deployments.get_opt(PAIR).await.unwrap().is_some());
    eventually("nothing of the pair left at a", || async {
        let left = ferry_objects(&a).await;
        left.is_empty().then_some(()).ok_or(format!("{left:?}"))
    })
    .await;

    // What the retained copy is for: site a is lost later, and the app starts at b from it.
    lab_control("site", "kill", "a", &lab.0);
    let migrations: Api<Migration> = Api::namespaced(b.clone(), NS);
    let failover: Migration = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Migration",
        "metadata": {"name": "from-the-retained-copy", "namespace": NS},
        "spec": {"pair": PAIR, "targetSite": "b", "type": "Failover"}}))
    .unwrap();
    migrations
        .create(&Default::default(), &failover)
        .await
        .unwrap();
    let done = e2e::completed_migration(&b, "from-the-retained-copy").await;
    let (promoted, intact) = generation_tip(&b, done.generation.unwrap().0).await;
    assert!(intact, "the retained generation's ledger verifies");
    e2e::writer_commits_past(&b, "b", promoted.n).await;
}

on_both_planes!(
    deleting_with_delete_waits_for_a_partitioned_peer_then_leaves_nothing,
    deleting_with_delete_waits_for_a_partitioned_peer_then_leaves_nothing_on_kubernetes,
    delete_on
);

async fn delete_on(settings: e2e::LabSettings) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = setup_on(&lab.0, &settings).await;
    set_policy(&a, "Delete").await;
    let before = ferry_objects(&b).await;
    assert!(count(&before, "VolumeSnapshot") >= 1, "{before:?}");

    lab_control("site", "partition", "b", &lab.0);
    delete_pair(&a).await;
    let message = release_pending_at(&a).await;
    println!("a while b is cut off: {message}");
    assert!(
        message.contains("site b") && message.contains(RELEASE_WITHOUT_PEER_ANNOTATION),
        "{message}"
    );
    assert!(event_reasons(&a)
        .await
        .iter()
        .any(|r| r == "PeerReleasePending"));
    // Nothing was removed at b meanwhile.
    assert!(count(&ferry_objects(&b).await, "VolumeSnapshot") >= 1);

    lab_control("site", "heal", "b", &lab.0);
    gone_at(&a, "a").await;
    for (site, client) in [("b", &b), ("a", &a)] {
        eventually(&format!("nothing of the pair left at {site}"), || async {
            let left = ferry_objects(client).await;
            left.is_empty().then_some(()).ok_or(format!("{left:?}"))
        })
        .await;
    }
    // The app at a is untouched.
    let deployments: Api<Deployment> = Api::namespaced(a.clone(), NS);
    assert!(deployments.get_opt(PAIR).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_apps_namespace_retains_the_copy_whatever_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = setup_on(&lab.0, &e2e::LabSettings::default()).await;
    set_policy(&a, "Delete").await;
    Api::<Namespace>::all(a.clone())
        .delete(NS, &DeleteParams::default())
        .await
        .unwrap();
    let message = detached_at(&b).await;
    assert!(message.contains("namespace shop deleted"), "{message}");
    let kept = ferry_objects(&b).await;
    assert!(count(&kept, "VolumeSnapshot") >= 1, "{kept:?}");
    assert!(count(&kept, "Secret") >= 1, "{kept:?}");
    let namespaces: Api<Namespace> = Api::all(a.clone());
    eventually("namespace shop gone at a", || async {
        match namespaces.get_opt(NS).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(ns) => Err(format!("{:?}", ns.status)),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_without_peer_annotation_finishes_a_deletion_and_leaves_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = setup_on(&lab.0, &e2e::LabSettings::default()).await;
    set_policy(&a, "Delete").await;
    lab_control("site", "partition", "b", &lab.0);
    delete_pair(&a).await;
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);
    release_pending_at(&a).await;
    // b is cut off and a no longer syncs: this is the copy b keeps.
    let before = ferry_objects(&b).await;
    let annotation = BTreeMap::from([(RELEASE_WITHOUT_PEER_ANNOTATION, "true")]);
    pairs
        .patch(
            PAIR,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": annotation}})),
        )
        .await
        .unwrap();
    gone_at(&a, "a").await;
    assert!(event_reasons(&a)
        .await
        .iter()
        .any(|r| r == "ReleasedWithoutPeer"));
    // b was never told: its copy is as it was, and not detached.
    let after = ferry_objects(&b).await;
    for kind in [
        "VolumeSnapshot",
        "Secret",
        "PersistentVolumeClaim",
        "DRPair",
    ] {
        assert_eq!(
            count(&after, kind),
            count(&before, kind),
            "{kind}: {after:?}"
        );
    }
    let p = Api::<DRPair>::namespaced(b.clone(), NS)
        .get(PAIR)
        .await
        .unwrap();
    assert_ne!(p.status.and_then(|s| s.phase), Some(PairPhase::Detached));
}

/// The fence sidecar's log of the ledger pod `uid` at site `site` (the lab's kubelet keeps
/// each container's output in `pods/<namespace>_<pod>_<uid>/<container>.log`).
fn fence_log(lab: &std::path::Path, site: &str, uid: &str) -> Option<String> {
    let mut dirs = vec![lab.join(site)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with(&format!("{NS}_")) && name.ends_with(uid) {
                return std::fs::read_to_string(path.join("ferry-fence.log")).ok();
            }
            if path.is_dir() && !path.is_symlink() {
                dirs.push(path);
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_app_keeps_running_once_its_pair_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, _b) = e2e::setup_with(&lab.0, &e2e::Protection::AUTOMATIC).await;
    let pods: Api<Pod> = Api::namespaced(a.clone(), NS);
    let app = ListParams::default().labels("app=ledger");
    let pod = pods.list(&app).await.unwrap().items.remove(0);
    let uid = pod.metadata.uid.clone().unwrap();
    delete_pair(&a).await;
    gone_at(&a, "a").await;
    let said = eventually("the fence sidecar standing down", || async {
        let log = fence_log(&lab.0, "a", &uid).unwrap_or_default();
        log.contains("the DRPair does not exist")
            .then_some(log.clone())
            .ok_or(format!("fence log: {log}"))
    })
    .await;
    println!("{said}");
    assert!(!said.contains("deleted pod"), "{said}");
    assert!(count(&ferry_objects(&a).await, "Lease") == 0);
    // The same pod still runs, and the writer keeps committing at a.
    let still = pods.get(&pod.metadata.name.clone().unwrap()).await.unwrap();
    assert_eq!(still.metadata.uid.as_deref(), Some(uid.as_str()));
    assert!(still.metadata.deletion_timestamp.is_none());
    let tip = live_tip(&a).await;
    e2e::writer_commits_past(&a, "a", tip.n).await;
}
