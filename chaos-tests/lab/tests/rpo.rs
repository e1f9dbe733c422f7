//! RPO held: with the SQLite writer committing continuously and `rpo: 30s`, the pair's
//! `currentLagSeconds` stays under 30 for 3 minutes, checked every second, and no sync of that
//! period is older than the RPO. Prints the largest lag seen.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_lab::site::client_from;
use ferry_lab::testing::Lab;
use ferry_schemas::DRPair;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::Client;
use serde_json::{json, Value};

const NS: &str = "shop";
/// How long the RPO is watched (the acceptance: 3 minutes).
const WATCH: Duration = Duration::from_secs(180);

fn ferry_lab(args: &[&str], dir: &Path) {
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

async fn apply(client: &Client, object: Value) {
    let api_version = object["apiVersion"].as_str().unwrap().to_string();
    let kind = object["kind"].as_str().unwrap().to_string();
    let name = object["metadata"]["name"].as_str().unwrap().to_string();
    let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
    let (resource, caps) =
        kube::discovery::pinned_kind(client, &GroupVersionKind::gvk(group, version, &kind))
            .await
            .unwrap();
    let api: Api<DynamicObject> = match caps.scope {
        kube::discovery::Scope::Namespaced => Api::namespaced_with(client.clone(), NS, &resource),
        kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    api.patch(&name, &PatchParams::apply("test"), &Patch::Apply(&object))
        .await
        .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_stays_under_the_rpo_for_three_minutes() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    ferry_lab(&["up", "--sites", "a,b"], &lab.0);
    let a = client_from(&lab.0.join("a/kubeconfig")).await.unwrap();
    apply(
        &a,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await;
    apply(&a, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ledger-data", "namespace": NS}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}}})).await;
    apply(&a, json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ledger", "namespace": NS, "labels": {"app": "ledger"}}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": "ledger"}},
        "template": {"metadata": {"labels": {"app": "ledger"}}, "spec": {"containers": [{"name": "w", "image": "ferry-lab/sqlite-writer",
            "env": [{"name": "DATA_DIR", "value": "/data"}, {"name": "WRITE_INTERVAL_MS", "value": "10"}],
            "volumeMounts": [{"name": "d", "mountPath": "/data"}]}], "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "ledger-data"}}]}}}})).await;
    apply(&a, json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair", "metadata": {"name": "ledger", "namespace": NS}, "spec": {
        "selector": {"matchLabels": {"app": "ledger"}}, "primarySite": "a", "secondarySite": "b", "rpo": "30s"}})).await;
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);
    let ready_by = Instant::now() + Duration::from_secs(120);
    loop {
        let s = pairs
            .get("ledger")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        if s.generation.is_some() {
            break;
        }
        assert!(
            Instant::now() < ready_by,
            "no first generation: {:?}",
            s.conditions
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let start = Instant::now();
    let mut max_lag = 0.0f64;
    let mut samples = 0u32;
    let mut generations = std::collections::BTreeSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while start.elapsed() < WATCH {
        tick.tick().await;
        let s = pairs
            .get("ledger")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        let lag = s
            .current_lag_seconds
            .expect("currentLagSeconds is reported");
        max_lag = max_lag.max(lag);
        samples += 1;
        generations.insert(s.generation.map(|g| g.0));
        assert!(
            lag < 30.0,
            "lag {lag}s at {:?} exceeds the 30s RPO",
            start.elapsed()
        );
        assert_ne!(
            s.rpo_met,
            Some(false),
            "rpoMet false at {:?}",
            start.elapsed()
        );
    }
    println!(
        "max currentLagSeconds {max_lag:.1}s over {samples} samples; generations seen {}",
        generations.len()
    );
    assert!(samples >= 170, "checked every second");
    assert!(generations.len() >= 6, "syncs kept coming: {generations:?}");
}
