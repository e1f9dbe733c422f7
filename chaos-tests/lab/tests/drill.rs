//! DR drills (issue 16): the ledger app replicates from `a` to `b`; a DRDrill at `b` restores
//! the newest generation into a sandbox namespace, waits for the ledger writer to be ready,
//! verifies the ledger (`sqlite-writer verify` through `pods/exec`; readiness alone on the real
//! control plane, whose lab node serves no exec endpoint), and records the RTO and data age on
//! the drill and on b's DRPair. Meanwhile replication goes on, the pair's epoch stays, the
//! production namespace at `b` gets no workload. A drill whose verification fails says so, and
//! its sandbox goes when its TTL ends; a drill at the active site is refused; deleting a drill
//! removes its sandbox and the snapshot contents it made, while the generation's own snapshots
//! stay.

mod e2e;

use e2e::{eventually, Lab, NS};
use ferry_lab::control_plane::ControlPlane;
use ferry_schemas::{DRDrill, DRPair};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::{json, Value};

const PAIR: &str = ferry_lab::ledger_app::PAIR;

async fn create(client: &Client, object: Value) {
    e2e::create_object(client, NS, object).await
}

/// The drill once its phase is `phase` (panics naming the phase and conditions on timeout).
async fn drill_in(client: &Client, name: &str, phase: &str) -> DRDrill {
    let drills: Api<DRDrill> = Api::namespaced(client.clone(), NS);
    eventually(&format!("DRDrill {name} {phase}"), || async {
        let d = drills.get(name).await.map_err(|e| e.to_string())?;
        let s = d.status.clone().unwrap_or_default();
        if s.phase.map(|p| p.as_str()) == Some(phase) {
            Ok(d)
        } else {
            Err(format!(
                "phase {:?}, conditions {:?}",
                s.phase, s.conditions
            ))
        }
    })
    .await
}

fn contents(client: &Client) -> Api<DynamicObject> {
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent"),
            "volumesnapshotcontents",
        ),
    )
}

async fn drill_contents(client: &Client, uid: &str) -> usize {
    contents(client)
        .list(&ListParams::default().labels(&format!("ferry.dev/drill={uid}")))
        .await
        .unwrap()
        .items
        .len()
}

on_both_planes!(
    a_drill_recovers_the_pair_in_a_sandbox_while_replication_goes_on,
    a_drill_recovers_the_pair_in_a_sandbox_while_replication_goes_on_on_kubernetes,
    drill_on
);

