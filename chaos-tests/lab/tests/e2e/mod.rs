//! Shared by the lab's end-to-end tests: the `ferry-lab` binary, a lab stopped on drop,
//! bounded polling, and a ledger app protected by a DRPair.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_lab::node::storage::bound_volume;
use ferry_lab::node::timeline::{running_intervals, TimelineEntry, TimelineEvent};
use ferry_lab::site::client_from;
use ferry_schemas::DRPair;
use ferry_sqlite_writer::ledger::{self, Tip};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::Client;
use serde_json::json;

pub const T: Duration = Duration::from_secs(120);
pub const NS: &str = "shop";

pub fn ferry_lab(args: &[&str], dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("ferry-lab runs");
    assert!(
        out.status.success(),
        "ferry-lab {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Lab(pub PathBuf);

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
            .arg("down")
            .arg("--dir")
            .arg(&self.0)
            .output();
    }
}

pub async fn eventually<V, F, Fut>(what: &str, mut f: F) -> V
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<V, String>>,
{
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let last = match f().await {
            Ok(v) => return v,
            Err(s) => s,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last state: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How a test's ledger app is protected.
#[derive(Clone, Copy, Debug)]
pub struct Protection {
    /// `ferry-lab up --lease`.
    pub lease: &'static str,
    /// `spec.failover.mode: Automatic` with `siteLossTimeout: 10s`, else Manual (default).
    pub automatic: bool,
    /// The app's pods carry the `ferry-gate` init container.
    pub gated: bool,
}

impl Protection {
    /// What planned-migration tests use: the defaults.
    pub const PLANNED: Protection = Protection {
        lease: "10s",
        automatic: false,
        gated: false,
    };
    /// What failover tests use: an 8 s lease (it must outlast a witness leader election, about
    /// 2 s here), automatic failover after 10 s, gated pods.
    pub const AUTOMATIC: Protection = Protection {
        lease: "8s",
        automatic: true,
        gated: true,
    };
    /// The pair's `spec.failover.siteLossTimeout` under [`Protection::AUTOMATIC`], seconds.
    pub const SITE_LOSS_TIMEOUT_SECONDS: u64 = 10;
}

pub async fn setup(lab: &Path) -> (Client, Client) {
    setup_with(lab, &Protection::PLANNED).await
}

/// Two sites and three witnesses, the ledger writer (a Deployment with a PVC) at `a`, and a
/// DRPair over it with `rpo: 30s`; returns once its first generation is complete at `b`.
pub async fn setup_with(lab: &Path, protection: &Protection) -> (Client, Client) {
    ferry_lab(&["up", "--sites", "a,b", "--lease", protection.lease], lab);
    let a = client_from(&lab.join("a/kubeconfig")).await.unwrap();
    let b = client_from(&lab.join("b/kubeconfig")).await.unwrap();
    let mut pod = json!({"containers": [{"name": "w", "image": "ferry-lab/sqlite-writer",
        "env": [{"name": "DATA_DIR", "value": "/data"}, {"name": "WRITE_INTERVAL_MS", "value": "20"}],
        "volumeMounts": [{"name": "d", "mountPath": "/data"}]}],
        "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "ledger-data"}}]});
    if protection.gated {
        pod["initContainers"] = json!([{"name": "ferry-gate", "image": "ghcr.io/ferry-dr/ferry-gate:0.1.0",
            "args": ["--pair", "ledger"],
            "env": [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]}]);
    }
    let mut spec = json!({"selector": {"matchLabels": {"app": "ledger"}}, "primarySite": "a", "secondarySite": "b", "rpo": "30s"});
    if protection.automatic {
        spec["failover"] = json!({"mode": "Automatic", "siteLossTimeout": format!("{}s", Protection::SITE_LOSS_TIMEOUT_SECONDS)});
    }
    for object in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ledger-data", "namespace": NS}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "32Mi"}}}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ledger", "namespace": NS, "labels": {"app": "ledger"}}, "spec": {
            "replicas": 1, "selector": {"matchLabels": {"app": "ledger"}},
            "template": {"metadata": {"labels": {"app": "ledger"}}, "spec": pod}}}),
        json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair", "metadata": {"name": "ledger", "namespace": NS}, "spec": spec}),
    ] {
        ferry_replicator::manifests::apply_object(&a, &object, "test")
            .await
            .unwrap_or_else(|e| panic!("applying {}: {e}", object["kind"]));
    }
    // The app writes at a (gated pods start once a holds the lease), then one generation
    // holding some of its transactions is committed at b.
    eventually("the ledger writing at a", || async {
        match bound_volume(&a, NS, "ledger-data").await {
            Ok(Some(v)) => ledger::open_existing(&v.path)
                .ok()
                .and_then(|c| ledger::tip(&c).ok().flatten())
                .map(|_| ())
                .ok_or_else(|| "no transaction yet".to_string()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    sync_now(&a, "setup").await;
    (a, b)
}

/// Asks a's replicator for a sync now (annotation `ferry.dev/sync-request: token`) and waits
/// until the generation it started is committed at the peer.
pub async fn sync_now(a: &Client, token: &str) {
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);
    let patch = json!({"metadata": {"annotations": {ferry_replicator::cluster::pairs::SYNC_REQUEST_ANNOTATION: token}}});
    pairs
        .patch("ledger", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually("the requested generation committed", || async {
        let p = pairs.get("ledger").await.map_err(|e| e.to_string())?;
        let s = p.status.unwrap_or_default();
        match (s.last_sync_request.as_deref(), s.generation) {
            (Some(t), Some(_)) if t == token => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// `ferry-lab site|witness ACTION NAME --dir LAB`; returns what it printed.
pub fn lab_control(kind: &str, action: &str, name: &str, lab: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
        .args([kind, action, name, "--dir"])
        .arg(lab)
        .output()
        .expect("ferry-lab runs");
    assert!(
        out.status.success(),
        "ferry-lab {kind} {action} {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Both sites' timelines.
pub fn timelines(lab: &Path) -> (Vec<TimelineEntry>, Vec<TimelineEntry>) {
    let read = |site: &str| {
        ferry_lab::node::timeline::read(&ferry_lab::sites::SiteLayout::in_lab(lab, site).timeline())
            .unwrap()
    };
    (read("a"), read("b"))
}

/// Panics, with the instant and both timelines' `ledger` intervals, if the app ever ran at
/// both sites at once.
pub fn assert_never_at_both_sites(lab: &Path) {
    let (a, b) = timelines(lab);
    if let Some(at) = ferry_lab::node::timeline::first_overlap(&a, &b, "ledger") {
        panic!(
            "the app ran at both sites at {at} ms: a {:?}, b {:?}",
            running_intervals(&a, "ledger"),
            running_intervals(&b, "ledger")
        );
    }
}

/// When (ms) the `ledger` app last started at a site, per its timeline.
pub fn last_start(entries: &[TimelineEntry]) -> Option<u64> {
    entries
        .iter()
        .filter(|e| e.app.as_deref() == Some("ledger") && e.event == TimelineEvent::Start)
        .map(|e| e.at_ms)
        .max()
}

/// The ledger's tip (last transaction and its chain hash) in the site's live `ledger-data`.
pub async fn live_tip(client: &Client) -> Tip {
    let volume = bound_volume(client, NS, "ledger-data")
        .await
        .unwrap()
        .expect("ledger-data bound");
    let conn = ledger::open_existing(&volume.path).unwrap();
    ledger::tip(&conn).unwrap().expect("rows")
}

/// The ledger as the site's replica holds it in committed generation `generation`: the
/// VolumeSnapshot's copy, opened from a scratch copy so the replica is never touched. Returns
/// the tip and whether the whole chain verifies.
pub async fn generation_tip(client: &Client, generation: u64) -> (Tip, bool) {
    use ferry_replicator::cluster::replicas::generation_snapshot;
    let snapshots = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        NS,
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "snapshot.storage.k8s.io",
            "v1",
            "VolumeSnapshot",
        )),
    );
    let snapshot = snapshots
        .get(&generation_snapshot("ledger", "ledger-data", generation))
        .await
        .unwrap();
    let content_name = snapshot.data["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .unwrap()
        .to_string();
    let contents = Api::<DynamicObject>::all_with(
        client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "snapshot.storage.k8s.io",
            "v1",
            "VolumeSnapshotContent",
        )),
    );
    let content = contents.get(&content_name).await.unwrap();
    let handle = PathBuf::from(content.data["status"]["snapshotHandle"].as_str().unwrap());
    let scratch = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&handle).unwrap().flatten() {
        std::fs::copy(entry.path(), scratch.path().join(entry.file_name())).unwrap();
    }
    let conn = ledger::open_existing(scratch.path()).unwrap();
    let intact = matches!(ledger::verify(&conn).unwrap(), ledger::Verdict::Ok { .. });
    (ledger::tip(&conn).unwrap().expect("rows"), intact)
}
