//! Shared by the lab's end-to-end tests: the `ferry-lab` binary, a lab stopped on drop,
//! bounded polling, and a ledger app protected by a DRPair.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_lab::site::client_from;
use ferry_schemas::DRPair;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
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

pub async fn setup(lab: &Path) -> (Client, Client) {
    ferry_lab(&["up", "--sites", "a,b"], lab);
    let a = client_from(&lab.join("a/kubeconfig")).await.unwrap();
    let b = client_from(&lab.join("b/kubeconfig")).await.unwrap();
    let apply = |client: &Client, object: serde_json::Value| {
        let client = client.clone();
        async move {
            let kind = object["kind"].as_str().unwrap().to_string();
            let name = object["metadata"]["name"].as_str().unwrap().to_string();
            let params = PatchParams::apply("test");
            match kind.as_str() {
                "Namespace" => Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
                    .patch(&name, &params, &Patch::Apply(&object))
                    .await
                    .map(|_| ()),
                "PersistentVolumeClaim" => {
                    Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(client, NS)
                        .patch(&name, &params, &Patch::Apply(&object))
                        .await
                        .map(|_| ())
                }
                "Deployment" => Api::<Deployment>::namespaced(client, NS)
                    .patch(&name, &params, &Patch::Apply(&object))
                    .await
                    .map(|_| ()),
                _ => Api::<DRPair>::namespaced(client, NS)
                    .patch(&name, &params, &Patch::Apply(&object))
                    .await
                    .map(|_| ()),
            }
            .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
        }
    };
    apply(
        &a,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await;
    apply(&a, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ledger-data", "namespace": NS}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "32Mi"}}}})).await;
    apply(&a, json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ledger", "namespace": NS, "labels": {"app": "ledger"}}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": "ledger"}},
        "template": {"metadata": {"labels": {"app": "ledger"}}, "spec": {"containers": [{"name": "w", "image": "ferry-lab/sqlite-writer",
            "env": [{"name": "DATA_DIR", "value": "/data"}, {"name": "WRITE_INTERVAL_MS", "value": "20"}],
            "volumeMounts": [{"name": "d", "mountPath": "/data"}]}], "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "ledger-data"}}]}}}})).await;
    apply(&a, json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair", "metadata": {"name": "ledger", "namespace": NS}, "spec": {
        "selector": {"matchLabels": {"app": "ledger"}}, "primarySite": "a", "secondarySite": "b", "rpo": "30s"}})).await;
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);
    eventually("the pair Ready", || async {
        let p = pairs.get("ledger").await.map_err(|e| e.to_string())?;
        p.status
            .and_then(|s| s.generation)
            .map(|_| ())
            .ok_or_else(|| "no generation".to_string())
    })
    .await;
    (a, b)
}