async fn drill_on(settings: e2e::LabSettings) {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = e2e::setup_on(&lab.0, &settings).await;
    let pairs_b: Api<DRPair> = Api::namespaced(b.clone(), NS);
    let pairs_a: Api<DRPair> = Api::namespaced(a.clone(), NS);
    let generation_at = |pairs: Api<DRPair>| async move {
        let p = pairs.get(PAIR).await.map_err(|e| e.to_string())?;
        p.status
            .and_then(|s| s.generation)
            .map(|g| g.0)
            .ok_or_else(|| "no generation".to_string())
    };
    let held = eventually("a generation at b", || generation_at(pairs_b.clone())).await;
    let epoch = pairs_b.get(PAIR).await.unwrap().status.unwrap().epoch;
    // Starts of the app's processes at a (its timeline): a drill must not add any.
    let starts_at_a = || {
        e2e::timelines(&lab.0)
            .0
            .iter()
            .filter(|e| {
                e.app.as_deref() == Some(PAIR)
                    && e.event == ferry_lab::node::timeline::TimelineEvent::Start
            })
            .count()
    };
    let started_before = starts_at_a();

    // The drill at b, verifying the ledger where the lab can exec.
    let exec = settings.control_plane == ControlPlane::Lab;
    let verify = if exec {
        json!({"command": ["sqlite-writer", "verify"]})
    } else {
        json!({})
    };
    create(&b, json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRDrill", "metadata": {"name": "weekly"},
        "spec": {"pair": PAIR, "ttl": "1h", "verify": verify}})).await;
    let passed = drill_in(&b, "weekly", "Passed").await;
    let status = passed.status.clone().unwrap();
    let generation = status.generation.unwrap().0;
    assert!(
        generation >= held,
        "drilled generation {generation}, held {held}"
    );
    let rto = status.rto_seconds.expect("rtoSeconds");
    assert!(rto > 0.0, "rto {rto}");
    assert!(
        status.data_age_seconds.is_some_and(|a| a >= 0.0),
        "{status:?}"
    );
    if exec {
        let output = status.verification.clone().unwrap_or_default();
        assert!(output.contains("ok: last committed"), "{output}");
    }
    let sandbox = status.target_namespace.clone().unwrap();
    let uid = passed.metadata.uid.clone().unwrap();
    println!(
        "drill: generation {generation}, RTO {rto:.1}s, data age {:?}s, sandbox {sandbox}",
        status.data_age_seconds
    );
    // The sandbox holds the app on a new volume cloned from the generation.
    let claim = Api::<PersistentVolumeClaim>::namespaced(b.clone(), &sandbox)
        .get("ledger-data")
        .await
        .unwrap();
    assert_eq!(
        claim.spec.unwrap().data_source.unwrap().name,
        format!("ferry-{PAIR}-ledger-data-g{generation}")
    );
    assert_eq!(drill_contents(&b, &uid).await, 1);
    // b's DRPair records it; production at b runs nothing; the epoch did not move.
    let pair_b = pairs_b.get(PAIR).await.unwrap();
    let last = pair_b
        .status
        .clone()
        .unwrap()
        .last_drill
        .expect("lastDrill");
    assert_eq!(
        (last.name.as_str(), last.result.as_str()),
        ("weekly", "Passed")
    );
    assert_eq!(pair_b.status.unwrap().epoch, epoch);
    assert!(Api::<Deployment>::namespaced(b.clone(), NS)
        .get_opt(PAIR)
        .await
        .unwrap()
        .is_none_or(|d| d.spec.and_then(|s| s.replicas) == Some(0)));
    assert_eq!(
        starts_at_a(),
        started_before,
        "the app at a was not restarted"
    );
    // Replication went on: a newer generation commits while the sandbox stands.
    e2e::sync_now(&a, "after-drill").await;
    let after = generation_at(pairs_a.clone()).await.unwrap();
    assert!(
        after > generation,
        "generation {after} after the drill's {generation}"
    );

    // A drill at the active site is refused, naming where to create it.
    create(&a, json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRDrill", "metadata": {"name": "wrong-site"},
        "spec": {"pair": PAIR}})).await;
    let refused = drill_in(&a, "wrong-site", "Failed").await;
    let condition = &refused.status.unwrap().conditions[0];
    assert_eq!(condition.reason, "ActiveSite", "{condition:?}");

    // A failing verification fails the drill; its sandbox goes at the end of its TTL.
    if exec {
        create(&b, json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRDrill", "metadata": {"name": "broken"},
            "spec": {"pair": PAIR, "ttl": "2s", "verify": {"command": ["sqlite-writer", "verify", "--data-dir", "/nowhere"]}}})).await;
        let failed = drill_in(&b, "broken", "Failed").await;
        let condition = failed.status.clone().unwrap().conditions[0].clone();
        assert_eq!(condition.reason, "VerifyFailed", "{condition:?}");
        let cleaned = drill_in(&b, "broken", "CleanedUp").await;
        let gone = cleaned.status.unwrap().target_namespace.unwrap();
        eventually("the failed drill's sandbox gone", || async {
            match Api::<Namespace>::all(b.clone()).get_opt(&gone).await {
                Ok(None) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }

    // Deleting the drill removes its sandbox and contents; the generation's snapshot stays.
    Api::<DRDrill>::namespaced(b.clone(), NS)
        .delete("weekly", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the drill deleted with its sandbox", || async {
        let drill = Api::<DRDrill>::namespaced(b.clone(), NS)
            .get_opt("weekly")
            .await
            .map_err(|e| e.to_string())?;
        let ns = Api::<Namespace>::all(b.clone())
            .get_opt(&sandbox)
            .await
            .map_err(|e| e.to_string())?;
        (drill.is_none() && ns.is_none())
            .then_some(())
            .ok_or(format!(
                "drill {}, namespace {}",
                drill.is_some(),
                ns.is_some()
            ))
    })
    .await;
    assert_eq!(drill_contents(&b, &uid).await, 0);
    let snapshots: Api<DynamicObject> = Api::namespaced_with(
        b.clone(),
        NS,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
            "volumesnapshots",
        ),
    );
    let kept = format!("ferry-{PAIR}-ledger-data-g{generation}");
    // The generation may have been retired by retention meanwhile; if kept, it is ready.
    if let Some(vs) = snapshots.get_opt(&kept).await.unwrap() {
        assert_eq!(vs.data["status"]["readyToUse"], true, "{kept}");
    }
}

