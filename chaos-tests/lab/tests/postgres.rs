//! PostgreSQL end to end: pgbench writes at site a while Ferry replicates; a planned
//! migration moves the database to site b; PostgreSQL starts at b on the replicated volume and
//! holds exactly what a held after the quiesce (pgbench_history count and sum(delta), the
//! pgbench_accounts balance total). Requires PostgreSQL: listed as ignored without it, failing
//! under CI.

mod e2e;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_lab::site::client_from;
use ferry_lab::sites::SiteLayout;
use ferry_schemas::{DRPair, Migration};

use ferry_lab::testing::{eventually, Lab};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::Client;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(90);
const NS: &str = "db";
const PORT: u16 = 25432;

/// Kills the background pgbench when the test ends.
struct Bench(Child);

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn psql(host: &str, port: u16, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            "-h",
            host,
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

/// (count(*) and sum(delta) of pgbench_history, sum(abalance) of pgbench_accounts).
fn figures(host: &str, port: u16) -> Result<String, String> {
    psql(host, port, "select (select count(*) from pgbench_history) || ' ' || (select coalesce(sum(delta),0) from pgbench_history) || ' ' || (select sum(abalance) from pgbench_accounts)")
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

fn postgres_pod_spec(claim: &str, labels: Value) -> Value {
    json!({
        "metadata": {"labels": labels},
        "spec": {
            // PostgreSQL refuses root; nobody exists on every Debian machine.
            "securityContext": {"runAsUser": 65534, "runAsGroup": 65534, "fsGroup": 65534, "fsGroupChangePolicy": "OnRootMismatch"},
            "containers": [{"name": "postgres", "image": "postgres:15",
                "env": [{"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}, {"name": "PGPORT", "value": PORT.to_string()}],
                "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
                // Ready once the server accepts connections (not while it starts or recovers).
                "readinessProbe": {"exec": {"command": ["sh", "-c", "pg_isready -q -h \"$POD_IP\" -p \"$PGPORT\""]}, "periodSeconds": 1}}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        },
    })
}

on_both_planes!(
    postgres_migrates_with_exactly_its_committed_transactions,
    postgres_migrates_with_exactly_its_committed_transactions_on_kubernetes,
    postgres_migrates_with_exactly_its_committed_transactions_on,
    needs lab_no_postgres, "PostgreSQL (server binaries, psql, pgbench) not found (.ci/install-test-deps.sh installs it)"
);

async fn postgres_migrates_with_exactly_its_committed_transactions_on(settings: e2e::LabSettings) {
    assert!(
        ferry_lab::images::postgres_bin_dir().is_some()
            && Command::new("pgbench").arg("--version").output().is_ok(),
        "PostgreSQL server binaries or pgbench not found (.ci/install-test-deps.sh installs them)"
    );
    let dir = tempfile::tempdir().unwrap();
    // FERRY_TEST_LAB_DIR keeps the lab's files (logs, timelines) for a post-mortem.
    let lab = Lab(std::env::var_os("FERRY_TEST_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("lab")));
    e2e::up(&lab.0, "a,b", &[], &settings);
    let ip = |site: &str| {
        SiteLayout::in_lab(&lab.0, site)
            .read_record()
            .unwrap()
            .listen
            .ip()
            .to_string()
    };
    let (ip_a, ip_b) = (ip("a"), ip("b"));
    let a = client_from(&lab.0.join("a/kubeconfig")).await.unwrap();

    apply(
        &a,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await;
    apply(&a, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "pgdata", "namespace": NS}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "512Mi"}}}})).await;
    apply(&a, json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "postgres", "namespace": NS, "labels": {"app": "postgres"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "postgres"}}, "template": postgres_pod_spec("pgdata", json!({"app": "postgres"}))}})).await;
    eventually("postgres at a", T, || async {
        psql(&ip_a, PORT, "select 1")
    })
    .await;
    let init = Command::new("pgbench")
        .args([
            "-h",
            &ip_a,
            "-p",
            &PORT.to_string(),
            "-U",
            "postgres",
            "-i",
            "-s",
            "2",
            "-q",
            "postgres",
        ])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    // A continuous run while Ferry replicates; it ends when the source is quiesced.
    let bench = Bench(
        Command::new("pgbench")
            .args([
                "-h",
                &ip_a,
                "-p",
                &PORT.to_string(),
                "-U",
                "postgres",
                "-c",
                "2",
                "-T",
                "600",
                "postgres",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    apply(&a, json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair", "metadata": {"name": "pg", "namespace": NS}, "spec": {
        "selector": {"matchLabels": {"app": "postgres"}}, "primarySite": "a", "secondarySite": "b", "rpo": "30s"}})).await;
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);
    eventually("a first generation while pgbench writes", T, || async {
        let p = pairs.get("pg").await.map_err(|e| e.to_string())?;
        p.status
            .and_then(|s| s.generation)
            .map(|g| g.0)
            .ok_or_else(|| "none yet".to_string())
    })
    .await;
    let written = figures(&ip_a, PORT).unwrap();
    println!("at a while replicating: {written}");

    apply(&a, json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Migration", "metadata": {"name": "pg-to-b", "namespace": NS}, "spec": {"pair": "pg", "targetSite": "b"}})).await;
    let migrations: Api<Migration> = Api::namespaced(a.clone(), NS);
    let end = eventually("the migration to end", T, || async {
        let m = migrations.get("pg-to-b").await.map_err(|e| e.to_string())?;
        let s = m.status.unwrap_or_default();
        match s.phase.map(|p| p.as_str().to_string()) {
            Some(p) if p == "Completed" || p == "Failed" => {
                Ok((p, s.conditions, s.rto_seconds, s.data_loss_seconds))
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(end.0, "Completed", "{:?}", end.1);
    assert_eq!(end.3, Some(0.0));
    println!("migration RTO (to pg_isready at b): {:?} s", end.2);
    drop(bench);

    // PostgreSQL at b, on the replicated volume: the migration completes only once the
    // app is ready there, and its readiness probe is pg_isready, so it answers at once.
    let at_b = figures(&ip_b, PORT).expect("postgres serves at b when the migration completes");
    // What a held after the quiesce: its volume, opened by an inspection pod at a (not the app).
    apply(
        &a,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "inspect", "namespace": NS},
        "spec": postgres_pod_spec("pgdata", json!({"role": "inspect"}))["spec"]}),
    )
    .await;
    let at_a = eventually("the inspection postgres at a", T, || async {
        figures(&ip_a, PORT)
    })
    .await;
    println!("after quiesce at a: {at_a}; at b: {at_b}; rto {:?}s", end.2);
    assert_eq!(at_b, at_a, "b holds exactly a's committed transactions");
    let parts: Vec<i64> = at_b.split(' ').map(|x| x.parse().unwrap()).collect();
    assert!(parts[0] > 0, "pgbench wrote history while replicating");
    assert_eq!(
        parts[1], parts[2],
        "pgbench's invariant: sum(delta) equals the balance total"
    );
}
