//! The process kubelet: the SQLite writer runs from a Deployment with a PVC, survives SIGKILL
//! with a restart, passes `verify`, stops when scaled to zero, and the timeline records it.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ferry_lab::node::catalog::Catalog;
use ferry_lab::node::timeline::{self, TimelineEvent};
use ferry_lab::site::{client_from, SiteRuntime};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn ferry_lab_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry-lab"))
}

/// Polls `f` every 50 ms until it returns `Ok`, or panics after `T` with the last state.
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sqlite_writer(args: &[&str], data: &std::path::Path) -> (bool, String) {
    let out = Command::new(ferry_lab_bin())
        .args(["image", "sqlite-writer"])
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn alive(pid: u32) -> bool {
    ferry_lab::sites::alive(pid as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_writer_runs_restarts_verifies_and_scales_to_zero() {
    let dir = tempfile::tempdir().unwrap();
    let site = SiteRuntime::start_with_catalog(
        "k",
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        Catalog::with_exe(ferry_lab_bin()),
    )
    .await
    .unwrap();
    let client = client_from(&dir.path().join("kubeconfig")).await.unwrap();
    let ns = "ledger";
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    pvcs.create(&PostParams::default(), &serde_json::from_value(json!({
        "metadata": {"name": "data", "labels": {"app": "ledger"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}}
    })).unwrap()).await.unwrap();
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deploys.create(&PostParams::default(), &serde_json::from_value(json!({
        "metadata": {"name": "ledger", "labels": {"app": "ledger"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "ledger"}},
            "template": {
                "metadata": {"labels": {"app": "ledger"}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{"name": "writer", "image": "ferry-lab/sqlite-writer:latest",
                        "env": [{"name": "DATA_DIR", "value": "/data"}, {"name": "WRITE_INTERVAL_MS", "value": "10"},
                                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
                }
            }
        }
    })).unwrap()).await.unwrap();

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let running_pid = |min_restarts: i32| {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("app=ledger"))
                .await
                .map_err(|e| e.to_string())?;
            let pod = list.items.first().ok_or("no pod yet")?;
            let cs = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .ok_or("no container status")?;
            let pid = cs
                .container_id
                .as_deref()
                .and_then(|id| id.strip_prefix("lab://"))
                .and_then(|p| p.parse::<u32>().ok());
            match (cs.state.as_ref().and_then(|s| s.running.as_ref()), pid) {
                (Some(_), Some(pid)) if cs.restart_count >= min_restarts && alive(pid) => {
                    Ok((pod.name_any(), pid))
                }
                _ => Err(format!("{:?}", pod.status)),
            }
        }
    };
    let (pod_name, pid) = eventually("the writer pod running", || running_pid(0)).await;
    eventually("deployment readyReplicas 1", || async {
        let d = deploys.get("ledger").await.map_err(|e| e.to_string())?;
        let s = d.status.clone().unwrap_or_default();
        if s.ready_replicas == Some(1) && s.observed_generation == d.metadata.generation {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;

    // The writer commits into the PVC's volume on the host.
    let (volume, _) = ferry_lab::node::storage::volume_path(&client, ns, "data")
        .await
        .unwrap()
        .expect("the claim is bound");
    let committed = |min: u64| {
        let volume = volume.clone();
        async move {
            let (ok, out) = sqlite_writer(&["last"], &volume);
            let n: u64 = out.trim().parse().unwrap_or(0);
            if ok && n >= min {
                Ok(n)
            } else {
                Err(out)
            }
        }
    };
    let before_kill = eventually("transactions committed", || committed(20)).await;

    // SIGKILL the container: the kubelet restarts it and the ledger stays intact.
    assert!(Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let (_, new_pid) = eventually("the writer restarted", || running_pid(1)).await;
    assert_ne!(pid, new_pid);
    eventually("commits continue after the restart", || {
        committed(before_kill + 20)
    })
    .await;
    let (ok, out) = sqlite_writer(&["verify"], &volume);
    assert!(ok, "ledger verifies after SIGKILL and restart: {out}");

    // Scaling to zero stops the process.
    deploys
        .patch_scale(
            "ledger",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .unwrap();
    eventually("no pods left", || async {
        let list = pods
            .list(&ListParams::default().labels("app=ledger"))
            .await
            .map_err(|e| e.to_string())?;
        if list.items.is_empty() && !alive(new_pid) {
            Ok(())
        } else {
            Err(format!(
                "{} pods, pid alive {}",
                list.items.len(),
                alive(new_pid)
            ))
        }
    })
    .await;
    let (ok, out) = sqlite_writer(&["verify"], &volume);
    assert!(ok, "ledger verifies after a graceful stop: {out}");

    // The timeline records start, stop (the kill), start, stop (the scale-down).
    let events: Vec<(TimelineEvent, Option<u32>)> =
        timeline::read(&dir.path().join("timeline.jsonl"))
            .unwrap()
            .into_iter()
            .filter(|e| e.pod == pod_name)
            .map(|e| (e.event, e.pid))
            .collect();
    assert_eq!(
        events,
        vec![
            (TimelineEvent::Start, Some(pid)),
            (TimelineEvent::Stop, Some(pid)),
            (TimelineEvent::Start, Some(new_pid)),
            (TimelineEvent::Stop, Some(new_pid))
        ],
        "timeline of {pod_name}"
    );
    site.shutdown().await;
}

/// psql against the lab's PostgreSQL; returns trimmed stdout or the error output.
fn psql(port: u16, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-tAc",
            sql,
        ])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_runs_as_a_non_root_pod_on_its_pvc() {
    if ferry_lab::images::postgres_bin_dir().is_none()
        || Command::new("psql").arg("--version").output().is_err()
    {
        assert!(
            std::env::var("CI").is_err(),
            "PostgreSQL is required under CI; .ci/install-test-deps.sh installs it"
        );
        eprintln!("skipped: PostgreSQL server binaries or psql not found");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let site = SiteRuntime::start_with_catalog(
        "pg",
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        Catalog::with_exe(ferry_lab_bin()),
    )
    .await
    .unwrap();
    let client = client_from(&dir.path().join("kubeconfig")).await.unwrap();
    let ns = "db";
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "pgdata"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "256Mi"}}}})).unwrap())
        .await
        .unwrap();
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deploys
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": {"name": "postgres"},
            "spec": {"selector": {"matchLabels": {"app": "postgres"}}, "template": {"metadata": {"labels": {"app": "postgres"}}, "spec": {
                // PostgreSQL refuses root; nobody exists on every Debian machine.
                "securityContext": {"runAsUser": 65534, "runAsGroup": 65534, "fsGroup": 65534},
                "containers": [{"name": "postgres", "image": "postgres:15",
                    "env": [{"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}, {"name": "PGPORT", "value": port.to_string()}],
                    "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}]}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "pgdata"}}]}}}
        })).unwrap())
        .await
        .unwrap();
    eventually("postgres accepting queries", || async {
        psql(port, "select 1")
    })
    .await;
    psql(
        port,
        "create table t(x int); insert into t select generate_series(1, 1000);",
    )
    .unwrap();
    assert_eq!(psql(port, "select sum(x) from t").unwrap(), "500500");

    // The cluster lives on the claim's volume, owned by the pod's user.
    let (volume, _) = ferry_lab::node::storage::volume_path(&client, ns, "pgdata")
        .await
        .unwrap()
        .unwrap();
    assert!(
        volume.join("pgdata/PG_VERSION").exists(),
        "initdb wrote into the PVC"
    );

    deploys
        .patch_scale(
            "postgres",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .unwrap();
    eventually("postgres stopped", || async {
        match psql(port, "select 1") {
            Err(_) if !volume.join("pgdata/postmaster.pid").exists() => Ok(()),
            other => Err(format!("still answering or pid file present: {other:?}")),
        }
    })
    .await;
    site.shutdown().await;
}