on_both_planes!(
    scheduled_drills_run_on_their_own_and_an_overdue_one_is_flagged,
    scheduled_drills_run_on_their_own_and_an_overdue_one_is_flagged_on_kubernetes,
    schedule_on
);

/// `spec.drill` on the pair (set at `a`, carried to `b` with the next generation): `b`'s
/// controller creates drills on its own, one every `every`; while they pass `DrillOverdue` is
/// False at `b`; once they fail for longer than `every` plus its margin, it turns True, naming
/// when a drill last passed; old scheduled drills are pruned.
async fn schedule_on(settings: e2e::LabSettings) {
    use kube::api::{Patch, PatchParams};
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = e2e::setup_on(&lab.0, &settings).await;
    let exec = settings.control_plane == ControlPlane::Lab;
    let set_drill = |verify: Value| {
        let a = a.clone();
        async move {
            Api::<DRPair>::namespaced(a, NS)
                .patch(
                    PAIR,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"drill": {"every": "10s", "ttl": "10s", "verify": verify}}})),
                )
                .await
                .unwrap();
        }
    };
    // Passing drills: the ledger verified where the lab can exec, readiness elsewhere.
    set_drill(if exec {
        json!({"command": ["sqlite-writer", "verify"]})
    } else {
        json!({})
    })
    .await;
    e2e::sync_now(&a, "drill-schedule").await;
    let drills: Api<DRDrill> = Api::namespaced(b.clone(), NS);
    let scheduled = ListParams::default().labels("ferry.dev/scheduled=true");
    eventually("a scheduled drill passed at b", || async {
        let list = drills.list(&scheduled).await.map_err(|e| e.to_string())?;
        list.items
            .iter()
            .any(|d| d.status.as_ref().and_then(|s| s.phase).map(|p| p.as_str()) == Some("Passed"))
            .then_some(())
            .ok_or(format!(
                "{} scheduled drills, none passed",
                list.items.len()
            ))
    })
    .await;
    let pairs_b: Api<DRPair> = Api::namespaced(b.clone(), NS);
    let overdue = |want: &'static str| {
        let pairs_b = pairs_b.clone();
        async move {
            let p = pairs_b.get(PAIR).await.map_err(|e| e.to_string())?;
            match e2e::condition(&p, "DrillOverdue") {
                Some(c) if c.status == want => Ok(c),
                other => Err(format!("{other:?}")),
            }
        }
    };
    let fine = eventually("DrillOverdue=False at b", || overdue("False")).await;
    assert_eq!(fine.reason, "DrillPassedRecently", "{fine:?}");

    // Failing drills (a ledger that is not there; on the real control plane the lab node has no
    // exec endpoint, so any command fails): overdue once every + margin passed without a pass.
    set_drill(json!({"command": ["sqlite-writer", "verify", "--data-dir", "/nowhere"]})).await;
    e2e::sync_now(&a, "drill-failing").await;
    let late = eventually("DrillOverdue=True at b", || overdue("True")).await;
    assert_eq!(late.reason, "NoRecentDrill", "{late:?}");
    assert!(late.message.contains("passed here finished"), "{late:?}");
    let kept = drills.list(&scheduled).await.unwrap().items.len();
    assert!(
        kept <= ferry_failover::drill::SCHEDULED_KEPT + 1,
        "{kept} scheduled drills kept"
    );
}

