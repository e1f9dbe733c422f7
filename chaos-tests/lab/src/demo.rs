//! `ferry-lab demo`: Ferry's main job on a fresh machine. Two lab sites with Ferry deployed,
//! the SQLite ledger writer with a PVC at site a, a DRPair with `rpo: 30s`, live replication
//! status, a DR drill at b (the newest generation restored into a sandbox namespace and its
//! ledger verified while a keeps writing), a planned Migration to site b, and a report that
//! checks what a user relies on: the drill passed, the app runs at b with its rewritten label
//! and replica count, its ledger verifies and holds exactly the last transaction committed at
//! a before the quiesce, the RPO held throughout, and the RTO.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use ferry_schemas::{DRPair, Migration};

use crate::node::storage::bound_volume;
use crate::site::client_from;

/// The demo app's namespace.
pub const NAMESPACE: &str = "shop";
/// The pair's RPO in seconds.
pub const RPO_SECONDS: f64 = 30.0;

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Lab directory (a fresh temporary one when `None`).
    pub dir: Option<PathBuf>,
    /// Leave the lab running at the end.
    pub keep: bool,
    /// Seconds of steady replication to watch before migrating.
    pub observe_seconds: u64,
    /// The `ferry-lab` binary to run `up`/`down` with (default: this process's own, which is
    /// right for the CLI; tests pass the built binary).
    pub exe: Option<PathBuf>,
    /// The sites' control plane.
    pub settings: crate::control_plane::LabSettings,
}

/// What the demo measured; `ok()` says whether every check held.
#[derive(Debug, Clone, Default)]
pub struct DemoReport {
    /// The first full sync's duration, seconds.
    pub first_sync_seconds: f64,
    /// Largest `currentLagSeconds` seen once the pair was Ready.
    pub max_lag_seconds: f64,
    /// Samples of the lag taken (one per second).
    pub lag_samples: u64,
    /// Last transaction at a after the quiesce: number.
    pub last_txn_at_a: u64,
    /// Whether b's ledger holds that transaction with the same chain hash.
    pub same_txn_at_b: bool,
    /// Whether b's ledger verifies, and its last transaction.
    pub verified_at_b: Option<u64>,
    /// The app's label `site` at b.
    pub site_label_at_b: Option<String>,
    /// Replicas of the Deployment at b (wanted, ready).
    pub replicas_at_b: (i32, i32),
    /// The Migration's RTO, seconds.
    pub rto_seconds: f64,
    /// The Migration's data loss, seconds.
    pub data_loss_seconds: f64,
    /// The drill at b: its phase at the end (`Passed` or `Failed`), generation, RTO and data
    /// age (seconds).
    pub drill: Option<DrillResult>,
}

/// What the demo's drill at b reported.
#[derive(Debug, Clone, Default)]
pub struct DrillResult {
    /// `Passed` or `Failed`.
    pub phase: String,
    /// The generation restored.
    pub generation: u64,
    /// Start to ready, seconds.
    pub rto_seconds: f64,
    /// The generation's age at the start, seconds.
    pub data_age_seconds: f64,
    /// The verification's output, or the failure's message.
    pub output: String,
}

impl DemoReport {
    /// Every check of the demo.
    pub fn checks(&self) -> Vec<(String, bool)> {
        let drill = self.drill.clone().unwrap_or_default();
        vec![
            (format!("drill at b: generation {} restored in a sandbox and verified ({}), RTO {:.1}s, data age {:.1}s", drill.generation, drill.output.lines().last().unwrap_or("-"), drill.rto_seconds, drill.data_age_seconds), drill.phase == "Passed"),
            (format!("app runs at b with label site={}", self.site_label_at_b.as_deref().unwrap_or("?")), self.site_label_at_b.as_deref() == Some("b")),
            (format!("original replica count restored at b: {}/{} ready", self.replicas_at_b.1, self.replicas_at_b.0), self.replicas_at_b == (1, 1)),
            (format!("ledger at b verifies (last txn {})", self.verified_at_b.map(|n| n.to_string()).unwrap_or_else(|| "-".into())), self.verified_at_b.is_some()),
            (format!("txn {} (last at a before quiesce) is at b with the same chain hash: zero data loss", self.last_txn_at_a), self.same_txn_at_b && self.data_loss_seconds == 0.0),
            (format!("RPO held: max lag {:.1}s < {RPO_SECONDS}s over {} samples", self.max_lag_seconds, self.lag_samples), self.max_lag_seconds < RPO_SECONDS && self.lag_samples > 0),
            (format!("RTO {:.1}s", self.rto_seconds), self.rto_seconds > 0.0),
        ]
    }

