//! Shared by the lab's end-to-end tests: the `ferry-lab` binary, a lab stopped on drop,
//! bounded polling, and a ledger app protected by a DRPair.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_lab::node::storage::bound_volume;
use ferry_lab::node::timeline::{running_intervals, TimelineEntry, TimelineEvent};
use ferry_lab::site::client_from;
use ferry_sqlite_writer::ledger::{self, Tip};
use kube::Client;

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

#[allow(unused_imports)]
pub use ferry_lab::testing::Lab;

pub async fn eventually<V, F, Fut>(what: &str, f: F) -> V
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<V, String>>,
{
    ferry_lab::testing::eventually(what, T, f).await
}

pub use ferry_lab::ledger_app::Protection;

pub use ferry_lab::control_plane::LabSettings;

/// Runs scenario `$body(settings: LabSettings)` as two tests: `$lab` on the lab's control
/// plane and `$kubernetes` on a real one (etcd, kube-apiserver, controller-manager and
/// scheduler from the kit in `FERRY_LAB_KUBE_BIN`). Without the kit the second is listed as
/// ignored, and fails when `CI=true`.
#[macro_export]
macro_rules! on_both_planes {
    // `needs CFG, "reason"`: both tests also need a tool; the lab's build script sets CFG
    // where it is missing (outside CI), and the tests are then listed as ignored.
    ($lab:ident, $kubernetes:ident, $body:ident $(, needs $missing:ident, $reason:literal)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[cfg_attr($missing, ignore = $reason)])?
        async fn $lab() {
            $body(e2e::LabSettings::default()).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[cfg_attr($missing, ignore = $reason)])?
        #[cfg_attr(lab_no_kube_kit, ignore = "the Kubernetes control-plane kit is missing (FERRY_LAB_KUBE_BIN and etcd; .ci/run provides both)")]
        async fn $kubernetes() {
            $body(ferry_lab::control_plane::kubernetes_for_test(stringify!($kubernetes))).await
        }
    };
}

/// `ferry-lab up --sites SITES [extra...]` on `settings`' control plane.
pub fn up(lab: &Path, sites: &str, extra: &[&str], settings: &LabSettings) {
    let mut args: Vec<String> = vec!["up".into(), "--sites".into(), sites.into()];
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(settings.up_args());
    ferry_lab(&args.iter().map(String::as_str).collect::<Vec<_>>(), lab);
}

pub async fn setup(lab: &Path) -> (Client, Client) {
    setup_with(lab, &Protection::PLANNED).await
}

/// [`setup`] on `settings`' control plane.
pub async fn setup_on(lab: &Path, settings: &LabSettings) -> (Client, Client) {
    setup_with_on(lab, &Protection::PLANNED, settings).await
}

/// Two sites and three witnesses, the ledger writer (a Deployment with a PVC) at `a`, and a
/// DRPair over it with `rpo: 30s`; returns once the app writes at `a` and a generation
/// holding some of its transactions is complete at `b`.
pub async fn setup_with(lab: &Path, protection: &Protection) -> (Client, Client) {
    setup_with_on(lab, protection, &LabSettings::default()).await
}

/// [`setup_with`] on `settings`' control plane.
pub async fn setup_with_on(
    lab: &Path,
    protection: &Protection,
    settings: &LabSettings,
) -> (Client, Client) {
    up(lab, "a,b", &["--lease", protection.lease], settings);
    let a = client_from(&lab.join("a/kubeconfig")).await.unwrap();
    let b = client_from(&lab.join("b/kubeconfig")).await.unwrap();
    ferry_lab::ledger_app::deploy(&a, protection, T)
        .await
        .unwrap_or_else(|e| panic!("deploying the ledger app: {e:#}"));
    (a, b)
}

/// Asks a's replicator for a sync now and waits until the generation it started is committed.
pub async fn sync_now(a: &Client, token: &str) {
    ferry_lab::ledger_app::sync_now(a, token, T)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
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
    let copy = ferry_lab::ledger_app::replica_copy(client, generation)
        .await
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&copy.path).unwrap().flatten() {
        std::fs::copy(entry.path(), scratch.path().join(entry.file_name())).unwrap();
    }
    let conn = ledger::open_existing(scratch.path()).unwrap();
    let intact = matches!(ledger::verify(&conn).unwrap(), ledger::Verdict::Ok { .. });
    (ledger::tip(&conn).unwrap().expect("rows"), intact)
}

/// The pair's condition `type_`, if set.
pub fn condition(
    pair: &ferry_schemas::DRPair,
    type_: &str,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    pair.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .cloned()
}

/// Waits until Migration `name` at the site of `client` completes and returns its status;
/// panics with its conditions if it fails.
pub async fn completed_migration(
    client: &kube::Client,
    name: &str,
) -> ferry_schemas::migration::MigrationStatus {
    let migrations: kube::Api<ferry_schemas::Migration> = kube::Api::namespaced(client.clone(), NS);
    eventually(&format!("Migration {name} completed"), || async {
        let m = migrations.get(name).await.map_err(|e| e.to_string())?;
        let s = m.status.clone().unwrap_or_default();
        match s.phase.map(|p| p.as_str().to_string()).as_deref() {
            Some("Completed") => Ok(s),
            Some("Failed") => panic!("Migration {name} failed: {:?}", s.conditions),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// Creates `object` (any kind, found through discovery) at the site of `client`, in
/// `namespace` when the kind is namespaced; panics naming the kind on refusal.
pub async fn create_object(client: &kube::Client, namespace: &str, object: serde_json::Value) {
    let api_version = object["apiVersion"].as_str().unwrap().to_string();
    let kind = object["kind"].as_str().unwrap().to_string();
    let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
    let (resource, caps) = kube::discovery::pinned_kind(
        client,
        &kube::core::GroupVersionKind::gvk(group, version, &kind),
    )
    .await
    .unwrap();
    let api: kube::Api<kube::api::DynamicObject> = match caps.scope {
        kube::discovery::Scope::Namespaced => {
            kube::Api::namespaced_with(client.clone(), namespace, &resource)
        }
        kube::discovery::Scope::Cluster => kube::Api::all_with(client.clone(), &resource),
    };
    let object: kube::api::DynamicObject = serde_json::from_value(object).unwrap();
    api.create(&Default::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("creating {kind}: {e}"));
}

/// Waits until the ledger writer at the site of `client` (named `site` in messages) has
/// committed past transaction `after`; returns the live tip.
pub async fn writer_commits_past(client: &kube::Client, site: &str, after: u64) -> Tip {
    eventually(&format!("the writer commits at {site}"), || async {
        let tip = live_tip(client).await;
        if tip.n > after {
            Ok(tip)
        } else {
            Err(format!("tip {}", tip.n))
        }
    })
    .await
}