/// `spec.verify.job` for the ledger: a Job in the sandbox mounting its restored PVC and
/// running `sqlite-writer verify` (works on both control planes: no exec needed).
fn verify_job(command: &[&str]) -> Value {
    json!({"job": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
        "containers": [{"name": "check", "image": "ferry-lab/sqlite-writer", "command": command,
            "env": [{"name": "DATA_DIR", "value": "/data"}],
            "volumeMounts": [{"name": "d", "mountPath": "/data"}]}],
        "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "ledger-data"}}]}}}})
}

on_both_planes!(
    drills_verify_with_a_job_stop_for_a_failover_and_clean_up_after_a_restart,
    drills_verify_with_a_job_stop_for_a_failover_and_clean_up_after_a_restart_on_kubernetes,
    lifecycle_on
);

/// With automatic failover and gated pods: a drill verified by a Job passes (the gated app
/// starts in the sandbox, which has no DRPair, its RoleBinding following it there); a site
/// restart in the middle of a drill's TTL still ends with the sandbox gone; a drill whose
/// verification is still running when site `a` is lost stops (`ActiveSite`) once the pair
/// fails over to its site and cleans up, and the failover completes regardless.
async fn lifecycle_on(settings: e2e::LabSettings) {
    use ferry_lab::ledger_app::Protection;
    use ferry_schemas::Migration;
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = e2e::setup_with_on(&lab.0, &Protection::AUTOMATIC, &settings).await;
    let pairs_b: Api<DRPair> = Api::namespaced(b.clone(), NS);
    eventually("a generation at b", || async {
        let p = pairs_b.get(PAIR).await.map_err(|e| e.to_string())?;
        p.status
            .and_then(|s| s.generation)
            .ok_or_else(|| "none".to_string())
    })
    .await;

    // A Job verifies the restored ledger.
    create(&b, json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRDrill", "metadata": {"name": "by-job"},
        "spec": {"pair": PAIR, "ttl": "15s", "verify": verify_job(&["sqlite-writer", "verify"])}})).await;
    let passed = drill_in(&b, "by-job", "Passed").await;
    let status = passed.status.unwrap();
    let sandbox = status.target_namespace.unwrap();
    assert!(
        status
            .verification
            .as_deref()
            .is_some_and(|v| v.contains("Complete")),
        "{:?}",
        status.verification
    );

    // b restarts before the TTL ends: the sandbox still goes.
    e2e::lab_control("site", "kill", "b", &lab.0);
    e2e::lab_control("site", "start", "b", &lab.0);
    let b = ferry_lab::site::client_from(&lab.0.join("b/kubeconfig"))
        .await
        .unwrap();
    drill_in(&b, "by-job", "CleanedUp").await;
    eventually("the sandbox gone after the restart", || async {
        match Api::<Namespace>::all(b.clone()).get_opt(&sandbox).await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // A drill still verifying when a is lost stops once the pair fails over to b, and cleans
    // up; the failover is not held up by it.
    create(&b, json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRDrill", "metadata": {"name": "interrupted"},
        "spec": {"pair": PAIR, "ttl": "1s", "verify": {"job": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "slow", "image": "busybox", "command": ["sleep", "3600"]}]}}}}}})).await;
    let verifying = drill_in(&b, "interrupted", "Verifying").await;
    let held_status = verifying.status.clone().unwrap();
    let sandbox = held_status.target_namespace.unwrap();
    // The drilled generation is held past the destination's retention (--retain 3) while
    // the drill runs: four newer generations commit, and its snapshot stays, labelled.
    let held = format!(
        "ferry-{PAIR}-ledger-data-g{}",
        held_status.generation.unwrap().0
    );
    for i in 0..4 {
        e2e::sync_now(&a, &format!("past-retention-{i}")).await;
    }
    let snapshots: Api<DynamicObject> = Api::namespaced_with(
        b.clone(),
        NS,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
            "volumesnapshots",
        ),
    );
    let hold_labels = |vs: &DynamicObject| {
        vs.metadata
            .labels
            .clone()
            .unwrap_or_default()
            .into_keys()
            .filter(|k| k.starts_with(ferry_schemas::contract::DRILL_HOLD_PREFIX))
            .count()
    };
    let kept = snapshots
        .get(&held)
        .await
        .expect("the held generation kept");
    assert_eq!(hold_labels(&kept), 1, "{held} held by the drill");
    e2e::lab_control("site", "kill", "a", &lab.0);
    let stopped = drill_in(&b, "interrupted", "CleanedUp").await;
    // The hold is released with the verdict (the next commit here would prune the generation).
    if let Some(vs) = snapshots.get_opt(&held).await.unwrap() {
        assert_eq!(hold_labels(&vs), 0, "{held} released");
    }
    let condition = stopped.status.unwrap().conditions[0].clone();
    assert_eq!(condition.reason, "ActiveSite", "{condition:?}");
    eventually("the interrupted drill's sandbox gone", || async {
        match Api::<Namespace>::all(b.clone()).get_opt(&sandbox).await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let migrations: Api<Migration> = Api::namespaced(b.clone(), NS);
    eventually("the failover completed", || async {
        let m = migrations
            .get("ledger-failover-2")
            .await
            .map_err(|e| e.to_string())?;
        let phase = m.status.and_then(|s| s.phase).map(|p| p.as_str());
        (phase == Some("Completed"))
            .then_some(())
            .ok_or(format!("{phase:?}"))
    })
    .await;
    e2e::assert_never_at_both_sites(&lab.0);
}
