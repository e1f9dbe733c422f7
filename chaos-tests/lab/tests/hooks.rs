//! Capture hooks on the lab: `spec.hooks.preCapture` runs in the app's pod, with the pod's
//! environment, before the snapshots (its marker file is in the generation at `b`), and
//! `postCapture` after them (the marker is gone from the live volume). A failing pre-capture
//! hook fails the sync with its field, pod, exit code and stderr named, and the last good
//! generation stays the newest.

mod e2e;

use ferry_lab::node::storage::bound_volume;
use ferry_schemas::DRPair;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use e2e::{eventually, setup, sync_now, Lab, NS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_in_the_pod_around_the_snapshots_and_a_failing_one_fails_the_sync() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = setup(&lab.0).await;
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);
    let hooks = |pre: serde_json::Value| {
        json!({"spec": {"hooks": {
            "preCapture": {"command": pre, "timeoutSeconds": 20},
            "postCapture": {"command": ["sh", "-c", "rm -f \"$DATA_DIR/quiesced\""]},
        }}})
    };
    pairs
        .patch(
            "ledger",
            &PatchParams::default(),
            &Patch::Merge(hooks(json!([
                "sh",
                "-c",
                "echo \"$HOSTNAME\" > \"$DATA_DIR/quiesced\""
            ]))),
        )
        .await
        .unwrap();
    sync_now(&a, "with-hooks").await;
    let generation = pairs
        .get("ledger")
        .await
        .unwrap()
        .status
        .unwrap()
        .generation
        .unwrap()
        .0;
    let copy = ferry_lab::ledger_app::replica_copy(&b, generation)
        .await
        .unwrap();
    let marker = std::fs::read_to_string(copy.path.join("quiesced"))
        .expect("the pre-capture hook's marker is in the generation");
    assert!(
        marker.trim().starts_with("ledger-"),
        "written by the app's pod with its env: {marker:?}"
    );
    let live = bound_volume(&a, NS, "ledger-data").await.unwrap().unwrap();
    assert!(
        !live.path.join("quiesced").exists(),
        "the post-capture hook removed the marker after the snapshot"
    );
    println!(
        "generation {generation} captured between the hooks of pod {}",
        marker.trim()
    );

    pairs
        .patch(
            "ledger",
            &PatchParams::default(),
            &Patch::Merge(hooks(json!([
                "sh",
                "-c",
                "echo cannot quiesce >&2; exit 3"
            ]))),
        )
        .await
        .unwrap();
    let patch = json!({"metadata": {"annotations": {"ferry.dev/sync-request": "failing-hook"}}});
    pairs
        .patch("ledger", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let message = eventually("the sync to fail on the hook", || async {
        let p = pairs.get("ledger").await.map_err(|e| e.to_string())?;
        let synced = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Synced").cloned());
        match synced {
            Some(c) if c.status == "False" && c.message.contains("preCapture") => Ok(c.message),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!("{message}");
    assert!(
        message.contains("spec.hooks.preCapture in pod ledger-"),
        "{message}"
    );
    assert!(message.contains("exit status 3"), "{message}");
    assert!(message.contains("cannot quiesce"), "{message}");
    let status = pairs.get("ledger").await.unwrap().status.unwrap();
    assert_eq!(
        status.generation.map(|g| g.0),
        Some(generation),
        "the last good generation stays"
    );
}
