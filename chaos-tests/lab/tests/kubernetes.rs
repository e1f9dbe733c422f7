//! A lab site on the real Kubernetes control plane (`ferry-lab up --control-plane kubernetes`):
//! everyday kubectl behaves as on a cluster (the controller manager's ReplicaSets and
//! namespace deletion, the scheduler binding pods to the lab node), and Ferry's components run
//! under their own ServiceAccount, so a permission taken from the chart's ClusterRole shows
//! on the pair's condition and in an Event naming the verb and the resource.
//!
//! Listed as ignored without the kit (FERRY_LAB_KUBE_BIN; `.ci/run` unpacks it), failing
//! under `CI=true`.

mod e2e;

use std::path::Path;
use std::process::Command;

use ferry_lab::control_plane::kubernetes_for_test;
use ferry_schemas::DRPair;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use e2e::{eventually, Lab, Protection, NS};

/// Runs kubectl with the site's kubeconfig; returns stdout, or stderr as the error.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("timeout")
        .arg("60")
        .arg("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .map_err(|e| format!("running kubectl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    lab_no_kube_kit,
    ignore = "the Kubernetes control-plane kit is missing (FERRY_LAB_KUBE_BIN and etcd; .ci/run provides both)"
)]
#[cfg_attr(
    lab_no_kubectl,
    ignore = "kubectl not found on PATH (.ci/install-test-deps.sh installs it)"
)]
async fn kubectl_on_a_real_control_plane_site_behaves_as_on_a_cluster() {
    let settings =
        kubernetes_for_test("kubectl_on_a_real_control_plane_site_behaves_as_on_a_cluster");
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    e2e::up(&lab.0, "a", &["--bare"], &settings);
    let kc = lab.0.join("a/kubeconfig");
    let run = |args: &[&str]| kubectl(&kc, args).unwrap_or_else(|e| panic!("{e}"));

    let nodes = run(&["get", "nodes", "--no-headers"]);
    assert!(
        nodes.starts_with("lab-a") && nodes.contains(" Ready "),
        "{nodes}"
    );
    run(&["create", "namespace", "x"]);
    run(&[
        "-n",
        "x",
        "create",
        "deployment",
        "web",
        "--image=busybox",
        "--",
        "sleep",
        "3600",
    ]);
    run(&["-n", "x", "scale", "deployment", "web", "--replicas=3"]);
    // The controller manager makes one ReplicaSet with three pods, the scheduler binds them
    // to the lab node, and its kubelet runs them with their service-account token.
    let ready = eventually("3 of 3 replicas ready", || async {
        let rs = kubectl(&kc, &["-n", "x", "get", "rs", "--no-headers"])?;
        let fields: Vec<&str> = rs.split_whitespace().collect();
        match fields.as_slice() {
            [name, "3", "3", "3", ..] if name.starts_with("web-") => Ok(rs),
            _ => Err(rs),
        }
    })
    .await;
    println!("kubectl -n x get rs: {ready}");
    let pods = run(&[
        "-n",
        "x",
        "get",
        "pods",
        "-o",
        "jsonpath={range .items[*]}{.spec.nodeName} {.status.phase} {.spec.volumes[0].name}{\"\\n\"}{end}",
    ]);
    let lines: Vec<&str> = pods.lines().collect();
    assert_eq!(lines.len(), 3, "{pods}");
    for line in lines {
        assert!(line.starts_with("lab-a Running kube-api-access-"), "{line}");
    }
    run(&["delete", "namespace", "x", "--timeout=90s"]);
    let gone = kubectl(&kc, &["get", "namespace", "x"]);
    assert!(
        gone.as_ref().is_err_and(|e| e.contains("NotFound")),
        "{gone:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    lab_no_kube_kit,
    ignore = "the Kubernetes control-plane kit is missing (FERRY_LAB_KUBE_BIN and etcd; .ci/run provides both)"
)]
async fn a_permission_missing_from_the_cluster_role_is_named_on_the_pair_on_kubernetes() {
    let settings = kubernetes_for_test(
        "a_permission_missing_from_the_cluster_role_is_named_on_the_pair_on_kubernetes",
    );
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, _b) = e2e::setup_with_on(&lab.0, &Protection::PLANNED, &settings).await;
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NS);
    let before = pairs
        .get("ledger")
        .await
        .unwrap()
        .status
        .unwrap()
        .generation;

    // Take `create` on VolumeSnapshots away from Ferry, as a too-narrow install would.
    let roles: Api<ClusterRole> = Api::all(a.clone());
    let role = roles.get("ferry").await.unwrap();
    let original = role.rules.clone().unwrap_or_default();
    let narrowed: Vec<_> = original
        .iter()
        .filter(|r| !r.resources.iter().flatten().any(|x| x == "volumesnapshots"))
        .cloned()
        .collect();
    assert!(
        narrowed.len() < original.len(),
        "the chart grants volumesnapshots"
    );
    let set_rules = |rules: Vec<k8s_openapi::api::rbac::v1::PolicyRule>| {
        let roles = roles.clone();
        async move {
            roles
                .patch(
                    "ferry",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"rules": rules})),
                )
                .await
                .unwrap();
        }
    };
    set_rules(narrowed).await;

    let expected =
        "cannot create resource \"volumesnapshots\" in API group \"snapshot.storage.k8s.io\"";
    let patch = json!({"metadata": {"annotations": {ferry_schemas::contract::SYNC_REQUEST_ANNOTATION: "narrowed"}}});
    pairs
        .patch("ledger", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let message = eventually("Synced=False naming the missing permission", || async {
        let p = pairs.get("ledger").await.map_err(|e| e.to_string())?;
        let s = p.status.unwrap_or_default();
        let synced = s.conditions.iter().find(|c| c.type_ == "Synced").cloned();
        match synced {
            Some(c) if c.status == "False" && c.message.contains(expected) => Ok(c.message),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!("Synced=False: {message}");
    let events: Api<Event> = Api::namespaced(a.clone(), NS);
    let named = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .any(|e| {
            e.reason.as_deref() == Some("SyncFailed")
                && e.message.as_deref().is_some_and(|m| m.contains(expected))
        });
    assert!(named, "a SyncFailed Event names the missing permission");
    // Nothing committed was lost: the pair still names its last good generation.
    let during = pairs
        .get("ledger")
        .await
        .unwrap()
        .status
        .unwrap()
        .generation;
    assert!(during >= before, "{during:?} after {before:?}");

    // With the permission back, the next sync commits.
    set_rules(original).await;
    let patch = json!({"metadata": {"annotations": {ferry_schemas::contract::SYNC_REQUEST_ANNOTATION: "restored"}}});
    pairs
        .patch("ledger", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually("a sync commits again", || async {
        let p = pairs.get("ledger").await.map_err(|e| e.to_string())?;
        let s = p.status.unwrap_or_default();
        match (s.last_sync_request.as_deref(), s.generation) {
            (Some("restored"), Some(g)) if Some(g) > before => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// A warm standby (`spec.standby: Applied`) whose apply the DR site's RBAC refuses: the pair
/// at the DR site says so on `StandbyApplied=False` and in a `StandbyApplyFailed` Event, naming
/// the verb and resource, while the generation itself is still committed there; with the
/// permission back, the next generation is applied and the condition turns `True`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    lab_no_kube_kit,
    ignore = "the Kubernetes control-plane kit is missing (FERRY_LAB_KUBE_BIN and etcd; .ci/run provides both)"
)]
async fn a_refused_standby_apply_is_named_on_the_dr_sites_pair_on_kubernetes() {
    let settings =
        kubernetes_for_test("a_refused_standby_apply_is_named_on_the_dr_sites_pair_on_kubernetes");
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    let (a, b) = e2e::setup_with_on(&lab.0, &Protection::PLANNED, &settings).await;

    // Take the `apps` writes away from Ferry at b, then ask for a warm standby.
    let roles: Api<ClusterRole> = Api::all(b.clone());
    let original = roles.get("ferry").await.unwrap().rules.unwrap_or_default();
    let narrowed: Vec<_> = original
        .iter()
        .filter(|r| !r.api_groups.iter().flatten().any(|g| g == "apps"))
        .cloned()
        .collect();
    assert!(
        narrowed.len() < original.len(),
        "the chart grants apps writes"
    );
    let set_rules = |rules: Vec<k8s_openapi::api::rbac::v1::PolicyRule>| {
        let roles = roles.clone();
        async move {
            roles
                .patch(
                    "ferry",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"rules": rules})),
                )
                .await
                .unwrap();
        }
    };
    set_rules(narrowed).await;
    let pairs_a: Api<DRPair> = Api::namespaced(a.clone(), NS);
    pairs_a
        .patch(
            "ledger",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"standby": "Applied"}})),
        )
        .await
        .unwrap();
    e2e::sync_now(&a, "refused").await;

    let pairs_b: Api<DRPair> = Api::namespaced(b.clone(), NS);
    let standby = |want: &'static str, text: &'static str| {
        let pairs_b = pairs_b.clone();
        async move {
            eventually(&format!("StandbyApplied={want} at b"), || async {
                let p = pairs_b.get("ledger").await.map_err(|e| e.to_string())?;
                let s = p.status.unwrap_or_default();
                let c = s.conditions.iter().find(|c| c.type_ == "StandbyApplied");
                match c {
                    Some(c) if c.status == want && c.message.contains(text) => Ok(s),
                    other => Err(format!("{other:?}")),
                }
            })
            .await
        }
    };
    let expected = "resource \"deployments\" in API group \"apps\"";
    let refused = standby("False", expected).await;
    let synced = refused.conditions.iter().find(|c| c.type_ == "Synced");
    assert!(
        synced.is_some_and(|c| c.status == "True"),
        "the generation is committed at b all the same: {synced:?}"
    );
    println!(
        "StandbyApplied=False: {}",
        refused
            .conditions
            .iter()
            .find(|c| c.type_ == "StandbyApplied")
            .unwrap()
            .message
    );
    let events: Api<Event> = Api::namespaced(b.clone(), NS);
    let named = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .any(|e| {
            e.reason.as_deref() == Some("StandbyApplyFailed")
                && e.message.as_deref().is_some_and(|m| m.contains(expected))
        });
    assert!(
        named,
        "a StandbyApplyFailed Event at b names the permission"
    );

    set_rules(original).await;
    e2e::sync_now(&a, "allowed").await;
    standby("True", "applied here, parked").await;
}

