//! The main job as a test: `ferry-lab demo` on two lab sites, with its assertions. The SQLite
//! ledger writer replicates with rpo 30s, migrates to site b with zero data loss, and the two
//! sites' timelines never show the app running at both at once.

use std::path::PathBuf;

use ferry_lab::demo::{run, DemoOptions};
use ferry_lab::node::timeline::{first_overlap, read, running_intervals};
use ferry_lab::sites::SiteLayout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_replicates_and_migrates_with_zero_data_loss() {
    demo_on(Default::default()).await
}

/// The same demo, report and checks on a real Kubernetes control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    lab_no_kube_kit,
    ignore = "the Kubernetes control-plane kit is missing (FERRY_LAB_KUBE_BIN and etcd; .ci/run provides both)"
)]
async fn demo_on_the_kubernetes_control_plane() {
    demo_on(ferry_lab::control_plane::kubernetes_for_test(
        "demo_on_the_kubernetes_control_plane",
    ))
    .await
}

async fn demo_on(settings: ferry_lab::control_plane::LabSettings) {
    let dir = tempfile::tempdir().unwrap();
    let lab = dir.path().join("lab");
    let options = DemoOptions {
        dir: Some(lab.clone()),
        keep: false,
        observe_seconds: 30,
        exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_ferry-lab"))),
        settings,
    };
    let report = run(&options).await.expect("the demo runs");
    for (check, ok) in report.checks() {
        println!("[{}] {check}", if ok { "ok" } else { "FAIL" });
    }
    assert!(report.ok(), "{report:?}");
    assert!(report.lag_samples >= 20, "the lag was watched: {report:?}");

    let a = read(&SiteLayout::in_lab(&lab, "a").timeline()).unwrap();
    let b = read(&SiteLayout::in_lab(&lab, "b").timeline()).unwrap();
    assert!(
        !running_intervals(&a, "ledger").is_empty(),
        "the app ran at a"
    );
    assert!(
        !running_intervals(&b, "ledger").is_empty(),
        "the app ran at b"
    );
    assert_eq!(
        first_overlap(&a, &b, "ledger"),
        None,
        "never at both sites at once"
    );
}
