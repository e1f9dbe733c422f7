//! A site killed with SIGKILL and started again keeps every object, and its kubelet brings
//! the pods back; driven through the `ferry-lab` CLI as a user would.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_lab::node::timeline::{self, TimelineEvent};
use ferry_lab::site::client_from;
use ferry_lab::testing::{eventually, Lab};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// Runs `ferry-lab` with `args`; panics with its output unless it succeeds.
fn ferry_lab(args: &[&str], dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("ferry-lab runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ferry-lab {args:?} failed: {text}");
    text
}

async fn writer_pid(pods: &Api<Pod>) -> Result<u32, String> {
    let list = pods
        .list(&ListParams::default().labels("app=ledger"))
        .await
        .map_err(|e| e.to_string())?;
    let pod = list.items.first().ok_or("no pod")?;
    let cs = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .ok_or("no status")?;
    let pid = cs
        .container_id
        .as_deref()
        .and_then(|id| id.strip_prefix("lab://"))
        .and_then(|p| p.parse::<u32>().ok());
    match (cs.state.as_ref().and_then(|s| s.running.as_ref()), pid) {
        (Some(_), Some(pid)) if ferry_lab::sites::alive(pid as i32) => Ok(pid),
        _ => Err(format!("{:?}", cs.state)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_site_restarts_with_its_objects_and_pods() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let _lab = Lab(dir.clone());
    let up = ferry_lab(&["up", "--sites", "a", "--bare"], &dir);
    assert!(up.contains("site a: ready"), "{up}");
    let client = client_from(&dir.join("a/kubeconfig")).await.unwrap();

    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "app"}})).unwrap(),
        )
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "app");
    let cm = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "settings"}, "data": {"k": "v"}}))
                .unwrap(),
        )
        .await
        .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "app")
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "16Mi"}}}})).unwrap())
        .await
        .unwrap();
    Api::<Deployment>::namespaced(client.clone(), "app")
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": {"name": "ledger"},
            "spec": {"selector": {"matchLabels": {"app": "ledger"}}, "template": {"metadata": {"labels": {"app": "ledger"}}, "spec": {
                "containers": [{"name": "w", "image": "ferry-lab/sqlite-writer", "env": [{"name": "DATA_DIR", "value": "/data"}], "volumeMounts": [{"name": "d", "mountPath": "/data"}]}],
                "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]}}}
        })).unwrap())
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    let pid = eventually("the writer running", T, || writer_pid(&pods)).await;

    let killed = ferry_lab(&["site", "kill", "a"], &dir);
    assert!(killed.contains("killed"), "{killed}");
    assert!(
        !ferry_lab::sites::alive(pid as i32),
        "the site's pods die with it"
    );
    assert!(ferry_lab(&["status"], &dir).contains("site a: stopped"));

    ferry_lab(&["site", "start", "a"], &dir);
    let client = client_from(&dir.join("a/kubeconfig")).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "app");
    let after = cms.get("settings").await.expect("objects survive SIGKILL");
    assert_eq!(
        (after.uid(), after.resource_version()),
        (cm.uid(), cm.resource_version()),
        "same object, same resourceVersion"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    let new_pid = eventually("the writer running again", T, || writer_pid(&pods)).await;
    assert_ne!(pid, new_pid);

    let events: Vec<TimelineEvent> = timeline::read(&dir.join("a/timeline.jsonl"))
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(
        events,
        [
            TimelineEvent::Start,
            TimelineEvent::SiteKilled,
            TimelineEvent::Start
        ],
        "timeline: {events:?}"
    );
}