    /// Whether every check held.
    pub fn ok(&self) -> bool {
        self.checks().iter().all(|(_, ok)| *ok)
    }
}

/// Runs `ferry-lab ARGS --dir DIR` (this binary unless `exe` names another) and waits.
pub(crate) fn ferry_lab(exe: &Option<PathBuf>, dir: &Path, args: &[&str]) -> Result<()> {
    let exe = match exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().context("locating ferry-lab")?,
    };
    let status = Command::new(exe)
        .args(args)
        .arg("--dir")
        .arg(dir)
        .status()
        .with_context(|| format!("running ferry-lab {}", args.join(" ")))?;
    if !status.success() {
        bail!("ferry-lab {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs the demo and prints its report; `Ok(report)` even when a check failed (see
/// [`DemoReport::ok`]).
///
/// # Errors
/// When the lab cannot start or a step cannot run at all.
pub async fn run(options: &DemoOptions) -> Result<DemoReport> {
    let temp;
    let dir = match &options.dir {
        Some(dir) => dir.clone(),
        None => {
            temp = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
            temp
        }
    };
    println!(
        "== starting two lab sites ({} control plane) with Ferry deployed in {}",
        options.settings.control_plane.as_str(),
        dir.display()
    );
    let mut up = vec!["up".to_string(), "--sites".into(), "a,b".into()];
    up.extend(options.settings.up_args());
    ferry_lab(
        &options.exe,
        &dir,
        &up.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let result = scenario(&dir, options).await;
    if options.keep {
        println!("\nThe lab keeps running. Explore it with:");
        println!(
            "  kubectl --kubeconfig {}/a/kubeconfig get drp,mig,deploy,pods -n {NAMESPACE}",
            dir.display()
        );
        println!("  kubectl --kubeconfig {}/b/kubeconfig get drp,deploy,pods,volumesnapshots -n {NAMESPACE}", dir.display());
        println!("  ferry-lab down --dir {}", dir.display());
    } else {
        ferry_lab(&options.exe, &dir, &["down"])?;
    }
    result
}

async fn scenario(dir: &Path, options: &DemoOptions) -> Result<DemoReport> {
    let a = client_from(&dir.join("a/kubeconfig")).await?;
    let b = client_from(&dir.join("b/kubeconfig")).await?;
    let mut report = DemoReport::default();

    println!("== deploying the SQLite ledger writer with a PVC at site a");
    deploy_app(&a).await?;
    println!(
        "== declaring DRPair shop/ledger: a → b, rpo 30s, label site: a → b, replicas Restore"
    );
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NAMESPACE);
    let pair: DRPair = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair",
        "metadata": {"name": "ledger", "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": {"app": "ledger"}},
            "primarySite": "a", "secondarySite": "b", "rpo": "30s",
            "transform": {"labels": {"set": {"site": "b"}}, "replicas": {"policy": "Restore"}},
        },
    }))?;
    pairs
        .create(&PostParams::default(), &pair)
        .await
        .context("creating the DRPair")?;

    println!(
        "\n{:<8} {:<7} {:<5} {:<7} {:<22} {:<12} GEN",
        "NAME", "ACTIVE", "RPO", "LAG", "LAST-SYNC", "PHASE"
    );
    let started = Instant::now();
    let spinner = ['|', '/', '-', '\\'];
    let mut tick = 0usize;
    let mut last_row = String::new();
    let mut ready_at: Option<Instant> = None;
    loop {
        let p = pairs.get("ledger").await?;
        let s = p.status.clone().unwrap_or_default();
        let row = format!(
            "{:<8} {:<7} {:<5} {:<7} {:<22} {:<12} {}",
            "ledger",
            s.active_site.as_deref().unwrap_or("-"),
            p.spec.rpo,
            s.current_lag_seconds
                .map(|l| format!("{l:.0}s"))
                .unwrap_or_else(|| "-".into()),
            s.last_sync_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_else(|| "-".into()),
            s.phase
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "-".into()),
            s.generation
                .map(|g| g.0.to_string())
                .unwrap_or_else(|| "-".into()),
        );
        let ready = s.generation.is_some();
        if ready && ready_at.is_none() {
            ready_at = Some(Instant::now());
            report.first_sync_seconds = started.elapsed().as_secs_f64();
            println!(
                "\r{row}   first full sync done in {:.1}s",
                report.first_sync_seconds
            );
        } else if !ready {
            print!(
                "\r{row}   {} first full sync running ({:.0}s)",
                spinner[tick % 4],
                started.elapsed().as_secs_f64()
            );
            use std::io::Write;
            let _ = std::io::stdout().flush();
            tick += 1;
            if started.elapsed() > Duration::from_secs(300) {
                bail!(
                    "the first sync did not complete in 300s; status: {:?}",
                    s.conditions
                );
            }
        } else {
            if let Some(lag) = s.current_lag_seconds {
                report.max_lag_seconds = report.max_lag_seconds.max(lag);
                report.lag_samples += 1;
            }
            if row != last_row {
                println!("{row}");
            }
        }
        last_row = row;
        if ready_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(options.observe_seconds)) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The lab node serves no kubelet exec endpoint to a real control plane (docs/lab.md):
    // there the drill's verdict is the restored app's readiness.
    let exec = options.settings.control_plane == crate::control_plane::ControlPlane::Lab;
    report.drill = Some(drill(&a, &b, &mut report, exec).await?);

    println!("\n== migrating shop/ledger to site b (planned)");
    let migrations: Api<Migration> = Api::namespaced(a.clone(), NAMESPACE);
    let migration: Migration = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Migration",
        "metadata": {"name": "ledger-to-b", "namespace": NAMESPACE},
        "spec": {"pair": "ledger", "targetSite": "b", "type": "Planned"},
    }))?;
    migrations
        .create(&PostParams::default(), &migration)
        .await
        .context("creating the Migration")?;
    let mut seen = 0usize;
    let deadline = Instant::now() + Duration::from_secs(300);
    let final_status = loop {
        let m = migrations.get("ledger-to-b").await?;
        let s = m.status.clone().unwrap_or_default();
        for t in s.phase_times.iter().skip(seen) {
            println!("  {:<14} at {}", t.phase.as_str(), t.start_time.0);
        }
        seen = s.phase_times.len();
        // Quiesced: the writer at a has stopped, so its ledger's tip is final.
        if s.phase.map(|p| p.as_str()) == Some("Completed")
            || s.phase.map(|p| p.as_str()) == Some("Failed")
        {
            break s;
        }
        if Instant::now() > deadline {
            bail!("the migration did not finish in 300s (phase {:?})", s.phase);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if final_status.phase.map(|p| p.as_str()) != Some("Completed") {
        let why = final_status
            .conditions
            .iter()
            .map(|c| format!("{}: {}", c.reason, c.message))
            .collect::<Vec<_>>()
            .join("; ");
        bail!("the migration failed: {why}");
    }
    report.rto_seconds = final_status.rto_seconds.unwrap_or(0.0);
    report.data_loss_seconds = final_status.data_loss_seconds.unwrap_or(-1.0);

    // The app at b.
    let deployment = Api::<Deployment>::namespaced(b.clone(), NAMESPACE)
        .get("ledger")
        .await?;
    report.site_label_at_b = deployment
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("site").cloned());
    report.replicas_at_b = (
        deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(0),
        deployment
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
    );
    // The ledger at a, quiesced, and at b.
    let at_a = ledger_dir(&a, "ledger-data").await?;
    let conn = ferry_sqlite_writer::ledger::open_existing(&at_a)?;
    let tip = ferry_sqlite_writer::ledger::tip(&conn)?.context("the ledger at a is empty")?;
    report.last_txn_at_a = tip.n;
    let at_b = ledger_dir(&b, "ledger-data").await?;
    let conn = ferry_sqlite_writer::ledger::open_existing(&at_b)?;
    if let ferry_sqlite_writer::ledger::Verdict::Ok { last, .. } =
        ferry_sqlite_writer::ledger::verify(&conn)?
    {
        report.verified_at_b = Some(last);
    }
    report.same_txn_at_b = ferry_sqlite_writer::ledger::hash_of(&conn, tip.n)? == Some(tip.hash);

    println!("\n== report");
    for (check, ok) in report.checks() {
        println!("  [{}] {check}", if ok { "ok" } else { "FAIL" });
    }
    println!(
        "  first full sync {:.1}s; data loss {:.0}s",
        report.first_sync_seconds, report.data_loss_seconds
    );
    Ok(report)
}