/// What the API server can check alone is refused at admission on the real control plane
/// (CEL rules in the CRD), naming the field: an rpo under 10 s, a pair whose two sites are the
/// same. The lab's own API server does not evaluate CEL (docs/lab.md); the replicator and the
/// controller check both again either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    lab_no_kube_kit,
    ignore = "the Kubernetes control-plane kit is missing (FERRY_LAB_KUBE_BIN and etcd; .ci/run provides both)"
)]
async fn an_invalid_pair_is_refused_at_admission_naming_the_field_on_kubernetes() {
    let settings = kubernetes_for_test(
        "an_invalid_pair_is_refused_at_admission_naming_the_field_on_kubernetes",
    );
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab(dir.path().join("lab"));
    e2e::up(&lab.0, "a", &["--bare"], &settings);
    let client = ferry_lab::site::client_from(&lab.0.join("a/kubeconfig"))
        .await
        .unwrap();
    ferry_lab::testing::install_ferry_crds(&client).await;
    let pairs: Api<DRPair> = Api::namespaced(client.clone(), "default");
    let pair = |name: &str, rpo: &str, secondary: &str| -> DRPair {
        serde_json::from_value(json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair",
            "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"app": name}},
                     "primarySite": "a", "secondarySite": secondary, "rpo": rpo}
        }))
        .unwrap()
    };
    let refused = |result: Result<DRPair, kube::Error>| match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            status.message
        }
        other => panic!("expected 422 Invalid, got {other:?}"),
    };
    let pp = kube::api::PostParams::default();
    let message = refused(pairs.create(&pp, &pair("fast", "5s", "b")).await);
    assert!(
        message.contains("spec.rpo") && message.contains("must be at least 10s"),
        "{message}"
    );
    let message = refused(pairs.create(&pp, &pair("same", "30s", "a")).await);
    assert!(
        message.contains("spec.secondarySite") && message.contains("must differ"),
        "{message}"
    );
    // Replica counts: `count` with Fixed only.
    for (name, replicas) in [
        ("fixed-no-count", json!({"policy": "Fixed"})),
        ("zero-with-count", json!({"policy": "Zero", "count": 2})),
    ] {
        let mut p = pair(name, "30s", "b");
        p.spec.transform.replicas = serde_json::from_value(replicas).unwrap();
        let message = refused(pairs.create(&pp, &p).await);
        assert!(
            message.contains("spec.transform.replicas.count") && message.contains("Fixed"),
            "{message}"
        );
    }
    let mut fixed = pair("fixed-two", "30s", "b");
    fixed.spec.transform.replicas =
        serde_json::from_value(json!({"policy": "Fixed", "count": 2})).unwrap();
    pairs.create(&pp, &fixed).await.unwrap();
    // At the minimum, and in days (which CEL's duration() cannot read), a pair is accepted.
    pairs.create(&pp, &pair("ten", "10s", "b")).await.unwrap();
    pairs.create(&pp, &pair("daily", "1d", "b")).await.unwrap();
}
