//! One seeded random chaos run (four faults) in the test suite, checked against the DR
//! invariants (`ferry_lab::chaos`); the 50-run campaign is `ferry-lab chaos --runs 50`
//! (docs/failover.md). Set FERRY_TEST_SEED to replay a seed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_random_run_keeps_every_invariant() {
    seeded_run(Default::default()).await
}

/// The same on a real Kubernetes control plane: a killed site is etcd, kube-apiserver,
/// controller-manager, scheduler and node at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    lab_no_kube_kit,
    ignore = "the Kubernetes control-plane kit is missing (FERRY_LAB_KUBE_BIN and etcd; .ci/run provides both)"
)]
async fn a_seeded_random_run_on_the_kubernetes_control_plane_keeps_every_invariant() {
    seeded_run(ferry_lab::control_plane::kubernetes_for_test(
        "a_seeded_random_run_on_the_kubernetes_control_plane_keeps_every_invariant",
    ))
    .await
}

async fn seeded_run(settings: ferry_lab::control_plane::LabSettings) {
    let seed: u64 = std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(ferry_lab::node::timeline::now_ms);
    println!("FERRY_TEST_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let options = ferry_lab::chaos::ChaosOptions {
        runs: 1,
        seed,
        steps: 4,
        dir: Some(dir.path().to_path_buf()),
        exe: Some(env!("CARGO_BIN_EXE_ferry-lab").into()),
        settings,
    };
    let reports = ferry_lab::chaos::run(&options).await.unwrap();
    let report = &reports[0];
    assert!(
        report.ok(),
        "seed {seed}: faults {:?}; violations {:?}",
        report.faults,
        report.violations
    );
    assert!(report.samples > 0, "the monitor saw the pair");
}