/// A DRDrill at b: the newest generation restored into a sandbox and verified with
/// `sqlite-writer verify`, while a keeps writing and replicating (its lag is sampled into the
/// report's RPO check); the drill is deleted afterwards, which removes its sandbox.
async fn drill(a: &Client, b: &Client, report: &mut DemoReport, exec: bool) -> Result<DrillResult> {
    use ferry_schemas::DRDrill;
    println!(
        "\n== DR drill at b: restoring the newest generation into a sandbox, verifying its ledger"
    );
    let verify = if exec {
        json!({"command": ["sqlite-writer", "verify"]})
    } else {
        json!({})
    };
    let drills: Api<DRDrill> = Api::namespaced(b.clone(), NAMESPACE);
    let drill: DRDrill = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "DRDrill",
        "metadata": {"name": "ledger-drill", "namespace": NAMESPACE},
        "spec": {"pair": "ledger", "ttl": "1h", "verify": verify},
    }))?;
    drills
        .create(&PostParams::default(), &drill)
        .await
        .context("creating the DRDrill")?;
    let pairs_a: Api<DRPair> = Api::namespaced(a.clone(), NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last_phase = String::new();
    let done = loop {
        let d = drills.get("ledger-drill").await?;
        let s = d.status.clone().unwrap_or_default();
        let phase = s.phase.map(|p| p.as_str().to_string()).unwrap_or_default();
        if phase != last_phase && !phase.is_empty() {
            println!(
                "  {phase:<10} {}",
                s.target_namespace.as_deref().unwrap_or("")
            );
            last_phase = phase.clone();
        }
        // Replication at a goes on meanwhile: its lag counts toward the RPO check.
        if let Some(lag) = pairs_a
            .get("ledger")
            .await?
            .status
            .and_then(|s| s.current_lag_seconds)
        {
            report.max_lag_seconds = report.max_lag_seconds.max(lag);
            report.lag_samples += 1;
        }
        if phase == "Passed" || phase == "Failed" {
            break s;
        }
        if Instant::now() > deadline {
            bail!("the drill did not finish in 300s: {:?}", s.conditions);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let result = DrillResult {
        phase: last_phase,
        generation: done.generation.map(|g| g.0).unwrap_or_default(),
        rto_seconds: done.rto_seconds.unwrap_or_default(),
        data_age_seconds: done.data_age_seconds.unwrap_or_default(),
        output: done
            .verification
            .clone()
            .filter(|_| exec)
            .or_else(|| done.conditions.first().map(|c| c.message.clone()))
            .unwrap_or_default(),
    };
    println!(
        "  generation {}: RTO {:.1}s, data age {:.1}s, verification: {}",
        result.generation,
        result.rto_seconds,
        result.data_age_seconds,
        result.output.lines().last().unwrap_or("-")
    );
    drills
        .delete("ledger-drill", &Default::default())
        .await
        .context("deleting the DRDrill")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while drills.get_opt("ledger-drill").await?.is_some() {
        if Instant::now() > deadline {
            bail!("the drill's sandbox was not removed in 120s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!("  sandbox removed");
    Ok(result)
}

async fn ledger_dir(client: &Client, claim: &str) -> Result<PathBuf> {
    let volume = bound_volume(client, NAMESPACE, claim)
        .await?
        .with_context(|| format!("PVC {NAMESPACE}/{claim} is not bound"))?;
    Ok(volume.path)
}

async fn deploy_app(a: &Client) -> Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::<Namespace>::all(a.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "ledger-data", "labels": {"app": "ledger"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}},
    }))?;
    Api::<PersistentVolumeClaim>::namespaced(a.clone(), NAMESPACE)
        .create(&PostParams::default(), &pvc)
        .await?;
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "ledger", "namespace": NAMESPACE, "labels": {"app": "ledger", "site": "a"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "ledger"}},
            "template": {
                "metadata": {"labels": {"app": "ledger", "site": "a"}},
                "spec": {
                    "containers": [{
                        "name": "writer", "image": "ferry-lab/sqlite-writer",
                        "env": [{"name": "DATA_DIR", "value": "/data"}, {"name": "WRITE_INTERVAL_MS", "value": "20"}],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "ledger-data"}}],
                },
            },
        },
    });
    Api::<Deployment>::namespaced(a.clone(), NAMESPACE)
        .patch(
            "ledger",
            &PatchParams::apply("ferry-lab-demo"),
            &Patch::Apply(&deployment),
        )
        .await?;
    Ok(())
}
