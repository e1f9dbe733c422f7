//! The process kubelet: the SQLite writer runs from a Deployment with a PVC, survives SIGKILL
//! with a restart, passes `verify`, stops when scaled to zero, and the timeline records it;
//! every container of a pod runs, with readiness and liveness probes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ferry_lab::node::catalog::Catalog;
use ferry_lab::node::timeline::{self, TimelineEvent};
use ferry_lab::site::{client_from, SiteRuntime};
use ferry_lab::testing::eventually;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use kube::api::{Api, AttachParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;
use tokio::io::AsyncReadExt;

const T: Duration = Duration::from_secs(30);

fn ferry_lab_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry-lab"))
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

/// A lab site named `name` in `dir` running the catalog of this build, its client, and
/// namespace `ns` created in it.
async fn site_with_namespace(
    name: &str,
    dir: &std::path::Path,
    ns: &str,
) -> (SiteRuntime, kube::Client) {
    let site = SiteRuntime::start_with_catalog(
        name,
        dir,
        "127.0.0.1:0".parse().unwrap(),
        Catalog::with_exe(ferry_lab_bin()),
    )
    .await
    .unwrap();
    let client = client_from(&dir.join("kubeconfig")).await.unwrap();
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    (site, client)
}

fn alive(pid: u32) -> bool {
    ferry_lab::sites::alive(pid as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_writer_runs_restarts_verifies_and_scales_to_zero() {
    let dir = tempfile::tempdir().unwrap();
    let ns = "ledger";
    let (site, client) = site_with_namespace("k", dir.path(), ns).await;
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
    let (pod_name, pid) = eventually("the writer pod running", T, || running_pid(0)).await;
    eventually("deployment readyReplicas 1", T, || async {
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
    let before_kill = eventually("transactions committed", T, || committed(20)).await;

    // SIGKILL the container: the kubelet restarts it and the ledger stays intact.
    assert!(Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let (_, new_pid) = eventually("the writer restarted", T, || running_pid(1)).await;
    assert_ne!(pid, new_pid);
    eventually("commits continue after the restart", T, || {
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
    eventually("no pods left", T, || async {
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
#[cfg_attr(
    lab_no_postgres,
    ignore = "PostgreSQL (server binaries, psql, pgbench) not found (.ci/install-test-deps.sh installs it)"
)]
async fn postgres_runs_as_a_non_root_pod_on_its_pvc() {
    assert!(
        ferry_lab::images::postgres_bin_dir().is_some()
            && Command::new("psql").arg("--version").output().is_ok(),
        "PostgreSQL server binaries or psql not found (.ci/install-test-deps.sh installs them)"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let ns = "db";
    let (site, client) = site_with_namespace("pg", dir.path(), ns).await;
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
    eventually("postgres accepting queries", T, || async {
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
    eventually("postgres stopped", T, || async {
        match psql(port, "select 1") {
            Err(_) if !volume.join("pgdata/postmaster.pid").exists() => Ok(()),
            other => Err(format!("still answering or pid file present: {other:?}")),
        }
    })
    .await;
    site.shutdown().await;
}

/// Runs `command` in `container` of pod `name` through `pods/exec`; its stdout, or the error.
async fn exec(
    pods: &Api<Pod>,
    name: &str,
    container: Option<&str>,
    command: &str,
) -> Result<String, String> {
    let mut params = AttachParams::default().stdout(true).stderr(false);
    if let Some(c) = container {
        params = params.container(c);
    }
    let mut process = pods
        .exec(name, ["sh", "-c", command], &params)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    process
        .stdout()
        .ok_or("no stdout")?
        .read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    let status = process.take_status().ok_or("no status")?.await;
    match status {
        Some(s) if s.status.as_deref() == Some("Success") => Ok(out),
        other => Err(format!("{other:?}")),
    }
}

/// Each container's (running pid, ready, restartCount), by name, when all of them run.
fn containers(pod: &Pod) -> Result<BTreeMap<String, (u32, bool, i32)>, String> {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    for s in &statuses {
        let pid = s
            .container_id
            .as_deref()
            .and_then(|id| id.strip_prefix("lab://"))
            .and_then(|p| p.parse::<u32>().ok());
        match (s.state.as_ref().and_then(|st| st.running.as_ref()), pid) {
            (Some(_), Some(pid)) if alive(pid) => {
                out.insert(s.name.clone(), (pid, s.ready, s.restart_count));
            }
            _ => return Err(format!("{} not running: {:?}", s.name, s.state)),
        }
    }
    Ok(out)
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Every regular container of a pod runs, sharing its emptyDir; a readiness probe gates the
/// pod's Ready condition; a failing liveness probe restarts only its container; `pods/exec`
/// picks containers as the API server does; deleting the pod stops every process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_container_runs_and_probes_gate_readiness_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ns = "multi";
    let (site, client) = site_with_namespace("m", dir.path(), ns).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    // SHARED names the emptyDir's mountPath, so the commands work with and without mount
    // namespaces (without root the kubelet rewrites it to the host path).
    let env = json!([{"name": "SHARED", "value": "/shared"}]);
    let mount = json!([{"name": "shared", "mountPath": "/shared"}]);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {"name": "app", "image": "busybox", "env": env, "volumeMounts": mount,
                 "command": ["sh", "-c", "echo app > \"$SHARED/app\"; exec sleep 600"],
                 "readinessProbe": {"exec": {"command": ["sh", "-c", "test -f \"$SHARED/go\""]}, "periodSeconds": 1}},
                {"name": "helper", "image": "busybox", "env": env, "volumeMounts": mount,
                 "command": ["sh", "-c", "echo helper > \"$SHARED/helper\"; exec sleep 600"],
                 "livenessProbe": {"exec": {"command": ["sh", "-c", "! rm \"$SHARED/kill-helper\" 2>/dev/null"]}, "periodSeconds": 1, "failureThreshold": 1}}
            ],
            "volumes": [{"name": "shared", "emptyDir": {}}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();

    // Both run; the app is not ready until its readiness probe passes, the helper is.
    let first = eventually("both containers running, app not ready", T, || async {
        let pod = pods.get("web").await.map_err(|e| e.to_string())?;
        let c = containers(&pod)?;
        match (c.get("app"), c.get("helper")) {
            (Some((_, false, 0)), Some((_, true, 0))) if !pod_ready(&pod) => Ok(c),
            _ => Err(format!("{c:?}, pod ready {}", pod_ready(&pod))),
        }
    })
    .await;

    // exec needs a container name on a pod of two, and reaches the one named.
    let err = exec(&pods, "web", None, "true").await.unwrap_err();
    assert!(
        err.contains("a container name must be specified for pod web, choose one of: [app helper]"),
        "{err}"
    );
    let err = exec(&pods, "web", Some("nope"), "true").await.unwrap_err();
    assert!(
        err.contains("container nope is not valid for pod web"),
        "{err}"
    );
    let shared = exec(
        &pods,
        "web",
        Some("helper"),
        "cat \"$SHARED/app\" \"$SHARED/helper\"",
    )
    .await
    .unwrap();
    assert_eq!(
        shared, "app\nhelper\n",
        "one emptyDir shared by both containers"
    );

    exec(&pods, "web", Some("app"), "touch \"$SHARED/go\"")
        .await
        .unwrap();
    eventually(
        "the pod Ready once the readiness probe passes",
        T,
        || async {
            let pod = pods.get("web").await.map_err(|e| e.to_string())?;
            let c = containers(&pod)?;
            (pod_ready(&pod) && c["app"].1)
                .then_some(())
                .ok_or(format!("{c:?}"))
        },
    )
    .await;

    // The helper's liveness probe fails once (it consumes the marker): it alone is restarted.
    exec(&pods, "web", Some("app"), "touch \"$SHARED/kill-helper\"")
        .await
        .unwrap();
    let restarted = eventually("the helper restarted by its liveness probe", T, || async {
        let pod = pods.get("web").await.map_err(|e| e.to_string())?;
        let c = containers(&pod)?;
        (c["helper"].2 >= 1)
            .then_some(c.clone())
            .ok_or(format!("{c:?}"))
    })
    .await;
    assert_ne!(restarted["helper"].0, first["helper"].0);
    assert_eq!(
        restarted["app"],
        (first["app"].0, true, 0),
        "the app untouched"
    );

    // Deleting the pod stops both processes, and the timeline has each container's starts.
    let last = eventually("both containers running again", T, || async {
        containers(&pods.get("web").await.map_err(|e| e.to_string())?)
    })
    .await;
    let pids: Vec<u32> = last.values().map(|c| c.0).collect();
    pods.delete("web", &Default::default()).await.unwrap();
    eventually("the pod gone and its processes stopped", T, || async {
        let gone = pods
            .get_opt("web")
            .await
            .map_err(|e| e.to_string())?
            .is_none();
        (gone && pids.iter().all(|p| !alive(*p)))
            .then_some(())
            .ok_or("still there".to_string())
    })
    .await;
    let starts: Vec<Option<u32>> = timeline::read(&dir.path().join("timeline.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|e| e.pod == "web" && e.event == TimelineEvent::Start)
        .map(|e| e.pid)
        .collect();
    // The app once, the helper twice (its first run and the one after the restart).
    let mut expected = vec![
        Some(first["app"].0),
        Some(first["helper"].0),
        Some(last["helper"].0),
    ];
    let mut starts = starts;
    expected.sort();
    starts.sort();
    assert_eq!(starts, expected);
    assert_eq!(last["helper"].2, 1, "restarted once: {last:?}");
    site.shutdown().await;
}
