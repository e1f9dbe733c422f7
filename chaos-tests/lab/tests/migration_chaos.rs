//! A planned migration survives its controller being killed with SIGKILL in each phase: every
//! run ends Completed (or Failed with the app running at exactly one site), and the sites'
//! timelines never show the app at both sites at once. The kill delay inside each phase is
//! drawn from a seeded RNG; the seed is printed (set FERRY_TEST_SEED to replay).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_lab::node::timeline::{first_overlap, read, running_intervals, TimelineEvent};
use ferry_lab::site::client_from;
use ferry_lab::sites::SiteLayout;
use ferry_schemas::{DRPair, Migration};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use rand::{Rng, SeedableRng};
use serde_json::json;

const T: Duration = Duration::from_secs(120);
const NS: &str = "shop";

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

struct Lab(PathBuf);

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
            .arg("down")
            .arg("--dir")
            .arg(&self.0)
            .output();
    }
}

async fn eventually<V, F, Fut>(what: &str, mut f: F) -> V
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

/// The pid of the running ferry-controller process at `site`, from the site's timeline.
fn controller_pid(lab: &Path, site: &str) -> Option<u32> {
    let entries = read(&SiteLayout::in_lab(lab, site).timeline()).ok()?;
    let mut running = None;
    for e in entries {
        if e.namespace == "ferry-system" && e.pod.starts_with("ferry-controller-") {
            match e.event {
                TimelineEvent::Start => running = e.pid,
                TimelineEvent::Stop if e.pid == running => running = None,
                _ => {}
            }
        }
    }
    running
}

async fn setup(lab: &Path) -> (Client, Client) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_controller_in_each_phase_never_runs_the_app_twice() {
    let seed: u64 = std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("FERRY_TEST_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for phase in ["Quiescing", "FinalSync", "Promoting", "Instantiating"] {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab(dir.path().join("lab"));
        let (a, b) = setup(&lab.0).await;
        let migrations: Api<Migration> = Api::namespaced(a.clone(), NS);
        let mut phases = watcher(
            migrations.clone(),
            watcher::Config::default().fields("metadata.name=to-b"),
        )
        .applied_objects()
        .boxed();
        let migration: Migration = serde_json::from_value(json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Migration",
            "metadata": {"name": "to-b", "namespace": NS}, "spec": {"pair": "ledger", "targetSite": "b"}})).unwrap();
        migrations
            .create(&PostParams::default(), &migration)
            .await
            .unwrap();
        // Kill when the phase is first seen, after a random delay within it.
        let delay = Duration::from_millis(rng.random_range(0..150));
        let mut killed_in = None;
        while let Some(Ok(m)) = tokio::time::timeout(T, phases.next())
            .await
            .expect("migration progresses")
        {
            let current = m
                .status
                .and_then(|s| s.phase)
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            if killed_in.is_none()
                && (current == phase || ["Completed", "Failed"].contains(&current.as_str()))
            {
                tokio::time::sleep(delay).await;
                let pid = controller_pid(&lab.0, "a").expect("the controller runs at a");
                Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status()
                    .unwrap();
                killed_in = Some(current.clone());
                println!(
                    "phase {phase}: killed controller pid {pid} {delay:?} after seeing {current}"
                );
            }
            if ["Completed", "Failed"].contains(&current.as_str()) && killed_in.is_some() {
                break;
            }
        }
        let end = eventually("the migration to end", || async {
            let m = migrations.get("to-b").await.map_err(|e| e.to_string())?;
            let s = m.status.unwrap_or_default();
            match s.phase.map(|p| p.as_str().to_string()) {
                Some(p) if p == "Completed" || p == "Failed" => Ok((p, s.conditions)),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        println!("phase {phase}: migration ended {}", end.0);
        // The app runs at exactly one site.
        let ready = |client: Client| async move {
            Api::<Deployment>::namespaced(client, NS)
                .get_opt("ledger")
                .await
                .unwrap()
                .and_then(|d| d.status)
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0)
        };
        let (at_a, at_b) = (ready(a.clone()).await, ready(b.clone()).await);
        if end.0 == "Completed" {
            assert_eq!(
                (at_a, at_b),
                (0, 1),
                "phase {phase}: after Completed the app runs at b only"
            );
        } else {
            assert_eq!(
                at_a + at_b,
                1,
                "phase {phase}: Failed ({:?}) leaves the app at exactly one site",
                end.1
            );
        }
        let ta = read(&SiteLayout::in_lab(&lab.0, "a").timeline()).unwrap();
        let tb = read(&SiteLayout::in_lab(&lab.0, "b").timeline()).unwrap();
        assert!(!running_intervals(&ta, "ledger").is_empty());
        assert_eq!(
            first_overlap(&ta, &tb, "ledger"),
            None,
            "phase {phase}: the app never ran at both sites at once"
        );
    }
}
